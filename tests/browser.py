"""A real headless Chromium, driven over the DevTools protocol on a pipe: what a user of the MLflow UI sees, read back
from the rendered page rather than from the REST API behind it.

Why a pipe (``--remote-debugging-pipe``: JSON messages ending in a NUL byte, commands on the browser's fd 3,
answers on its fd 4): no websocket client and no browser-downloading package is needed — the standard library and
the system's Chromium (Debian's ``chromium`` package) are enough. Every browser starts with a fresh profile, so
nothing a user clicked before (MLflow keeps the "GenAI / Model training" switch in ``localStorage``) leaks into
what a test sees. Pages render at 80 % zoom (``--force-device-scale-factor``), as the README's screenshots show them.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome")
ZOOM = 0.8
WINDOW = (1600, 1000)
"""The viewport (and every screenshot) in device pixels: at :data:`ZOOM` the page lays out 2000 × 1250 CSS
pixels, a wide desktop."""
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-pipe",
    f"--force-device-scale-factor={ZOOM}",
    f"--window-size={WINDOW[0]},{WINDOW[1]}",
)
_LAUNCHER = (
    "import os, sys; ends = [os.dup(int(fd)) for fd in sys.argv[1:3]]; os.dup2(ends[0], 3); os.dup2(ends[1], 4); "
    "os.set_inheritable(3, True); os.set_inheritable(4, True); os.execv(sys.argv[3], sys.argv[3:])"
)
"""Puts the two pipe ends on the fds Chromium reads (3) and writes (4), whatever numbers they have here: each is
copied before either is moved (so an end already on 3 or 4 is not overwritten), and both are left open across
``exec`` (a copy that lands on its own number keeps the close-on-exec flag ``os.dup`` gave it)."""


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, NAMES) if path), None)


def require_chromium() -> str:
    """The browser, or the test ends: it fails under CI (``CI=true``), where ``.ci/run`` installs Chromium, and is
    skipped on a machine without one."""
    found = find_chromium()
    if found is not None:
        return found
    message = "no Chromium: install it (apt-get install chromium) to see the MLflow UI as a user does"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


class BrowserError(AssertionError):
    pass


class Page:
    """One tab: load a URL, wait for what it shows, read its text, click, take a screenshot."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.browser.call(method, session=self.session, **params)

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def reload(self) -> None:
        """Load the page's document again (an ``open`` that changes only the ``#`` part does not)."""
        self.call("Page.reload")

    def evaluate(self, expression: str) -> Any:
        answer = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression[:80]}: {answer['exceptionDetails'].get('text')}")
        return answer["result"].get("value")

    def text(self) -> str:
        return str(self.evaluate("document.body ? document.body.innerText : ''"))

    def url(self) -> str:
        return str(self.evaluate("location.href"))

    def wait_for(self, expression: str, what: str, timeout_s: float = 60.0) -> Any:
        """Poll ``expression`` until it is truthy (the single-page app renders after its API calls answer)."""
        deadline = time.monotonic() + timeout_s
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise BrowserError(f"{what}: not shown after {timeout_s:.0f} s at {self.url()}\n{self.text()[:3000]}")
            time.sleep(0.25)

    def wait_for_route(self, prefix: str) -> None:
        """Wait until the single-page app's route (the URL's ``#`` part) starts with ``prefix``."""
        self.wait_for(f"location.hash.startsWith({json.dumps(prefix)})", f"the page {prefix}")

    def wait_for_text(self, *needles: str, timeout_s: float = 60.0) -> str:
        """Wait until the page shows every one of ``needles``; returns its text then."""
        check = " && ".join(f"document.body.innerText.includes({json.dumps(n)})" for n in needles)
        self.wait_for(f"document.body && {check}", f"{needles}", timeout_s)
        return self.text()

    def settle(self, seconds: float = 1.5) -> None:
        """Let late requests, images and animations finish before a screenshot."""
        time.sleep(seconds)

    def click(self, selector: str, text: str | None = None) -> str:
        """Click the first shown element matching ``selector`` — whose text is ``text``, if given — as
        :meth:`click_element` does; returns its ``href`` (empty for a non-link)."""
        find = (
            f"[...document.querySelectorAll({json.dumps(selector)})].find(e => e.getClientRects().length && "
            f"({json.dumps(text)} === null || (e.innerText || '').trim() === {json.dumps(text)}))"
        )
        return self.click_element(find, f"{selector} {text or ''}".strip())

    def click_element(self, find: str, what: str) -> str:
        """Click an element (:meth:`locate`): a real mouse move, press and release at its centre, so the app's own
        handlers run as for a user; returns its ``href``."""
        box = self.locate(find, what)
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=box["x"], y=box["y"])
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)
        return str(box["href"])

    def drag(self, find: str, what: str, dx: float) -> None:
        """Drag an element (:meth:`locate`) ``dx`` CSS pixels to the right, as a hand on a mouse would (a column's
        edge, to widen it)."""
        box = self.locate(find, what)
        x, y = box["x"], box["y"]
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        self.call("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", clickCount=1)
        for step in range(1, 11):
            self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x + dx * step / 10, y=y, button="left")
        self.call("Input.dispatchMouseEvent", type="mouseReleased", x=x + dx, y=y, button="left", clickCount=1)

    def locate(self, find: str, what: str) -> dict[str, Any]:
        """The centre and ``href`` of the element the JavaScript expression ``find`` yields, once it is shown,
        scrolled into view, still (not sliding or zooming in) and not covered (by a dialog, a panel)."""
        return dict(
            self.wait_for(
                f"(() => {{ const e = {find}; if (!e) return null; e.scrollIntoView({{block: 'center'}});"
                "const r = e.getBoundingClientRect(), x = r.x + r.width / 2, y = r.y + r.height / 2;"
                "const where = [r.x, r.y, r.width, r.height].join(), still = e.gssfWhere === where;"
                "e.gssfWhere = where; const hit = document.elementFromPoint(x, y);"
                "if (!still || !hit || !e.contains(hit)) return null;"
                "return {x, y, href: e.getAttribute('href') || ''}; })()",
                f"{what} (shown, still and not covered)",
            )
        )

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path


