"""Deliberate process deaths and a slow store, for the failure tests (chaos testing), off
unless asked for.

No job setting turns them on: a test sets the environment variable ``LANDMARKS_FAULTS`` in the
driver's process (``monkeypatch.setenv``), the job reads it once with :func:`plan_from_env` and
hands the plan to its stages. A plan such as
``"dir=/tmp/marks;read=faces-00001@3;predict=2;commit=faces-00002"`` makes, each once:

- the read task that reaches row 3 of shard ``faces-00001`` die (after the units before that
  row were delivered: the marker file says how many);
- the predictor process die in its 2nd call, after computing that unit's landmarks and before
  returning them;
- the commit of piece ``faces-00002`` die after its Parquet file is written and before its
  completion record is;
- with ``step=N``, fine-tuning's rank 0 worker process die after training step N (Ray Train
  restarts the group from its last checkpoint, or the job fails when no restarts are left).
  It dies ``STEP_KILL_DELAY_S`` after the step: Ray Train's controller collects a worker's
  reports when it polls the workers (every 2 s), and a worker that dies sooner after a
  checkpoint report takes that checkpoint's registration with it (the files stay, the rerun
  starts from the checkpoint before). The tests are about the restart, not that window;
- with ``slow=S``, every row a read task passes over without processing it (the done pieces of
  a resumed shard) take S seconds more, as from a slow, far store: the stall watchdog must see
  such a read task as moving.

The first process to get there leaves a marker file in ``dir`` and exits at once, like a process
killed by the OOM killer or a lost node, so Ray's own recovery (task retries, actor restarts,
Ray Train's worker-group restarts) is what the tests exercise.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "LANDMARKS_FAULTS"
STEP_KILL_DELAY_S = 4.0


def plan_from_env() -> str:
    """The fault plan the test process asked for (``LANDMARKS_FAULTS``), or "" for none."""
    return os.environ.get(ENV, "")


class FaultPlan:
    def __init__(self, plan: str = ""):
        fields = dict(part.split("=", 1) for part in plan.split(";") if part)
        unknown = set(fields) - {"dir", "read", "predict", "commit", "step", "slow"}
        if unknown:
            raise ValueError(f"unknown fault injection points {sorted(unknown)}")
        if fields and "dir" not in fields:
            raise ValueError("a fault plan needs dir=<folder for its once-only markers>")
        self.dir = Path(fields["dir"]) if fields else None
        self.read = fields.get("read")
        self.predict = int(fields["predict"]) if "predict" in fields else None
        self.commit = fields.get("commit")
        self.step = int(fields["step"]) if "step" in fields else None
        self.slow = float(fields.get("slow", 0.0))

    def _first_time(self, name: str, note: str = "") -> bool:
        """Leave the marker ``name``; False when it was there (the fault already happened,
        the retry goes through)."""
        try:
            with open(self.dir / name, "x") as f:
                f.write(note)
        except FileExistsError:
            return False
        return True

    def _die_once(self, name: str, note: str = "") -> None:
        if self._first_time(name, note):
            os._exit(137)

    def at_read(self, shard_name: str, row: int, units_delivered: int = 0) -> None:
        if self.read == f"{shard_name}@{row}":
            self._die_once(f"read-{shard_name}-{row}", f"units_delivered={units_delivered}")

    def at_pass(self) -> None:
        if self.slow:
            time.sleep(self.slow)

    def at_predict(self, batch_number: int) -> None:
        if self.predict == batch_number:
            self._die_once(f"predict-{batch_number}")

    def at_commit(self, stem: str) -> None:
        if self.commit == stem:
            self._die_once(f"commit-{stem}")

    def at_step(self, step: int) -> None:
        if self.step == step and not (self.dir / f"step-{step}").exists():
            time.sleep(STEP_KILL_DELAY_S)
            self._die_once(f"step-{step}", f"pid={os.getpid()}")
