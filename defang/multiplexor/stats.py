"""Counters and latencies the multiplexor reports in ``defangctl status``.

Bounded: latencies live in a ring of the last ``RING`` decisions; rates come from
per-second buckets kept for 15 minutes.  Recording costs a few list operations, so it
sits in the hot path without showing up in a profile.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

RING = 10000
MAX_TAGS = 1000  # distinct tags counted; more are counted as "(other)" (a filter may make names)
HORIZON = 900  # seconds of per-second buckets (15 minutes)
# Histogram bucket upper bounds in seconds (the last is +inf).
BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Stats:
    def __init__(self) -> None:
        self.verdicts: Counter[str] = Counter()  # eom verdicts: accept, reject, ...
        self.requests: Counter[str] = Counter()  # per op
        self.events: Counter[str] = Counter()  # busy, worker_lost, filter error in ..., ...
        self.would: Counter[str] = Counter()  # monitor mode's refusals, by kind: reject, drop, ...
        self.tags: Counter[str] = Counter()  # what the filter named as having fired
        self.latencies: deque[float] = deque(maxlen=RING)
        self.histogram = [0] * (len(BUCKETS) + 1)
        self._seconds: deque[list[int]] = deque()  # [epoch second, messages]

    def record(self, op: str, verdict: str, latency: float, error: str | None,
               would: list[str] = (), tags: list[str] = ()) -> None:  # type: ignore[assignment]  # fmt: skip
        self.requests[op] += 1
        if error:  # by kind ("filter error in filter_end"), not by text: the keys stay few
            self.events[error.split(":", 1)[0]] += 1
        for entry in would:
            self.would[entry.split(" ", 1)[0]] += 1
        for tag in tags:
            self.tags[tag if tag in self.tags or len(self.tags) < MAX_TAGS else "(other)"] += 1
        if op != "eom":
            return
        # at end of message "continue" means the message is accepted
        self.verdicts["accept" if verdict == "continue" else verdict] += 1
        self.latencies.append(latency)
        for i, bound in enumerate(BUCKETS):
            if latency <= bound:
                self.histogram[i] += 1
                break
        else:
            self.histogram[-1] += 1
        now = int(time.time())
        secs = self._seconds
        if secs and secs[-1][0] == now:
            secs[-1][1] += 1
        else:
            secs.append([now, 1])
            while secs and secs[0][0] <= now - HORIZON:
                secs.popleft()

    def count(self, event: str) -> None:
        self.events[event] += 1

    def rates(self) -> dict[str, float]:
        now = int(time.time())
        out = {}
        for label, window in (("1m", 60), ("5m", 300), ("15m", 900)):
            total = sum(n for t, n in self._seconds if t > now - window)
            out[label] = round(total / window, 2)
        return out

    def percentiles(self) -> dict[str, float | None]:
        data = sorted(self.latencies)
        if not data:
            return {"p50": None, "p95": None, "p99": None}

        def pick(q: float) -> float:
            return round(data[min(len(data) - 1, int(q * len(data)))] * 1000, 2)

        return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99)}

    def snapshot(self) -> dict[str, Any]:
        return {
            "verdicts": dict(self.verdicts),
            "requests": dict(self.requests),
            "events": dict(self.events),
            "would": dict(self.would),
            "tags": dict(self.tags),
            "messages_per_second": self.rates(),
            "latency_ms": self.percentiles(),
            "histogram": {
                "bounds_ms": [b * 1000 for b in BUCKETS],
                "counts": list(self.histogram),
            },
        }
