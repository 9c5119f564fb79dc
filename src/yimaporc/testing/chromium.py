"""Drive Debian's headless Chromium over the DevTools protocol, for end-to-end page tests.

``chromium --dump-dom`` sees a page once, in virtual time; a live page (one that polls,
draws charts of what it saw, and must follow a node being killed) needs real time and
several looks at the same page. :class:`Browser` starts Chromium with
``--remote-debugging-pipe`` (commands on fd 3, answers and events on fd 4, JSON
messages ending in NUL), opens a page with :meth:`Browser.open`, and the returned
:class:`Page` evaluates JavaScript, reports the exceptions and console errors the page
had, and takes screenshots. :meth:`Browser.close` stops the process it started.
"""

from __future__ import annotations

import base64
import json
import os
import select
import subprocess
import time
from pathlib import Path
from typing import Any

__all__ = ["Browser", "Page"]


class Browser:
    """One headless Chromium process (see module doc)."""

    def __init__(self, executable: str, profile: Path, size: tuple[int, int] = (1300, 1500)):
        to_chromium, ours_w = os.pipe()
        ours_r, from_chromium = os.pipe()

        def remap() -> None:  # in the child: the protocol's fixed fds
            os.dup2(to_chromium, 3)
            os.dup2(from_chromium, 4)

        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={profile}", "--remote-debugging-pipe",
             f"--window-size={size[0]},{size[1]}"],
            pass_fds=(3, 4), preexec_fn=remap, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_chromium)
        os.close(from_chromium)
        self._w, self._r = ours_w, ours_r
        self._buf = b""
        self._id = 0
        #: Every event received so far (``method``, ``params``, ``sessionId``).
        self.events: list[dict[str, Any]] = []

    def call(
        self, method: str, session: str | None = None, timeout: float = 30, **params: Any
    ) -> Any:
        """Send one command and return its result (events that come first are kept)."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if session is not None:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                answer = json.loads(raw)
                if answer.get("id") == self._id:
                    if "error" in answer:
                        raise RuntimeError(f"{method}: {answer['error']}")
                    return answer.get("result")
                self.events.append(answer)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"chromium did not answer {method} in {timeout} s")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise EOFError("chromium exited")
                self._buf += chunk

    def open(self, url: str) -> Page:
        """A new tab showing ``url``, with exceptions and console messages recorded."""
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Runtime.enable", session)
        self.call("Page.enable", session)
        self.call("Page.navigate", session, url=url)
        return Page(self, session)

    def close(self) -> None:
        """Stop the browser (the process this object started) and close the pipes."""
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError, EOFError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)


class Page:
    """One tab of a :class:`Browser`."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able values)."""
        got = self.browser.call(
            "Runtime.evaluate", self.session, expression=expression, returnByValue=True
        )
        if "exceptionDetails" in got:
            raise RuntimeError(f"{expression}: {got['exceptionDetails']}")
        return got["result"].get("value")

    def errors(self) -> list[str]:
        """Uncaught exceptions and console errors of this page so far."""
        out = []
        for e in self.browser.events:
            if e.get("sessionId") != self.session:
                continue
            params = e.get("params", {})
            if e.get("method") == "Runtime.exceptionThrown":
                out.append(json.dumps(params.get("exceptionDetails", {}))[:500])
            elif e.get("method") == "Runtime.consoleAPICalled" and params.get("type") == "error":
                out.append(json.dumps(params.get("args", []))[:500])
        return out

    def screenshot(self, path: Path) -> None:
        """Write a PNG of the page as it is now."""
        data = self.browser.call("Page.captureScreenshot", self.session)["data"]
        path.write_bytes(base64.b64decode(data))
