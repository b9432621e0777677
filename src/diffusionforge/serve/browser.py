"""A system Chromium driven over the DevTools protocol on a pipe: the page's headless-browser check.

``chromium --headless=new --remote-debugging-pipe`` reads DevTools commands
(JSON, each ended by a NUL byte) on its file descriptor 3 and answers on 4, so
the standard library is enough: no websocket client, no browser package, no
download. Used by ``tests/test_serve.py`` (the page loads, a Generate click
shows an image) and ``benchmarks/serve_latency.py --screenshot`` (the
README's picture of the page).
"""

from __future__ import annotations

import base64
import json
import os
import select
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

BROWSERS = ("chromium", "chromium-browser", "google-chrome")  # executable names tried in turn


def find_chromium() -> Optional[str]:
    """The path of a system Chromium, None when there is none."""
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


class BrowserError(RuntimeError):
    """The browser did not answer, or answered with an error, or a condition did not come true in time."""


class Browser:
    """One headless Chromium with one page (``open``), closed by ``close`` or on leaving a ``with``."""

    def __init__(self, executable: str, size: tuple[int, int] = (1280, 1000), timeout: float = 60.0):
        to_browser, self._write = os.pipe()   # our commands -> its fd 3
        self._read, from_browser = os.pipe()  # its fd 4 -> our answers
        self._profile = tempfile.TemporaryDirectory(prefix="dforge-chromium-")  # its own: no other instance's lock
        flags = ["--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
                 f"--user-data-dir={self._profile.name}",
                 "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
                 f"--window-size={size[0]},{size[1]}", "about:blank"]
        # bash, not sh: dash takes no descriptor above 9 in a redirection
        command = " ".join([shlex.quote(executable), *flags, f"3<&{to_browser}", f"4>&{from_browser}"])
        self._process = subprocess.Popen(["bash", "-c", f"exec {command}"], pass_fds=(to_browser, from_browser),
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self.size, self.timeout = size, timeout
        self._buffer, self._next_id, self._session = b"", 0, None

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _message(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._read], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(self._read, 1 << 20) if ready else b""
            if not chunk:
                raise BrowserError("the browser stopped answering")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, params: Optional[dict] = None, page: bool = True) -> dict:
        """Send one command (to the page's session unless ``page`` is False) and return its result."""
        self._next_id += 1
        command: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if page and self._session:
            command["sessionId"] = self._session
        os.write(self._write, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._message(deadline)  # events in between are skipped
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error'].get('message')}")
                return message.get("result", {})

    def open(self, url: str) -> None:
        """A new page at ``url``, its viewport ``size``."""
        target = self.send("Target.createTarget", {"url": "about:blank"}, page=False)["targetId"]
        self._session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True},
                                  page=False)["sessionId"]
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": self.size[0], "height": self.size[1], "deviceScaleFactor": 1, "mobile": False})
        self.send("Page.navigate", {"url": url})

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True})
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:60]}...: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, every: float = 0.2) -> Any:
        """Poll a JavaScript expression until it is truthy (one that throws, e.g. on an element not yet
        rendered, is polled again); its value."""
        deadline, last = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except BrowserError as err:
                value, last = None, f" (last: {err})"
            if value:
                return value
            time.sleep(every)
        raise BrowserError(f"not true after {timeout:.0f} s: {expression}{last}")

    def screenshot(self, path: str | Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        Path(path).write_bytes(base64.b64decode(data))
        return Path(path)

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self.send("Browser.close", page=False)
            except (BrowserError, OSError):
                pass
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        for fd in (self._read, self._write):
            try:
                os.close(fd)
            except OSError:
                pass
        self._profile.cleanup()


# What a click on Generate looks like from the page (the tab, the button, the result image's URL).
SHOW_TAB = ("(() => {{ const tab = [...document.querySelectorAll('button[role=tab]')]"
            ".find(b => b.textContent.trim() === {name!r}); if (tab) tab.click(); return !!tab; }})()")
CLICK = "(() => {{ const b = document.querySelector({selector!r}); if (b) b.click(); return !!b; }})()"
RESULT = ("(() => {{ const i = document.querySelector({selector!r} + ' img'); if (i) return i.src; "
          "const t = [...document.querySelectorAll('.toast-body')].map(e => e.textContent.trim()).join(' | '); "
          "return t ? 'error: ' + t : ''; }})()")  # the result image's URL, or the error toasts' text


def click_generate(browser: Browser, timeout: float = 120.0) -> str:
    """On a loaded page: open the Generate tab, press Generate; the result image's URL (BrowserError with
    the page's message when it shows an error instead)."""
    browser.wait_for(SHOW_TAB.format(name="Generate"), timeout)
    browser.wait_for(CLICK.format(selector="#generate-button"), timeout)
    shown = browser.wait_for(RESULT.format(selector="#generate-result"), timeout)
    if shown.startswith("error: "):
        raise BrowserError(f"the page shows an error: {shown[7:]}")
    return shown
