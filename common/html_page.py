"""Self-contained HTML pages: one file that opens offline, with its images inside it.

Used for the run report (``server.report``) and the screening report (``client``). A page is a title plus
sections; a section holds blocks built by the functions below. Every block function escapes the text it is
given, so callers pass plain strings (hospital names, notes, error messages, file names) and never write markup
themselves. Trusted markup is a :class:`Markup` value: only the functions of this module make one, and
:func:`join` combines them.

What a rendered page guarantees:

- no external URL: PNG images are embedded as ``data:image/png;base64,...`` URIs, CSS is inline;
- no JavaScript: a Content-Security-Policy meta tag forbids scripts and any load that is not an embedded image
  (``default-src 'none'; img-src data:; style-src 'unsafe-inline'``), so even a string that slipped through
  unescaped could not run or fetch anything;
- collapsible parts use ``<details>``, which needs no script.

Example::

    page = Page("Screening report", subtitle="3 images")
    page.section("Predictions", table(["file", "P(malignant)"], [["a.png", 0.81]]))
    page.section("Heatmap", figure(png_bytes, alt="heatmap of a.png", caption="a.png"))
    html_text = page.render()

Numbers in tables: ``None`` shows as "n/a", floats with 3 decimals (pass a string for any other format).
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CONTENT_SECURITY_POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
MISSING = "n/a"
_NUMBER = re.compile(r"^[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?(%|/\d+)?$")

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; margin: 0 auto;
       max-width: 1100px; padding: 1.5em 2em 4em; color: #1d2430; background: #ffffff; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.1em; }
.subtitle { color: #5a6472; margin-top: 0; }
h2 { font-size: 1.3em; border-bottom: 2px solid #d7dde5; padding-bottom: 0.2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin-top: 1.4em; }
nav ol { columns: 2; font-size: 0.92em; }
.table { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.9em; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 0.3em; }
th, td { border: 1px solid #d7dde5; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f3f7; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 0.8em 0 1.2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #e3e7ee; }
figcaption { font-size: 0.88em; color: #4a5463; }
.gallery { display: flex; flex-wrap: wrap; gap: 1em; }
.gallery figure { width: 240px; margin: 0; }
.notice { background: #fff6df; border-left: 4px solid #e0a800; padding: 0.5em 0.8em; margin: 0.6em 0; }
.warning { background: #fde8e6; border-left: 4px solid #c8504b; padding: 0.5em 0.8em; margin: 0.6em 0; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1.2em; }
dt { font-weight: 600; }
dd { margin: 0; }
details > summary { cursor: pointer; color: #2a5599; }
footer { margin-top: 3em; font-size: 0.85em; color: #5a6472; }
"""


@dataclass(frozen=True)
class Markup:
    """A fragment of trusted HTML, made by this module's functions (everything else is escaped)."""

    html: str

    def __str__(self) -> str:
        return self.html



def escape(text: object) -> str:
    """`text` as HTML text (quotes included, so it is also safe inside an attribute)."""
    return html.escape(str(text), quote=True)


def render(content: Markup | str | None) -> str:
    """HTML of a block or a plain string (escaped); None is nothing."""
    if content is None:
        return ""
    if isinstance(content, Markup):
        return content.html
    return escape(content)


def join(*parts: Markup | str | None) -> Markup:
    """Blocks and strings (escaped) one after another."""
    return Markup("".join(render(p) for p in parts))


def paragraph(*parts: Markup | str | None) -> Markup:
    return Markup(f"<p>{join(*parts).html}</p>")


def strong(text: Markup | str) -> Markup:
    return Markup(f"<strong>{render(text)}</strong>")


def notice(*parts: Markup | str | None, warning: bool = False) -> Markup:
    """A highlighted box: what is missing from a section (yellow) or what is wrong (``warning``: red)."""
    kind = "warning" if warning else "notice"
    return Markup(f'<div class="{kind}" role="note">{join(*parts).html}</div>')


def bullet_list(items: Iterable[Markup | str]) -> Markup:
    return Markup("<ul>" + "".join(f"<li>{render(i)}</li>" for i in items) + "</ul>")


def definition_list(pairs: Iterable[tuple[Markup | str, Markup | str | float | int | None]]) -> Markup:
    """Term / description pairs (a small key-value card)."""
    rows = "".join(f"<dt>{render(term)}</dt><dd>{_cell(value)[1]}</dd>" for term, value in pairs)
    return Markup(f"<dl>{rows}</dl>")


