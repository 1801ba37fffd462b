"""A real Prometheus Pushgateway (Debian's ``prometheus-pushgateway``) on loopback, and a reader
of what it holds."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import urllib.request

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


def samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample the gateway exposes: ``(name, labels, value)``."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, labels = head, {}
        if "{" in head:
            name, rest = head.split("{", 1)
            for item in _split_labels(rest.rstrip("}")):
                key, raw = item.split("=", 1)
                labels[key] = raw[1:-1].encode().decode("unicode_escape")
        out.append((name, labels, float(value)))
    return out


def _split_labels(text: str) -> list[str]:
    items, current, quoted, escaped = [], "", False, False
    for ch in text:
        if ch == "," and not quoted:
            items.append(current)
            current = ""
            continue
        current += ch
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
    if current:
        items.append(current)
    return items


def series(url: str, job: str) -> dict[tuple[str, tuple], float]:
    """The samples of ``job``'s groups: ``(name, sorted labels without job/instance) -> value``."""
    found = {}
    for name, labels, value in samples(url):
        if labels.get("job") != job or not name.startswith("landmarks_"):
            continue
        rest = tuple(sorted((k, v) for k, v in labels.items() if k not in ("job", "instance")))
        found[(name, rest)] = value
    return found
