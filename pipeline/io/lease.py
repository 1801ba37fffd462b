"""One run at a time per output: a lease object, ``OUTPUT/_lease.json``.

Two runs on the same output would race: one run's sweep of stale temporary files deletes the
other's file in flight, and a data file and its completion record can come from different
models. A run therefore takes the output's lease before it touches anything there: a small JSON
object naming the run (id, host, process, start) and a heartbeat that a thread renews every
``HEARTBEAT_S``. Another run that finds a fresh lease refuses to start and says whose it is; a
lease whose heartbeat is older than ``EXPIRES_S``, or whose process on this same host is gone,
belonged to a run that died and is taken over with a warning; ``--break-lease`` takes over a
lease at once (for a run known to be dead elsewhere).

Every write of the lease is conditional where the store has a compare-and-swap
(``pipeline.io.storage.write_if``): a missing lease is created only if it is still missing (S3
``If-None-Match: *``), and one is renewed or taken over only if it is still the version this run
read (S3 ``If-Match: ETag``; local files: compare and rename under a ``flock`` of the folder).
So of two runs that start at the same moment exactly one gets the lease, however slow their
writes, and a heartbeat never overwrites a lease another run took meanwhile. On stores without
conditional writes (GCS through fsspec, memory, ...) the runs are told apart by writing,
waiting ``SETTLE_S`` and reading back: the later writer wins, the other sees a foreign record
and stops. The heartbeat also reads before it writes: a run whose lease was taken over stops at
its next commit (``lost``), before it writes another file.

Identity and time, as containers and clusters have them:

- a lease is owned by a random ``token``; "its process is gone" is judged only for a lease
  written on this machine (its boot id) in this PID namespace: pods with ``hostNetwork`` share a
  host name and reuse each other's pids;
- no clock is compared across hosts: a lease from another machine is expired when its ``beat``
  counter has not moved for ``watch_s`` of this run's own clock (a lease whose heartbeat merely
  looks old may come from a host whose clock is behind);
- fencing: each commit reads the lease and writes its completion record only while the lease
  still carries this run's token (``check_token``), so a run that lost the lease, whatever its
  heartbeat thread knows, commits no more records.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from pipeline.config.errors import BadInput, JobFailed
from pipeline.io.storage import (
    filesystem,
    protocol_of,
    read_bytes,
    read_tagged,
    retry,
    write_bytes,
    write_if,
)

log = logging.getLogger("pipeline")

LEASE_FILE = "_lease.json"
HEARTBEAT_S = 30.0
EXPIRES_S = 300.0  # ten missed heartbeats: the run is gone
SETTLE_S = {"local": 0.1, "remote": 1.0}  # local files are replaced atomically


class LeaseHeld(BadInput):
    """Another live run holds the output (exit status 2: nothing was done)."""


class LeaseLost(JobFailed):
    """This run's lease was taken over by another run: it stops before writing more."""


def _now() -> float:
    return time.time()


def _describe(record: Mapping[str, Any], now: float) -> str:
    age = now - float(record.get("heartbeat", 0))
    return (f"run {record.get('run_id')} on host {record.get('host')} (pid {record.get('pid')}, "
            f"started {record.get('started')}, last heartbeat {age:.0f} s ago)")


def machine() -> dict[str, str]:
    """This process's machine and PID namespace: what makes a pid mean one process."""
    def read(path: str, how) -> str:
        try:
            return how(path)
        except OSError:
            return ""

    return {"host": socket.gethostname(),
            "boot_id": read("/proc/sys/kernel/random/boot_id",
                            lambda p: open(p).read().strip()),
            "pid_ns": read("/proc/self/ns/pid", os.readlink)}


def _same_machine(record: Mapping[str, Any]) -> bool:
    here = machine()
    return bool(here["boot_id"]) and record.get("boot_id") == here["boot_id"]


def _process_gone(record: Mapping[str, Any]) -> bool:
    """The lease's run was on this machine, in this PID namespace, and its process no longer
    exists (killed, crashed): a rerun there need not wait for the heartbeat to expire. A
    lease from another machine or namespace is never judged by its pid."""
    pid = record.get("pid")
    here = machine()
    if (not isinstance(pid, int) or not here["pid_ns"] or record.get("host") != here["host"]
            or record.get("boot_id") != here["boot_id"]
            or record.get("pid_ns") != here["pid_ns"]):
        return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # it exists, owned by someone else
        return False
    return False