def table(header: Sequence[Markup | str], rows: Iterable[Sequence[object]], *,
          caption: Markup | str | None = None) -> Markup:
    """A table: `header` cells, then `rows` of cells (str escaped, Markup as is, None as "n/a", floats at 3
    decimals); numbers, and strings that read as one ("0.81", "1e-05", "3/4", "12%"), are right-aligned. Wide
    tables scroll sideways instead of widening the page."""
    head = "".join(f'<th scope="col">{render(h)}</th>' for h in header)
    body = []
    for row in rows:
        cells = []
        for value in row:
            numeric, text = _cell(value)
            cells.append(f'<td class="number">{text}</td>' if numeric else f"<td>{text}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    title = f"<caption>{render(caption)}</caption>" if caption is not None else ""
    return Markup(f'<div class="table"><table>{title}<thead><tr>{head}</tr></thead>'
                  f"<tbody>{''.join(body)}</tbody></table></div>")


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` of PNG bytes; raises ValueError for anything that is not a PNG."""
    if not isinstance(png, (bytes, bytearray)) or not bytes(png[:8]) == PNG_SIGNATURE:
        raise ValueError("not a PNG image (missing PNG signature)")
    return "data:image/png;base64," + base64.b64encode(bytes(png)).decode("ascii")


def figure(png: bytes, *, alt: str, caption: Markup | str | None = None) -> Markup:
    """A PNG image embedded in the page, with its alternative text and an optional caption."""
    img = f'<img src="{png_data_uri(png)}" alt="{escape(alt)}">'
    text = f"<figcaption>{render(caption)}</figcaption>" if caption is not None else ""
    return Markup(f"<figure>{img}{text}</figure>")


def gallery(figures: Iterable[Markup]) -> Markup:
    """Figures side by side, wrapping (e.g. one per predicted image)."""
    return Markup('<div class="gallery">' + "".join(f.html for f in figures) + "</div>")


def collapsible(summary: Markup | str, content: Markup | str) -> Markup:
    """Content hidden until the reader opens it (``<details>``, no script)."""
    return Markup(f"<details><summary>{render(summary)}</summary>{render(content)}</details>")


@dataclass
class Page:
    """A page: title, optional subtitle, sections in order, optional footer; :meth:`render` gives the HTML."""

    title: str
    subtitle: str | None = None
    footer: str | None = None
    sections: list[tuple[str, str, Markup]] = field(default_factory=list)

    def section(self, title: str, *blocks: Markup | str | None, anchor: str | None = None) -> str:
        """Add a section (blocks in order) and return its anchor (unique within the page)."""
        base = anchor or _slug(title)
        used = {a for a, _, _ in self.sections}
        name, k = base, 2
        while name in used:
            name, k = f"{base}-{k}", k + 1
        self.sections.append((name, title, join(*blocks)))
        return name

    def render(self) -> str:
        """The complete HTML document, with a table of contents when there are several sections."""
        parts = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                 f'<meta http-equiv="Content-Security-Policy" content="{CONTENT_SECURITY_POLICY}">',
                 '<meta name="viewport" content="width=device-width, initial-scale=1">',
                 f"<title>{escape(self.title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
                 "<header>", f"<h1>{escape(self.title)}</h1>"]
        if self.subtitle:
            parts.append(f'<p class="subtitle">{escape(self.subtitle)}</p>')
        parts.append("</header>")
        if len(self.sections) > 1:
            items = "".join(f'<li><a href="#{a}">{escape(t)}</a></li>' for a, t, _ in self.sections)
            parts.append(f'<nav aria-label="contents"><ol>{items}</ol></nav>')
        parts.append("<main>")
        for anchor, title, body in self.sections:
            parts.append(f'<section id="{anchor}"><h2>{escape(title)}</h2>{body.html}</section>')
        parts.append("</main>")
        if self.footer:
            parts.append(f"<footer>{escape(self.footer)}</footer>")
        parts += ["</body>", "</html>", ""]
        return "\n".join(parts)


def _cell(value: object) -> tuple[bool, str]:
    """(is a number, HTML) of one table or definition value."""
    if value is None:
        return False, MISSING
    if isinstance(value, Markup):
        return False, value.html
    if isinstance(value, bool):
        return False, "yes" if value else "no"
    if isinstance(value, int):
        return True, str(value)
    if isinstance(value, float):
        return True, (f"{value:.3f}" if value == value else MISSING)
    text = str(value)
    return bool(_NUMBER.match(text)), escape(text)


def _slug(title: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")
    return slug or "section"
