"""Test support: load a page in a real headless Chromium and report what a reader's browser would see.

Drives Debian's ``chromium`` through the Chrome DevTools Protocol (CDP) over a WebSocket (``websockets``):
launch with ``--remote-debugging-port=0`` and a throw-away profile, read the port from the profile's
``DevToolsActivePort`` file, open a tab, navigate, and collect

- console errors and uncaught exceptions (``Runtime`` and ``Log`` domains: script errors, failed loads, blocked
  content, Content-Security-Policy violations);
- every request the page made (``Network`` domain), to check nothing left the file;
- every ``<img>``: decoded (``complete`` and ``naturalWidth > 0``, after ``img.decode()`` settles);
- the page title, its visible text and a PNG screenshot of the first screen.

Only loopback is used (the DevTools endpoint on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser")
_FLAGS = ("--headless", "--remote-debugging-port=0", "--no-sandbox", "--disable-gpu", "--no-first-run",
          "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
          "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", "--mute-audio",
          "--hide-scrollbars")
_IMAGES = """(async () => {
  const images = Array.from(document.images);
  await Promise.all(images.map(i => i.decode().catch(() => null)));
  return images.map(i => ({alt: i.alt, src: i.src.slice(0, 40), complete: i.complete,
                           naturalWidth: i.naturalWidth, naturalHeight: i.naturalHeight}));
})()"""


class BrowserError(RuntimeError):
    """Chromium could not be started or did not answer as expected."""


def find_chromium() -> str | None:
    """Path of the Chromium executable, or None."""
    return next((path for path in map(shutil.which, CANDIDATES) if path), None)


@dataclass
class PageView:
    """What the browser saw when it loaded one page."""

    url: str
    title: str
    text: str
    images: list[dict]
    screenshot: bytes
    console_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # URLs (first 80 characters) the page asked for

    @property
    def undecoded_images(self) -> list[dict]:
        return [i for i in self.images if not (i["complete"] and i["naturalWidth"] > 0)]


def view_page(url: str, *, width: int = 1280, height: int = 900, full_page: bool = False, timeout: float = 60.0,
              chromium: str | None = None) -> PageView:
    """Load `url` in a fresh headless Chromium and return what it saw (see the module doc); the screenshot is
    the first `width` x `height` screen, or the whole page with `full_page`."""
    executable = chromium or find_chromium()
    if executable is None:
        raise BrowserError(f"no Chromium executable on PATH (looked for {', '.join(CANDIDATES)})")
    with tempfile.TemporaryDirectory(prefix="mammofl-chromium-") as profile:
        log_path = Path(profile) / "chromium.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen([executable, *_FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            endpoint = _endpoint(Path(profile), process, timeout, log_path)
            return asyncio.run(asyncio.wait_for(_view(endpoint, url, width, height, full_page, timeout), timeout))
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _endpoint(profile: Path, process: subprocess.Popen, timeout: float, log_path: Path) -> str:
    """The browser's DevTools WebSocket URL, from ``DevToolsActivePort`` (line 1 port, line 2 path)."""
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BrowserError(f"chromium exited with code {process.returncode}: "
                               f"{log_path.read_text(errors='replace')[-2000:]}")
        if port_file.is_file():
            lines = port_file.read_text().split()
            if len(lines) >= 2:
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
        time.sleep(0.05)
    raise BrowserError(f"chromium wrote no {port_file.name} within {timeout:.0f} s")


class _Connection:
    """One CDP WebSocket: commands answered by id, events kept in arrival order."""

    def __init__(self, socket):
        self.socket = socket
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.events: list[dict] = []
        self.arrived = asyncio.Event()

    async def read(self) -> None:
        async for raw in self.socket:
            message = json.loads(raw)
            if "id" in message and message["id"] in self.pending:
                self.pending.pop(message["id"]).set_result(message)
            elif "method" in message:
                self.events.append(message)
                self.arrived.set()

    async def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        ident = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[ident] = future
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        await self.socket.send(json.dumps(message))
        reply = await future
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    async def wait_for(self, method: str, session: str) -> dict:
        while True:
            for event in self.events:
                if event["method"] == method and event.get("sessionId") == session:
                    return event
            self.arrived.clear()
            await self.arrived.wait()


async def _view(endpoint: str, url: str, width: int, height: int, full_page: bool, timeout: float) -> PageView:
    from websockets.asyncio.client import connect

    async with connect(endpoint, max_size=None, open_timeout=timeout) as socket:
        cdp = _Connection(socket)
        reader = asyncio.create_task(cdp.read())
        try:
            target = (await cdp.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
            session = (await cdp.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
            for domain in ("Runtime", "Log", "Page", "Network"):
                await cdp.send(f"{domain}.enable", session=session)
            await cdp.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                                   "deviceScaleFactor": 1, "mobile": False},
                           session=session)
            navigation = await cdp.send("Page.navigate", {"url": url}, session=session)
            if navigation.get("errorText"):
                raise BrowserError(f"navigation to {url} failed: {navigation['errorText']}")
            await cdp.wait_for("Page.loadEventFired", session)
            images = await _evaluate(cdp, session, _IMAGES)
            title = await _evaluate(cdp, session, "document.title")
            text = await _evaluate(cdp, session, "document.body ? document.body.innerText : ''")
            capture: dict = {"format": "png"}
            if full_page:
                size = (await cdp.send("Page.getLayoutMetrics", session=session))["cssContentSize"]
                capture.update(captureBeyondViewport=True,
                               clip={"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1})
            shot = await cdp.send("Page.captureScreenshot", capture, session=session)
            await asyncio.sleep(0.2)  # late console messages
            view = PageView(url=url, title=title, text=text, images=images,
                            screenshot=base64.b64decode(shot["data"]),
                            console_errors=_errors(cdp.events, session),
                            requests=[e["params"]["request"]["url"][:80] for e in cdp.events
                                      if e["method"] == "Network.requestWillBeSent"
                                      and e.get("sessionId") == session])
            try:
                await cdp.send("Browser.close")
            except Exception:  # the browser may drop the connection while answering  # noqa: BLE001
                pass
            return view
        finally:
            reader.cancel()


async def _evaluate(cdp: _Connection, session: str, expression: str):
    result = await cdp.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                 "returnByValue": True}, session=session)
    if "exceptionDetails" in result:
        raise BrowserError(f"evaluating {expression[:40]!r}: {result['exceptionDetails']}")
    return result["result"].get("value")


def _errors(events: list[dict], session: str) -> list[str]:
    """Console errors, uncaught exceptions and error log entries of the page, as text."""
    out = []
    for event in events:
        if event.get("sessionId") != session:
            continue
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            out.append(f"exception: {details.get('exception', {}).get('description') or details.get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            out.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            out.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip())
    return out
