"""The progress line: the same figures live on a terminal and as log lines elsewhere."""

from __future__ import annotations

import io
import logging
import sys
import threading

from pipeline.io.progress import Progress, eta_text
from pipeline.io.report import Summary


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Terminal(io.StringIO):
    def isatty(self):
        return True


class SharedTerminal(Terminal):
    """One of the fake streams (stdout, stderr) writing to the same screen, ``raw``."""

    def __init__(self, raw: list[str]):
        super().__init__()
        self.raw = raw

    def write(self, text):
        self.raw.append(text)
        return super().write(text)


def screen(raw: str) -> list[str]:
    """The lines a person sees after ``raw``: "\r" to the line's start, "\x1b[K" clears from
    the cursor on, "\n" to the next line, any other character overwrites the one at the cursor."""
    lines, col, i = [""], 0, 0
    while i < len(raw):
        if raw.startswith("\x1b[K", i):
            lines[-1] = lines[-1][:col]
            i += 3
            continue
        char, i = raw[i], i + 1
        if char == "\r":
            col = 0
        elif char == "\n":
            lines.append("")
            col = 0
        else:
            line = lines[-1].ljust(col)
            lines[-1] = line[:col] + char + line[col + 1:]
            col += 1
    return lines


def receipt(shard, rows, errors=0, last=True, **extra):
    return {"shard": shard, "file": f"part-{shard}.parquet", "rows": rows, "errors": errors,
            "errors_by_kind": {"invalid": errors} if errors else {}, "shard_failed": False,
            "last": last, **extra}


def progress_of(shards, **kwargs):
    """A Progress and the job's Summary it shows; ``add`` gives a receipt to both, as the job."""
    summary = Summary(len(shards), 0, 0, 0.0, "v", "/out", [])
    progress = Progress(shards, summary, **kwargs)

    def add(r):
        summary.add(r)
        progress.add(r)

    return progress, add


def test_eta_from_bytes_and_the_live_line_is_redrawn_in_place():
    clock, term = Clock(), Terminal()
    progress, add = progress_of([("a", 100), ("b", 300)], stream=term, clock=clock)
    assert progress.live  # a terminal: the line is drawn in place
    clock.now += 10
    add(receipt("b", 60, errors=2, last=False))  # a first piece of the big shard
    add(receipt("a", 20))
    assert progress.text() == ("1/2 shards, 2 files, 80 images, 2 errors, 7.8 images/s, "
                               "ETA 0:30")  # 100 of 400 bytes in 10 s: 30 s for the rest
    progress.show()
    clock.now += 0.2
    add(receipt("b", 40))
    progress.show()  # within half a second: not redrawn
    assert term.getvalue().count("\r") == 1
    clock.now += 0.4
    progress.close()
    lines = term.getvalue().split("\r")
    assert lines[-1] == "2/2 shards, 3 files, 120 images, 2 errors, 11.1 images/s, ETA 0:00\n"
    assert len(lines[-1].rstrip("\n")) >= len(lines[-2])  # the old line is fully overwritten


def test_without_a_terminal_the_figures_are_log_lines_every_10_s(caplog):
    clock, stream = Clock(), io.StringIO()
    progress, add = progress_of([("a", 10)], stream=stream, clock=clock)
    assert not progress.live
    with caplog.at_level(logging.INFO):
        clock.now += 5
        add(receipt("a", 4, images=2, faces=3))  # 2 images, one row per face
        progress.show()  # 5 s: not yet
        clock.now += 5
        progress.show()
        progress.close()
    assert stream.getvalue() == ""  # nothing drawn: no terminal
    assert [r.getMessage() for r in caplog.records] == [  # close(): not the same line again
        "progress: 1/1 shards, 1 files, 2 images, 0 errors, 0.2 images/s, ETA 0:00"]


def test_eta_text():
    assert (eta_text(None), eta_text(59.6), eta_text(3725)) == ("ETA -", "ETA 1:00", "ETA 1:02:05")


def test_other_output_goes_above_the_live_line_which_stays_last(monkeypatch):
    raw: list[str] = []
    out, err = SharedTerminal(raw), SharedTerminal(raw)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    handler = logging.StreamHandler(err)  # as logging.basicConfig makes it, before the run
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        clock = Clock()
        progress, add = progress_of([("a", 100), ("b", 100)], stream=err, clock=clock)
        assert sys.stdout is not out and sys.stderr is not err and handler.stream is not err
        assert sys.stdout.isatty() and sys.stdout.fileno is not None  # the rest: the stream's
        clock.now += 10
        add(receipt("a", 20))
        progress.show()
        live = progress.last
        # Ray prints worker lines on the driver from a thread, looking sys.stdout up then.
        worker = threading.Thread(target=lambda: print("(worker pid=1) hello", file=sys.stdout))
        worker.start()
        worker.join()
        logging.getLogger("pipeline.test_progress").warning("a log line")
        assert screen("".join(raw))[-3:] == ["(worker pid=1) hello", "WARNING a log line", live]

        sys.stdout.write("part")  # a line written in pieces: the live line waits for its end
        clock.now += 10
        add(receipt("b", 20))
        progress.show()
        sys.stdout.write("ial\n")
        assert screen("".join(raw))[-2:] == ["partial", progress.last]
        assert progress.last != live  # drawn with the figures of the show() that waited

        progress.close()
        progress.close()  # once only
        assert (sys.stdout, sys.stderr, handler.stream) == (out, err, err)
        assert screen("".join(raw)) == [  # each on its own line, the live line ended last
            "(worker pid=1) hello", "WARNING a log line", "partial", progress.last, ""]
    finally:
        root.removeHandler(handler)


def test_without_a_terminal_stdout_stderr_and_handlers_are_left_alone(monkeypatch):
    raw: list[str] = []
    out, err = SharedTerminal(raw), SharedTerminal(raw)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    handler = logging.StreamHandler(err)
    logging.getLogger().addHandler(handler)
    try:
        progress, add = progress_of([("a", 10)], stream=io.StringIO(), clock=Clock())
        assert not progress.live
        assert (sys.stdout, sys.stderr, handler.stream) == (out, err, err)
        add(receipt("a", 4))
        progress.show(force=True)
        assert (sys.stdout, sys.stderr, handler.stream) == (out, err, err)
        progress.close()
        assert (sys.stdout, sys.stderr, handler.stream) == (out, err, err)
        # live=False on a terminal: the same
        Progress([("a", 10)], Summary(1, 0, 0, 0.0, "v", "/out", []), stream=err, live=False)
        assert (sys.stdout, sys.stderr, handler.stream) == (out, err, err)
    finally:
        logging.getLogger().removeHandler(handler)
