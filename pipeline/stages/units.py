"""Work units: how the listed shards become output files (pieces) and read tasks, without Ray.

Three granularities, each chosen for one job:

- **piece** = one output file ``part-<stem>.parquet`` and its completion record
  ``_done/<stem>.json``. A shard of up to ``rows_per_file`` rows is one piece named after the
  shard (``stem`` = shard name); a larger shard is cut at every multiple of ``rows_per_file``
  rows, and piece ``k >= 1`` is ``<shard name>.c<k:05d>``. The cut depends on the shard's
  content and that setting only, so names are deterministic and a rerun replaces files.
- **unit** = what travels from a read task through one predictor call to the commits: the rows
  of consecutive pieces (small shards bundled together, or a slice of a big one), cut when it
  holds ``unit_rows`` rows or ``unit_bytes`` bytes. A predictor call sees one unit, so GPU
  batches stay full however small the shards are. Units never name anything.
- **read task** = consecutive shards read by one Ray task, sized by their listed bytes, so a
  million small shards are a few thousand tasks rather than a million; or, when a node has
  more read lanes than tasks (a few big shards), a slice of consecutive rows of one shard
  (``slice_tasks``), so every lane decodes from the start whatever the input's size.

A unit carries a ``UnitHeader``: for each piece it touches, the range of its input rows (samples)
inside the unit and whether the piece ends there. The driver needs only the headers to know when
every row of a piece has been predicted, and then hands the piece's ranges to a commit task.

Input rows and output rows differ once faces are detected: an image becomes one output row per
face. A segment therefore also says which output rows (rows of the unit's arrays) hold its input
rows (``out_start:out_stop``); pieces are completed by counting input rows and written from the
output ranges. Whoever expands the rows sets them: the read task as it builds a unit
(``UnitBuilder.add(..., out_rows=k)``), or a later stage with ``expand_header``.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from pipeline.io.shards import Shard

DEFAULT_ROWS_PER_FILE = 10_000
DEFAULT_TASK_BYTES = 256 << 20  # input bytes one read task streams (a few units' worth)
DEFAULT_TASK_SHARDS = 1_000  # at most this many shards in one read task's arguments


@dataclass(frozen=True)
class ShardTask:
    """One shard to read; rows of the pieces in ``skip`` were committed before (not decoded,
    not predicted, not written again). ``rows``: a slice ``(start, stop)`` of the shard's rows
    (``stop`` None: to its end) when several read tasks share one big shard (``slice_tasks``);
    None: all of them."""

    shard: Shard
    skip: frozenset[int] = frozenset()
    rows: tuple[int, int | None] | None = None


@dataclass(frozen=True)
class ReadTask:
    """Consecutive shards that one read task streams, in order."""

    index: int
    shards: tuple[ShardTask, ...]

    @property
    def bytes(self) -> int:
        return sum(t.shard.size for t in self.shards)


@dataclass(frozen=True)
class Segment:
    """Input rows ``start:stop`` of a unit belong to piece ``piece`` of shard ``shard`` (the
    index of the shard in its read task), from input row ``first_row`` of that piece on; their
    output rows are ``out_start:out_stop`` of the unit's arrays. ``ends``: the piece's last row
    is in this unit; ``last``: that piece is the shard's last."""

    shard: int
    piece: int
    start: int
    stop: int
    first_row: int
    ends: bool
    last: bool
    out_start: int = 0
    out_stop: int = 0


@dataclass
class UnitHeader:
    """What the driver learns of a unit: its place in its read task and its pieces. ``rows``
    counts input rows, ``out_rows`` the rows of its arrays (more with several faces an image).
    ``device_decode``: images the predictor decoded (``--decode gpu``), by outcome: ``ok`` on
    the device, else why they took the CPU path (``gpu_decode.FALLBACK_REASONS``).
    ``read_node`` / ``predict_node``: the nodes that read and predicted the unit, and
    ``out_bytes`` the size of its predicted rows (the locality figures of the run).
    The rest is where its time went, for the run's figures: when its read began (epoch
    seconds), the read's wall and CPU seconds, the predictor call's seconds, Ray's attempt
    numbers of the read task and the call (0: first run), and the predictor's running totals
    after the call (``executor.PredictorFigures``)."""

    task: int
    index: int
    rows: int = 0
    bytes: int = 0
    segments: list[Segment] = field(default_factory=list)
    out_rows: int = 0
    device_decode: dict[str, int] = field(default_factory=dict)
    read_node: str = ""
    predict_node: str = ""
    out_bytes: int = 0
    input_bytes: int = 0  # the bytes of its samples' images as read from the input
    started_at: float = 0.0
    read_s: float = 0.0
    read_cpu_s: float = 0.0
    read_attempt: int = 0
    predict_s: float = 0.0
    predict_attempt: int = 0
    predictor: Any = None


