"""A headless Chromium for tests: load a local HTML file, collect what went wrong on it (console
errors, uncaught exceptions, failed loads), read figures back and take a screenshot.

It speaks the Chrome DevTools Protocol over ``--remote-debugging-pipe``: Chrome reads
NUL-terminated JSON messages from its file descriptor 3 and writes replies and events to fd 4.
A pipe needs no websocket library and no port (nothing to pick, race for or leave listening), and
the browser cannot outlive a closed pipe. ``/bin/sh`` moves the pipes from stdin/stdout to fds
3 and 4, so that no ``preexec_fn`` runs in a forked copy of a threaded test process.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))),
                None)

FLAGS = ["--headless=new", "--no-sandbox",  # root has no user namespace sandbox
         "--disable-gpu", "--disable-dev-shm-usage",  # containers: no GPU, a small /dev/shm
         "--no-first-run", "--no-default-browser-check", "--disable-extensions",
         "--disable-background-networking", "--remote-debugging-pipe"]


class BrowserError(RuntimeError):
    """The browser failed, exited or did not answer in time (with the end of its stderr)."""


@dataclass
class PageResult:
    console: list[tuple[str, str]] = field(default_factory=list)  # (type, text)
    exceptions: list[str] = field(default_factory=list)
    log_errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    figures: dict[str, str] = field(default_factory=dict)  # data-figure value -> its text
    title: str = ""
    screenshot: bytes | None = None  # PNG
    value: Any = None  # what ``evaluate`` returned

    @property
    def errors(self) -> list[str]:
        """Everything that went wrong on the page: what a test asserts is empty."""
        return ([f"console.{kind}: {text}" for kind, text in self.console
                 if kind in ("error", "assert")]
                + [f"exception: {text}" for text in self.exceptions]
                + [f"log: {text}" for text in self.log_errors])

    def record(self, method: str, params: dict) -> None:
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.console.append((params["type"], text))
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.exceptions.append(
                f"{details['text']} {details.get('exception', {}).get('description', '')}".strip())
        elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
            entry = params["entry"]
            self.log_errors.append(f"{entry['text']} ({entry.get('url', '')})")
        elif method == "Network.requestWillBeSent":
            self.requests.append(params["request"]["url"])


class _Chromium:
    """One browser process and its pipe; every wait ends by ``deadline``."""

    def __init__(self, deadline: float, on_event):
        if CHROMIUM is None:
            raise BrowserError("chromium is not installed")
        self.deadline, self.on_event, self.seen, self.last_id = deadline, on_event, [], 0
        self.tmp = tempfile.mkdtemp(prefix="test-chromium-")
        self.log = Path(self.tmp, "stderr.log")
        to_chrome, self._write = os.pipe()
        self._read, from_chrome = os.pipe()
        try:
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(
                    ["/bin/sh", "-c", 'exec "$@" 3<&0 4>&1 0</dev/null 1>&2', "sh", CHROMIUM,
                     *FLAGS, f"--user-data-dir={self.tmp}/profile", "about:blank"],
                    stdin=to_chrome, stdout=from_chrome, stderr=log, start_new_session=True)
        except BaseException:
            os.close(self._write), os.close(self._read)
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        finally:
            os.close(to_chrome), os.close(from_chrome)
        self.messages: queue.Queue[dict | None] = queue.Queue()
        self.reader = threading.Thread(target=self._pump, daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        buffer = b""
        try:
            while chunk := os.read(self._read, 1 << 20):
                *messages, buffer = (buffer + chunk).split(b"\0")
                for message in messages:
                    self.messages.put(json.loads(message))
        finally:
            self.messages.put(None)  # the browser closed its end (exited)

    def _exited(self, before: str) -> BrowserError:
        try:
            status = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            status = "none yet"
        return self._fail(f"chromium closed its pipe (exit status {status}) before {before}")

    def _fail(self, why: str) -> BrowserError:
        lines = self.log.read_text(errors="replace").splitlines()  # less the noise of no D-Bus
        tail = collections.deque((line for line in lines if "dbus" not in line), 20)
        return BrowserError(f"{why}; chromium's last stderr lines:\n" + "\n".join(tail))

    def _next(self, waiting_for: str) -> dict:
        try:
            message = self.messages.get(timeout=max(0.0, self.deadline - time.monotonic()))
        except queue.Empty:
            raise self._fail(f"timed out waiting for {waiting_for}") from None
        if message is None:
            raise self._exited(waiting_for)
        if "method" in message:
            self.on_event(message["method"], message.get("params", {}))
            self.seen.append(message)
        return message

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._write, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise self._exited(method) from None
        while (reply := self._next(method)).get("id") != self.last_id:
            pass
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message')}")
        return reply["result"]

    def wait_event(self, method: str, session: str, after: int) -> None:
        """Until ``method`` came on ``session``, among the events seen since ``after`` of them."""
        while not any(m["method"] == method and m.get("sessionId") == session
                      for m in self.seen[after:]):
            self._next(method)

    def close(self, graceful: bool = True) -> None:
        """Browser.close (or a kill, after a failure), then no process, pipe or profile left."""
        try:
            try:
                if graceful and self.proc.poll() is None:
                    os.write(self._write, b'{"id": -1, "method": "Browser.close"}\0')
                    self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            finally:
                self.proc.kill()  # no-op once it exited
                self.proc.wait()
            with contextlib.suppress(ProcessLookupError):  # helpers that outlived the browser
                os.killpg(self.proc.pid, signal.SIGKILL)
        finally:
            os.close(self._write)
            self.reader.join(timeout=10)
            if not self.reader.is_alive():  # else something still holds the pipe: leave the fd
                os.close(self._read)
            shutil.rmtree(self.tmp, ignore_errors=True)


_READ_PAGE = """({href: location.href, title: document.title, figures: Object.fromEntries(
  [...document.querySelectorAll('[data-figure]')].map(e => [e.dataset.figure, e.textContent]))})"""


def load_page(path: str | Path, *, screenshot: bool = False, width: int = 1280, height: int = 900,
              full_page: bool = True, timeout: float = 60.0,
              evaluate: str | None = None) -> PageResult:
    """Open the local HTML file ``path`` in a fresh headless Chromium, wait for its load event and
    return what happened on it. Raises BrowserError when the browser fails or ``timeout`` passes."""
    url, result = Path(path).resolve().as_uri(), PageResult()
    browser = _Chromium(time.monotonic() + timeout, result.record)

    def value(expression: str) -> Any:
        reply = browser.call("Runtime.evaluate", sid, expression=expression, returnByValue=True,
                             awaitPromise=True)
        if "exceptionDetails" in reply:
            details = reply["exceptionDetails"]
            raise BrowserError(f"{expression!r} threw: "
                               + details.get("exception", {}).get("description", details["text"]))
        return reply["result"].get("value")

    try:
        target = browser.call("Target.createTarget", url="about:blank")["targetId"]
        sid = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            browser.call(f"{domain}.enable", sid)
        browser.call("Emulation.setDeviceMetricsOverride", sid, width=width, height=height,
                     deviceScaleFactor=1, mobile=False)
        seen = len(browser.seen)
        navigation = browser.call("Page.navigate", sid, url=url)
        if "errorText" in navigation:
            raise BrowserError(f"loading {url}: {navigation['errorText']}")
        browser.wait_event("Page.loadEventFired", sid, after=seen)
        page = value(_READ_PAGE)
        if page["href"] != url:
            raise BrowserError(f"the page loaded is {page['href']}, not {url}")
        result.title = page["title"]
        result.figures = {name: text.strip() for name, text in page["figures"].items()}
        if evaluate is not None:
            result.value = value(evaluate)
        if screenshot:
            options: dict[str, Any] = {"format": "png"}
            if full_page:
                size = browser.call("Page.getLayoutMetrics", sid)["cssContentSize"]
                options.update(captureBeyondViewport=True, clip={
                    "x": 0, "y": 0, "width": width, "height": max(height, size["height"]),
                    "scale": 1})
            result.screenshot = base64.b64decode(
                browser.call("Page.captureScreenshot", sid, **options)["data"])
    except BaseException:
        browser.close(graceful=False)
        raise
    browser.close()
    return result
