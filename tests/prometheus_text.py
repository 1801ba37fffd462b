"""Reading Prometheus' text format from a live endpoint (Ray's metrics port), for the tests."""

from __future__ import annotations

import time
import urllib.request
from collections import Counter
from collections.abc import Callable

from pushgateway_server import _split_labels


def scrape(url: str, prefix: str = "ray_landmarks_") -> Counter:
    """``(name, kind-or-reason tag or "") -> value`` summed over every other label (Ray's
    node, worker and session tags), for the samples whose name starts with ``prefix``."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out: Counter = Counter()
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        head, value = line.rsplit(" ", 1)
        name, labels = head, {}
        if "{" in head:
            name, rest = head.split("{", 1)
            labels = dict(item.split("=", 1) for item in _split_labels(rest.rstrip("}")))
        tag = labels.get("kind") or labels.get("reason") or labels.get("le") or '""'
        out[(name, tag.strip('"'))] += float(value)
    return out


def wait_for(read: Callable[[], Counter], check: Callable[[Counter], bool],
             deadline_s: float = 60.0) -> Counter:
    """Read until ``check`` holds (Ray's workers report every second in the tests; the
    deadline only bounds a failure), returning the last reading either way."""
    end = time.monotonic() + deadline_s
    while True:
        seen = read()
        if check(seen) or time.monotonic() > end:
            return seen
        time.sleep(0.5)


def settled(url: str, quiet_s: float = 5.0, deadline_s: float = 60.0) -> Counter:
    """A reading once nothing changed for ``quiet_s`` (five of the tests' 1 s report
    intervals): figures of earlier jobs still on their way have arrived, so a difference taken
    from here on is a later job's alone."""
    last, since = scrape(url), time.monotonic()
    end = since + deadline_s
    while time.monotonic() - since < quiet_s and time.monotonic() < end:
        time.sleep(0.5)
        now = scrape(url)
        if now != last:
            last, since = now, time.monotonic()
    return last
