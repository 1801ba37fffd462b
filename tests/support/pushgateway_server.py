"""A real Prometheus Pushgateway (Debian's ``prometheus-pushgateway``) on loopback, and a reader
of what it holds."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request

from .prometheus_text import samples

BINARY = "prometheus-pushgateway"


def start(tmp_dir) -> tuple[str, subprocess.Popen] | None:
    """``(url, process)`` of a fresh gateway, or None when the binary is not installed."""
    binary = shutil.which(BINARY)
    if binary is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_dir / "pushgateway.log", "wb")  # noqa: SIM115 (open while it runs)
    proc = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:  # ready when it answers; give up only if it exits or never answers
        try:
            with urllib.request.urlopen(f"{url}/-/ready", timeout=1):
                return url, proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{BINARY} did not start: "
                                   f"{(tmp_dir / 'pushgateway.log').read_text()[-2000:]}") from None
            time.sleep(0.1)


def series(url: str, job: str) -> dict[tuple[str, tuple], float]:
    """The samples of ``job``'s groups: ``(name, sorted labels without job/instance) -> value``."""
    found = {}
    for name, labels, value in samples(f"{url}/metrics"):
        if labels.get("job") != job or not name.startswith("landmarks_"):
            continue
        rest = tuple(sorted((k, v) for k, v in labels.items() if k not in ("job", "instance")))
        found[(name, rest)] = value
    return found