class Browser:
    """A headless Chromium process with a fresh profile, spoken to over the DevTools pipe."""

    def __init__(self, binary: str, folder: Path) -> None:
        to_browser, self._commands = os.pipe()
        self._answers, from_browser = os.pipe()
        command = [sys.executable, "-c", _LAUNCHER, str(to_browser), str(from_browser), binary, *FLAGS]
        command += [f"--user-data-dir={folder / 'profile'}", "about:blank"]
        self.log = folder / "chromium.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL, stderr=log
            )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer = b""
        self._next_id = 0

    def call(self, method: str, session: str | None = None, timeout_s: float = 60.0, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and wait for its answer (events, which no domain here is enabled for, and
        answers to nothing pending are passed over)."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while True:
            answer = self._read(deadline, method)
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise BrowserError(f"{method}: {answer['error'].get('message')}")
                return dict(answer.get("result", {}))

    def _read(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self._answers], [], [], max(left, 0))
            chunk = os.read(self._answers, 1 << 20) if ready else b""
            if not chunk:
                why = "timed out" if not ready else f"exited: {self._stderr()}"
                raise BrowserError(f"Chromium {why} waiting for {waiting_for}")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return dict(json.loads(message))

    def _stderr(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def new_page(self) -> Page:
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        page = Page(self, session)
        width, height = (round(pixels / ZOOM) for pixels in WINDOW)
        page.call(
            "Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=ZOOM, mobile=False
        )
        return page

    def close(self) -> None:
        with suppress(BrowserError, OSError):
            self.call("Browser.close", timeout_s=10)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._commands, self._answers):
            os.close(fd)


@contextmanager
def browser(binary: str | None = None) -> Iterator[Browser]:
    """A fresh headless Chromium (``binary``, or the one on PATH) for the block; closed and its profile removed
    afterwards."""
    with tempfile.TemporaryDirectory(prefix="gssf-chromium-") as folder:
        opened = Browser(binary or require_chromium(), Path(folder))
        try:
            yield opened
        finally:
            opened.close()
