"""Test data builders shared by the test modules."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

DATA = Path(__file__).parent / "data"


def real_photo(name: str) -> tuple[bytes, dict]:
    """Image bytes and a sidecar whose face box is the labelled landmarks' extent."""
    labels = json.loads((DATA / f"{name.rsplit('.', 1)[0]}.json").read_text())
    xs = [p[0] for p in labels["landmarks"]]
    ys = [p[1] for p in labels["landmarks"]]
    sidecar = {"bbox": [min(xs), min(ys), max(xs), max(ys)], "landmarks": labels["landmarks"]}
    return (DATA / name).read_bytes(), sidecar


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar file with the given (name, bytes) members, in order."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def sidecar(meta: dict) -> bytes:
    return json.dumps(meta).encode()
