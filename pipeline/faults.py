"""Deliberate process deaths, for the failure tests (chaos testing), off unless asked for.

A plan such as ``"dir=/tmp/marks;read=faces-00001@3;predict=2"`` makes the read task that
reaches row 3 of shard ``faces-00001`` die, and the predictor process that starts its 2nd batch
die, each once: the first process to get there leaves a marker file in ``dir`` and exits at
once, like a process killed by the OOM killer or a lost node, so Ray's own recovery (task retries,
actor restarts) is what the tests exercise.
"""

from __future__ import annotations

import os
from pathlib import Path


class FaultPlan:
    def __init__(self, plan: str = ""):
        fields = dict(part.split("=", 1) for part in plan.split(";") if part)
        unknown = set(fields) - {"dir", "read", "predict"}
        if unknown:
            raise ValueError(f"unknown fault injection points {sorted(unknown)}")
        if fields and "dir" not in fields:
            raise ValueError("a fault plan needs dir=<folder for its once-only markers>")
        self.dir = Path(fields["dir"]) if fields else None
        self.read = fields.get("read")
        self.predict = int(fields["predict"]) if "predict" in fields else None

    def _die_once(self, name: str) -> None:
        marker = self.dir / name
        try:
            marker.touch(exist_ok=False)
        except FileExistsError:
            return  # this fault already happened: the retry goes through
        os._exit(137)

    def at_read(self, shard_name: str, row: int) -> None:
        if self.read == f"{shard_name}@{row}":
            self._die_once(f"read-{shard_name}-{row}")

    def at_predict(self, batch_number: int) -> None:
        if self.predict == batch_number:
            self._die_once(f"predict-{batch_number}")
