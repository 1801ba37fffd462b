"""The run's progress as people read it: one live line on a terminal, plain lines in logs.

Both show the same figures: shards done of the run's total, files committed, images, errors,
images/s and an ETA from the input bytes done so far (shards differ in size; bytes predict the
rest better than counts). On a terminal (``stream.isatty()``) the line is rewritten in place
at most every ``live_every_s``; elsewhere (``ray job submit`` logs, a pod's log) it is logged as
a line every ``log_every_s``. Ray-free, so it is tested with a fake terminal.
"""

from __future__ import annotations

import logging
import sys
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
            self.stream.write("\r" + text.ljust(self.width))
            self.stream.flush()
            self.width = len(text)
        else:
            log.info("progress: %s", text)

    def close(self) -> None:
        """The last figures; on a terminal the line is ended so what follows starts below."""
        self.show(force=True)
        if self.live:
            self.stream.write("\n")
            self.stream.flush()
