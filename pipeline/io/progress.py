"""The run's progress as people read it: one live line on a terminal, plain lines in logs.

Both show the same figures: shards done of the run's total, files committed, images, errors,
images/s and an ETA from the input bytes done so far (shards differ in size; bytes predict the
rest better than counts). On a terminal (``stream.isatty()``) the line is rewritten in place
at most every ``live_every_s``; elsewhere (``ray job submit`` logs, a pod's log) it is logged as
a line every ``log_every_s``. Ray-free, so it is tested with a fake terminal.

While the live line is up, other output shares its terminal: Ray prints worker log lines from a
background thread to whatever ``sys.stdout``/``sys.stderr`` is then, and our log records go
through ``logging.StreamHandler``s holding the original streams. Written straight after the live
line's text, such a line would be glued to it and leave the live line above it until the next
redraw. So a live Progress puts ``_SharedTerminal`` proxies in their place (``sys.stdout``,
``sys.stderr`` and the handlers on the root and "pipeline" loggers that write to them) until
``close()``: each write erases the live line first and redraws it below once a line is ended,
under one lock with the live line's own drawing, so the live line stays the last on the screen.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

log = logging.getLogger(__name__)


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "ETA -"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"ETA {hours}:{minutes:02d}:{secs:02d}" if hours else f"ETA {minutes}:{secs:02d}"


ERASE = "\r\x1b[K"  # to the line's start, then clear it


class _SharedTerminal:
    """A stream that shares the terminal with a live Progress: its writes go to ``wrapped``
    around the live line (``Progress._write_over``); everything else is the wrapped stream's."""

    def __init__(self, wrapped: TextIO, progress: Progress):
        self._wrapped = wrapped
        self._progress = progress

    def write(self, text: str) -> int:
        return self._progress._write_over(self._wrapped, text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):  # fileno, isatty, encoding, flush, buffer...
        return getattr(self._wrapped, name)


class Progress:
    """Shows ``summary``'s counts (a ``report.Summary``: files, images, errors) and the shards
    its receipts completed, of the run's shards (name -> input bytes)."""

    def __init__(self, shards: Iterable[tuple[str, int]], summary, *,
                 stream: TextIO | None = None,
                 live: bool | None = None, live_every_s: float = 0.5,
                 log_every_s: float = 10.0, clock=time.monotonic):
        self.sizes = dict(shards)
        self.summary = summary
        self.total_bytes = sum(self.sizes.values())
        self.stream = stream if stream is not None else sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.every = live_every_s if self.live else log_every_s
        self.clock = clock
        self.started = clock()
        self.shown = self.started
        self.done: set[str] = set()
        self.done_bytes = 0
        self.width = 0  # of the live line last drawn
        self.last = ""  # the figures last drawn or logged
        self._lock = threading.RLock()  # the live line's drawing and the proxies' writes
        self._drawn = False  # the live line is on the screen, the cursor on it
        self._partial = False  # other output left a line unfinished: no drawing until it ends
        self._closed = False
        self._restore: list[tuple[Any, Any, Any]] = []  # (handler or sys name, original, proxy)
        if self.live:
            self._install()

    def _install(self) -> None:
        """Put proxies in place of sys.stdout/sys.stderr and of the log handlers using them."""
        proxies: dict[int, _SharedTerminal] = {}
        for name in ("stdout", "stderr"):
            original = getattr(sys, name)
            if original is None:  # pythonw: nothing to share
                continue
            proxy = proxies.setdefault(id(original), _SharedTerminal(original, self))
            setattr(sys, name, proxy)
            self._restore.append((name, original, proxy))
        for logger in (logging.getLogger(), logging.getLogger("pipeline")):
            for handler in logger.handlers:
                proxy = proxies.get(id(getattr(handler, "stream", None)))
                if isinstance(handler, logging.StreamHandler) and proxy is not None:
                    self._restore.append((handler, handler.setStream(proxy), proxy))

    def _uninstall(self) -> None:
        """Put back what ``_install`` replaced, where it is still our proxy."""
        for owner, original, proxy in reversed(self._restore):
            if isinstance(owner, str):
                if getattr(sys, owner) is proxy:
                    setattr(sys, owner, original)
            elif owner.stream is proxy:
                owner.setStream(original)
        self._restore = []

    def _draw(self, text: str) -> None:
        """Under the lock: the live line, over the one drawn before (if on the screen)."""
        self.stream.write("\r" + text.ljust(self.width if self._drawn else 0))
        self.stream.flush()
        self.width = len(text)
        self._drawn = True

    def _write_over(self, wrapped: TextIO, text: str) -> int:
        """Another writer's text: the live line erased before it, redrawn once a line ends."""
        with self._lock:
            if self._drawn and text:
                self.stream.write(ERASE)
                self.stream.flush()
                self._drawn = False
            written = wrapped.write(text)
            wrapped.flush()  # before the live line is drawn again, maybe on the other stream
            if text:
                self._partial = not text.endswith("\n")
            if not self._partial and not self._drawn and self.last and not self._closed:
                self._draw(self.last)
            return written

    def add(self, receipt: Mapping[str, Any]) -> None:
        """A committed file's receipt (the summary counts it): its shard may be done."""
        shard = receipt.get("shard")
        if receipt.get("last") and shard in self.sizes and shard not in self.done:
            self.done.add(shard)
            self.done_bytes += self.sizes[shard]

    def text(self) -> str:
        elapsed = max(self.clock() - self.started, 1e-9)
        eta = None
        if 0 < self.done_bytes < self.total_bytes:
            eta = elapsed * (self.total_bytes - self.done_bytes) / self.done_bytes
        elif self.total_bytes and self.done_bytes >= self.total_bytes:
            eta = 0.0
        s = self.summary
        return (f"{len(self.done)}/{len(self.sizes)} shards, {s.files_committed} files, "
                f"{s.samples} images, {s.errors} errors, "
                f"{(s.samples - s.errors) / elapsed:.1f} images/s, {eta_text(eta)}")

    def show(self, force: bool = False) -> None:
        """Draw the line (live) or log it, when ``every`` seconds passed since the last time."""
        now = self.clock()
        if not force and now - self.shown < self.every:
            return
        self.shown = now
        text = self.text()
        if force and text == self.last:
            return  # close() right after the last receipt's line: said already
        self.last = text
        if self.live:
            with self._lock:
                if not self._partial:  # else drawn when that line ends, with the newest figures
                    self._draw(text)
        else:
            log.info("progress: %s", text)

    def close(self) -> None:
        """The last figures; on a terminal the line is ended so what follows starts below, and
        the streams and handlers are the original ones again. Once only."""
        if self._closed:
            return
        self._closed = True
        if not self.live:
            self.show(force=True)
            return
        self._uninstall()  # outside the lock: setStream takes the handler's lock
        with self._lock:
            self.last = self.text()
            if self._partial:  # another writer's unfinished line: the figures go below it
                self.stream.write("\n")
                self._drawn = self._partial = False
            self._draw(self.last)
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