class Lease:
    """The lease of ``output`` for run ``run_id``; ``with Lease(...) as lease:`` holds it."""

    def __init__(self, output: str, run_id: str,
                 storage_options: Mapping[str, Any] | None = None, *,
                 break_lease: bool = False, heartbeat_s: float = HEARTBEAT_S,
                 expires_s: float = EXPIRES_S, settle_s: float | None = None,
                 watch_s: float | None = None):
        self.uri = f"{output.rstrip('/')}/{LEASE_FILE}"
        self.run_id, self.storage_options = run_id, storage_options
        self.break_lease = break_lease
        self.heartbeat_s, self.expires_s = heartbeat_s, expires_s
        local = protocol_of(output) in ("file", "local")
        self.settle_s = SETTLE_S["local" if local else "remote"] if settle_s is None else settle_s
        # A lease from another machine whose heartbeat looks expired is watched this long (on
        # this run's clock) for a beat before it is taken over: two heartbeats.
        self.watch_s = 2 * heartbeat_s if watch_s is None else watch_s
        self.token = secrets.token_hex(16)
        self.beat = 0
        self.record = {"run_id": run_id, "token": self.token, **machine(), "pid": os.getpid(),
                       "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        return self._read_tagged()[0]

    def _read_tagged(self) -> tuple[dict[str, Any] | None, str | None]:
        """The lease record and the tag of its version (None, None: no lease)."""
        found = read_tagged(self.uri, self.storage_options)
        if found is None:
            return None, None
        try:
            record = json.loads(found[0])
        except ValueError:  # a torn or foreign file: nobody's lease
            record = None
        return (record if isinstance(record, dict) else None), found[1]

    def _data(self) -> bytes:
        self.beat += 1
        return json.dumps({**self.record, "beat": self.beat, "heartbeat": _now()}).encode()

    def _write(self) -> None:
        write_bytes(self.uri, self._data(), self.storage_options)

    def _write_over(self, tag: str | None) -> bool | None:
        """Write the lease only over the version ``tag`` (None: only where there is none):
        True written, False another run wrote first, None the store cannot say."""
        return write_if(self.uri, self._data(), tag, self.storage_options)

    def _still_beating(self, seen: Mapping[str, Any]) -> bool:
        """Watch a foreign lease for ``watch_s`` of this clock: whether its holder wrote a
        new beat (or another run took it) meanwhile."""
        deadline = time.monotonic() + self.watch_s
        while time.monotonic() < deadline:
            time.sleep(min(self.heartbeat_s / 4, max(0.0, deadline - time.monotonic())))
            now = self.read()
            if not now or (now.get("token"), now.get("beat"), now.get("heartbeat")) != (
                    seen.get("token"), seen.get("beat"), seen.get("heartbeat")):
                return True
        return False

    def acquire(self) -> None:
        """Take the lease, or raise ``LeaseHeld`` naming the live run that has it."""
        current, tag = self._read_tagged()
        if current and current.get("run_id") != self.run_id:
            now = _now()
            fresh = now - float(current.get("heartbeat", 0)) < self.expires_s
            gone = fresh and _process_gone(current)
            if (not fresh and not self.break_lease and not _same_machine(current)
                    and self._still_beating(current)):
                # Its heartbeat looked old by this clock, yet it beats: another host's clock
                # is behind ours. Never take a live run's lease for a clock's sake.
                fresh = True
                current = self.read() or current
            if fresh and not gone and not self.break_lease:
                raise LeaseHeld(f"{self.uri.rsplit('/', 1)[0]} is being written by "
                                f"{_describe(current, now)}: wait for it to end, or, if that "
                                "run is dead, rerun with --break-lease")
            log.warning("taking over the output's lease from %s (%s)", _describe(current, now),
                        "its heartbeat expired" if not fresh else
                        "its process on this host is gone" if gone else "--break-lease")
        # Over the version read above (or only where none is): a run that wrote meanwhile wins.
        written = self._write_over(tag)
        if written is None:  # no conditional write here: write, wait, the later one wins
            self._write()
            time.sleep(self.settle_s)
        current = None if written else self.read()  # (the holder, for the message)
        if not written and (written is False or not current
                            or current.get("token") != self.token):
            raise LeaseHeld(f"{self.uri.rsplit('/', 1)[0]} was taken at the same moment by "
                            f"{_describe(current or {}, _now())}: wait for it to end")
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current, tag = self._read_tagged()
                if current and current.get("token") != self.token:
                    self.lost = _describe(current, _now())
                    log.error("the output's lease was taken over by %s: stopping", self.lost)
                    return
                if self._write_over(tag) is None:
                    self._write()
                # (False: it changed since the read: the next beat sees who has it)
            except Exception as exc:  # a missed beat; the next one may get through
                log.warning("could not renew the output's lease %s: %s", self.uri, exc)

    def check_token(self) -> None:
        """Fencing, for the commit of a file's record: raise ``LeaseLost`` unless the lease
        in storage still carries this run's token."""
        check_token(self.uri, self.token, self.storage_options)

    def check(self) -> None:
        """Raise ``LeaseLost`` when another run has taken the lease (call before writing)."""
        if self.lost:
            raise LeaseLost(f"another run took over this output's lease: {self.lost}; this "
                            "run stopped, the files it committed stay")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        current = self.read()
        if current and current.get("token") == self.token:
            fs, path = filesystem(self.uri, self.storage_options)
            retry(lambda: fs.rm_file(path), self.uri, "delete")

    def __enter__(self) -> Lease:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def check_token(uri: str, token: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Raise ``LeaseLost`` unless the lease at ``uri`` carries ``token`` (see ``Lease``)."""
    try:
        current = json.loads(read_bytes(uri, storage_options))
    except (FileNotFoundError, ValueError):
        current = None
    if not current or current.get("token") != token:
        holder = _describe(current, _now()) if current else "nobody (the lease is gone)"
        raise LeaseLost(f"this run no longer holds the output's lease (it is held by {holder}): "
                        "its commits stop before writing another record")