def expand_header(header: UnitHeader, source_rows) -> UnitHeader:
    """The header of a unit whose rows a later stage expanded (the predictor, finding faces):
    row ``j`` of the new arrays came from row ``source_rows[j]`` of the unit's arrays
    (non-decreasing, every row kept at least once)."""
    import numpy as np

    source = np.asarray(source_rows)
    if np.any(np.diff(source) < 0) or len(np.unique(source)) != header.out_rows:
        raise ValueError("expanded rows must keep their order and keep every row")
    segments = [replace(seg, out_start=int(np.searchsorted(source, seg.out_start, "left")),
                        out_stop=int(np.searchsorted(source, seg.out_stop, "left")))
                for seg in header.segments]
    return replace(header, segments=segments, out_rows=len(source))


def plan_read_tasks(
    todo: Iterable[ShardTask], task_bytes: int = DEFAULT_TASK_BYTES,
    task_shards: int = DEFAULT_TASK_SHARDS, min_tasks: int = 1,
) -> list[ReadTask]:
    """Group shards, in listing order, into read tasks of about ``task_bytes`` listed bytes and
    at most ``task_shards`` shards; a shard larger than that is a task of its own. With fewer
    bytes than ``min_tasks`` tasks' worth, the target shrinks so the cluster's read slots all
    get work (never below one shard a task)."""
    todo = list(todo)
    total = sum(t.shard.size for t in todo)
    target = max(1, min(task_bytes, total // max(1, min_tasks)))
    tasks, current, size = [], [], 0
    for item in todo:
        if current and (size + item.shard.size > target or len(current) >= task_shards):
            tasks.append(ReadTask(len(tasks), tuple(current)))
            current, size = [], 0
        current.append(item)
        size += item.shard.size
    if current:
        tasks.append(ReadTask(len(tasks), tuple(current)))
    return tasks


def slice_tasks(tasks: list[ReadTask], lanes: int, rows_of: Callable[[Shard], int | None],
                min_rows: int) -> list[ReadTask]:
    """Give ``lanes`` read lanes work from the start when there are fewer tasks than lanes:
    a task of one shard (a shard bigger than a task's share of bytes) is cut into slices of
    consecutive rows, each its own task, in proportion to the shards' bytes. ``rows_of`` says
    how many rows a shard holds (an estimate will do: the last slice reads to the shard's end,
    and a slice past the end reads nothing) or None when it cannot tell; a slice holds at least
    ``min_rows`` rows. Slices change no name: pieces are still cut at every ``rows_per_file``
    rows of the shard, and a piece whose rows come from two slices is committed once both are
    in (``PieceAssembler`` keyed by shard). Each slice streams the shard from its start but
    decodes only its own rows."""
    if len(tasks) >= lanes:
        return tasks
    single = [t for t in tasks if len(t.shards) == 1 and t.shards[0].rows is None]
    spare = lanes - len(tasks)
    total = sum(t.bytes for t in single) or 1
    out = []
    for task in tasks:
        if task not in single:
            out.append(task)
            continue
        item = task.shards[0]
        rows = rows_of(item.shard)
        want = 1 + round(spare * task.bytes / total)
        count = min(want, rows // max(1, min_rows)) if rows else 1
        if count <= 1:
            out.append(task)
            continue
        step = -(-rows // count)
        for k in range(count):
            stop = None if k == count - 1 else (k + 1) * step
            out.append(ReadTask(0, (replace(item, rows=(k * step, stop)),)))
    return [ReadTask(i, t.shards) for i, t in enumerate(out)]


class UnitBuilder:
    """Cuts the row stream of a read task into units and pieces (used by the read task).

    Call ``add(shard, row, is_last_row, nbytes)`` for every row in order (``row`` counts from 0
    within its shard, ``is_last_row`` when no row of that shard follows), ``empty_shard(shard)``
    for a shard without rows, and ``cut()`` / ``flush()`` to take finished units. A unit is
    finished when it reaches ``unit_rows`` rows or ``unit_bytes`` bytes."""

    def __init__(self, task: int, rows_per_file: int, unit_rows: int, unit_bytes: int):
        if min(rows_per_file, unit_rows, unit_bytes) < 1:
            raise ValueError("rows_per_file, unit_rows and unit_bytes must be >= 1")
        self.task, self.rows_per_file = task, rows_per_file
        self.unit_rows, self.unit_bytes = unit_rows, unit_bytes
        self.units = 0
        self.header = UnitHeader(task, 0)

    def piece_of(self, row: int) -> int:
        return row // self.rows_per_file

    def add(self, shard: int, row: int, is_last_row: bool, nbytes: int, out_rows: int = 1
            ) -> bool:
        """Record one input row and its ``out_rows`` output rows; returns True when the unit is
        full (take it with ``flush``): at ``unit_rows`` output rows or ``unit_bytes`` bytes."""
        h = self.header
        piece = self.piece_of(row)
        ends = is_last_row or (row + 1) % self.rows_per_file == 0
        seg = h.segments[-1] if h.segments else None
        if seg is not None and (seg.shard, seg.piece) == (shard, piece):
            h.segments[-1] = replace(seg, stop=h.rows + 1, ends=ends, last=is_last_row,
                                     out_stop=h.out_rows + out_rows)
        else:
            h.segments.append(Segment(shard, piece, h.rows, h.rows + 1,
                                      row - piece * self.rows_per_file, ends, is_last_row,
                                      h.out_rows, h.out_rows + out_rows))
        h.rows += 1
        h.out_rows += out_rows
        h.bytes += nbytes
        return h.out_rows >= self.unit_rows or h.bytes >= self.unit_bytes

    def empty_shard(self, shard: int) -> None:
        """A shard without a single row still gets its (empty) piece 0."""
        h = self.header
        h.segments.append(Segment(shard, 0, h.rows, h.rows, 0, True, True, h.out_rows,
                                  h.out_rows))

    def pending(self) -> bool:
        return bool(self.header.segments)

    def flush(self) -> UnitHeader:
        """Take the unit built so far and start the next one."""
        done = self.header
        self.units += 1
        self.header = UnitHeader(self.task, self.units)
        return done


@dataclass
class _OpenPiece:
    parts: list = field(default_factory=list)  # (first row in piece, unit, (start, stop))
    rows: int = 0
    total: int | None = None
    last: bool = False


@dataclass(frozen=True)
class ReadyPiece:
    """Every row of a piece has been predicted: ``parts`` are ``(unit, (out_start, out_stop))``
    in row order (an empty shard's piece has one empty range). ``task`` / ``shard``: the unit
    that completed it and the shard's index in that unit's task."""

    task: int
    shard: int
    piece: int
    last: bool
    parts: list


class PieceAssembler:
    """Collects predicted units by piece; a piece is ready once all its rows are in, whatever
    order the units come back in (they come from several predictors, and from several read
    tasks when a shard is sliced). Holds only the opaque ``unit`` handles given to ``add`` (on
    Ray: object references), never rows. Pieces are keyed by ``(shard key, piece)``; the shard
    key of a segment is ``shard_key(index in its task)`` when given (slices of one shard
    share it), else ``(task, index)``."""

    def __init__(self):
        self.open: dict[tuple[Hashable, int], _OpenPiece] = {}

    def add(self, header: UnitHeader, unit,
            shard_key: Callable[[int], Hashable] | None = None) -> list[ReadyPiece]:
        ready = []
        for seg in header.segments:
            key = (shard_key(seg.shard) if shard_key else (header.task, seg.shard), seg.piece)
            piece = self.open.setdefault(key, _OpenPiece())
            if seg.stop > seg.start:
                piece.parts.append((seg.first_row, unit, (seg.out_start, seg.out_stop)))
                piece.rows += seg.stop - seg.start
            if seg.ends:
                piece.total, piece.last = seg.first_row + seg.stop - seg.start, seg.last
            if piece.rows == piece.total:
                del self.open[key]
                parts = [(u, r) for _, u, r in sorted(piece.parts, key=lambda p: p[0])]
                ready.append(ReadyPiece(header.task, seg.shard, seg.piece, piece.last,
                                        parts or [(unit, (seg.out_start, seg.out_start))]))
        return ready
