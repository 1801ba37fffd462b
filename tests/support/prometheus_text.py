"""Reading Prometheus' text format from a live endpoint (Ray's metrics port, a Pushgateway), for
the tests."""

from __future__ import annotations

import time
import urllib.request
from collections import Counter
from collections.abc import Callable


def samples(url: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample ``url`` exposes: ``(name, labels, value)``."""
    with urllib.request.urlopen(url, timeout=10) as response:
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


def scrape(url: str, prefix: str = "ray_landmarks_") -> Counter:
    """``(name, kind-or-reason tag or "") -> value`` summed over every other label (Ray's
    node, worker and session tags), for the samples whose name starts with ``prefix``."""
    out: Counter = Counter()
    for name, labels, value in samples(url):
        if name.startswith(prefix):
            tag = labels.get("kind") or labels.get("reason") or labels.get("le") or ""
            out[(name, tag)] += value
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
