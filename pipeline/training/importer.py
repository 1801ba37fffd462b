"""Import the common public layout of landmark data sets into labelled tar shards.

300-W, HELEN, LFPW, AFW and iBUG ship as folders of images, each beside a ``.pts`` file of the
same stem holding 68 points (``version: 1``, ``n_points: 68``, ``{``, 68 lines ``x y``, ``}``),
counted from 1 (Matlab) or from 0 depending on the source: the user states which. A ``.json``
file with ``landmarks`` works the same way. The result is what ``pipeline.stages.labels`` reads.
"""

from __future__ import annotations

import io
import json
import posixpath
import tarfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

import numpy as np

from pipeline.config.errors import BadInput
from pipeline.io.shards import IMAGE_EXTENSIONS
from pipeline.model.geometry import NUM_LANDMARKS
from pipeline.stages.labels import bbox_from_landmarks, parse_landmarks
from pipeline.stages.preprocess import SampleError

ANNOTATIONS = ("pts", "json")


def parse_pts(text: str, origin: int) -> list[list[float]]:
    """A 300-W ``.pts`` file -> 68 ``[x, y]`` 0-based pixels. ``origin``: 1 when the file counts
    pixels from 1 (300-W's Matlab convention), 0 when from 0. Raises ``ValueError`` if malformed."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "{" not in lines or "}" not in lines:
        raise ValueError("not a .pts file: no '{' ... '}' block")
    start, end = lines.index("{"), lines.index("}")
    header = dict(line.split(":", 1) for line in lines[:start] if ":" in line)
    declared = header.get("n_points", "").strip()
    rows = [line.split() for line in lines[start + 1 : end]]
    if declared and declared != str(len(rows)):
        raise ValueError(f"n_points is {declared} but the file lists {len(rows)} points")
    if len(rows) != NUM_LANDMARKS or any(len(r) != 2 for r in rows):
        raise ValueError(f"need {NUM_LANDMARKS} lines of 'x y', got {len(rows)} points")
    return [[_shift(v, origin) for v in row] for row in rows]


def _shift(value: object, origin: int) -> float:
    # Decimal arithmetic: "32.31" - 1 is exactly 31.31, where float arithmetic is not.
    try:
        return float(Decimal(str(value)) - origin)
    except InvalidOperation:
        raise ValueError(f"not a number: {value!r}") from None


@dataclass
class ImportSummary:
    """What ``import_annotated_folder`` wrote and what it left out (path, reason)."""

    shards: list[str] = field(default_factory=list)
    samples: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def import_annotated_folder(
    input_uri: str,
    output_uri: str,
    origin: int,
    annotation: str = "pts",
    per_shard: int = 1000,
    storage_options: Mapping[str, Any] | None = None,
) -> ImportSummary:
    """Turn a folder of images, each beside an annotation file of the same stem (``face.jpg`` +
    ``face.pts``, or ``face.json`` holding ``landmarks``), into labelled tar shards
    ``part-00000.tar`` ... under ``output_uri``. The folder is searched recursively and sorted; the
    key is the relative path without extension (dots -> ``_``, since a tar key ends at the first
    dot). The sidecar holds ``landmarks`` (0-based), ``bbox`` (their extent), ``scheme`` and
    ``source``. Images without annotation and unreadable annotations are skipped and listed."""
    from pipeline.io.storage import filesystem

    if origin not in (0, 1):
        raise BadInput(f"origin must be 0 or 1 (how the annotation counts pixels), got {origin}")
    if annotation not in ANNOTATIONS:
        raise BadInput(f"annotation must be one of {ANNOTATIONS}, got {annotation!r}")
    if per_shard < 1:
        raise BadInput(f"per_shard must be >= 1, got {per_shard}")
    fs, root = filesystem(input_uri, storage_options)
    if not fs.isdir(root):
        raise FileNotFoundError(f"input folder not found: {input_uri}")
    paths = sorted(fs.find(root))
    notes = {posixpath.splitext(p)[0] for p in paths if p.endswith("." + annotation)}
    images: dict[str, list[str]] = {}
    for path in paths:
        if path.lower().endswith(IMAGE_EXTENSIONS):
            images.setdefault(posixpath.splitext(path)[0], []).append(path)
    summary = ImportSummary()
    pairs = []
    for stem in sorted(set(images) | notes):
        found = images.get(stem, [])
        if stem not in notes:
            summary.skipped += [(p, f"no .{annotation} file") for p in found]
        elif len(found) != 1:
            why = "no image" if not found else f"several images share the stem: {found}"
            summary.skipped.append((f"{stem}.{annotation}", why))
        else:
            pairs.append((stem, found[0]))

    labelled = []
    for stem, image_path in pairs:
        text = fs.cat_file(f"{stem}.{annotation}").decode("utf-8", errors="replace")
        try:
            if annotation == "pts":
                points = parse_pts(text, origin)
            else:
                points = [[_shift(v, origin) for v in p] for p in json.loads(text)["landmarks"]]
            parse_landmarks(points)
        except (ValueError, KeyError, TypeError, SampleError) as exc:
            summary.skipped.append((f"{stem}.{annotation}", str(exc)))
            continue
        meta = {
            "landmarks": points,
            "bbox": bbox_from_landmarks(np.asarray(points)),
            "scheme": "ibug68",
            "source": posixpath.relpath(image_path, root),
        }
        labelled.append((posixpath.relpath(stem, root).replace(".", "_"), image_path, meta))

    out_fs, out_root = filesystem(output_uri, storage_options)
    out_fs.makedirs(out_root, exist_ok=True)
    protocol = output_uri.split("://", 1)[0] + "://" if "://" in output_uri else ""
    for start in range(0, len(labelled), per_shard):
        path = f"{out_root.rstrip('/')}/part-{start // per_shard:05d}.tar"
        # Streamed member by member: a shard of large photos never sits in memory whole.
        with out_fs.open(path, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
            for key, image_path, meta in labelled[start : start + per_shard]:
                _add(tar, key + posixpath.splitext(image_path)[1].lower(), fs.cat_file(image_path))
                _add(tar, key + ".json", json.dumps(meta).encode("utf-8"))
        summary.shards.append(protocol + path)
    summary.samples = len(labelled)
    return summary


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed: byte-identical reruns
    tar.addfile(info, io.BytesIO(data))
