"""The self-contained HTML page builder: escaping, tables, embedded PNGs, no external URL, no script."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from common import html_page as h

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>&'


def png_bytes(width: int = 4, height: int = 3) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((height, width, 3), 200, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


class _Tags(HTMLParser):
    """Start tags with their attributes, in document order."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags(html_text: str) -> list[tuple[str, dict]]:
    parser = _Tags()
    parser.feed(html_text)
    return parser.tags


def test_escape_covers_markup_and_quotes():
    assert h.escape(HOSTILE) == ("&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;img src=x "
                                 "onerror=alert(1)&gt;&amp;")
    assert h.escape("it's") == "it&#x27;s"


def test_every_block_escapes_plain_strings():
    blocks = [h.paragraph(HOSTILE), h.notice(HOSTILE), h.bullet_list([HOSTILE]), h.strong(HOSTILE),
              h.definition_list([(HOSTILE, HOSTILE)]), h.table([HOSTILE], [[HOSTILE]], caption=HOSTILE),
              h.collapsible(HOSTILE, HOSTILE), h.figure(png_bytes(), alt=HOSTILE, caption=HOSTILE)]
    page = h.Page(title=HOSTILE, subtitle=HOSTILE, footer=HOSTILE)
    page.section(HOSTILE, *blocks)
    text = page.render()
    assert "<script" not in text and "<img src=x" not in text
    assert [t for t, _ in tags(text)].count("img") == 1  # the figure only
    assert text.count("&lt;script&gt;") == 18  # <title>, <h1>, subtitle, footer, section <h2>, 13 in blocks
    img = next(a for t, a in tags(text) if t == "img")
    assert img["alt"] == HOSTILE  # the parser unescapes the attribute: the text survives intact


def test_table_formats_cells_and_right_aligns_numbers():
    markup = h.table(["a", "b", "c", "d", "e", "f"], [[0.12345, 7, None, "1e-05", "3/4", "partition-1"],
                                                      [float("nan"), True, h.strong("x"), "12%", "-2.50", "n/a"]])
    cells = re.findall(r'<td( class="number")?>(.*?)</td>', markup.html)
    assert cells == [(' class="number"', "0.123"), (' class="number"', "7"), ("", "n/a"),
                     (' class="number"', "1e-05"), (' class="number"', "3/4"), ("", "partition-1"),
                     (' class="number"', "n/a"), ("", "yes"), ("", "<strong>x</strong>"),
                     (' class="number"', "12%"), (' class="number"', "-2.50"), ("", "n/a")]
    assert markup.html.count("<th scope=\"col\">") == 6


def test_figure_embeds_the_png_bytes_and_refuses_anything_else():
    png = png_bytes(5, 2)
    markup = h.figure(png, alt="a picture", caption="cap")
    src = next(a["src"] for t, a in tags(markup.html) if t == "img")
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1]) == png
    with pytest.raises(ValueError, match="not a PNG"):
        h.figure(b"GIF89a....", alt="x")
    with pytest.raises(ValueError, match="not a PNG"):
        h.png_data_uri("\x89PNG\r\n\x1a\n")  # text, not bytes


def test_page_is_self_contained_with_a_policy_that_forbids_scripts_and_remote_loads():
    page = h.Page(title="T")
    page.section("One", h.paragraph("x"), h.figure(png_bytes(), alt="p"))
    page.section("One", h.paragraph("y"))  # same title: anchors stay unique
    page.section("Two & more", "plain")
    text = page.render()
    found = tags(text)
    policy = next(a["content"] for t, a in found if t == "meta" and a.get("http-equiv"))
    assert policy == "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    assert not [t for t, _ in found if t in ("script", "link", "iframe", "object", "embed")]
    assert not re.search(r"(src|href)=\"(https?:|//)", text)
    ids = [a["id"] for t, a in found if t == "section"]
    assert ids == ["one", "one-2", "two-more"]
    assert [a["href"] for t, a in found if t == "a"] == ["#one", "#one-2", "#two-more"]
    assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text


def test_a_single_section_gets_no_table_of_contents():
    page = h.Page(title="T")
    page.section("Only", "x")
    assert "<nav" not in page.render()
