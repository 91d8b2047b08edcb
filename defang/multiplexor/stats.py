"""Counters and latencies the multiplexor reports in ``defangctl status``.

Bounded: latencies live in a ring of the last ``RING`` decisions; rates come from
per-second buckets kept for 15 minutes.  Recording costs a few list operations, so it
sits in the hot path without showing up in a profile.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections import Counter, deque
from typing import Any

RING = 10000
MAX_TAGS = 1000  # distinct tags counted; more are counted as "(other)" (a filter may make names)
ERRORS = 10  # the last errors kept for defangctl top
HORIZON = 900  # seconds of per-second buckets (15 minutes)
# Histogram bucket upper bounds in seconds (the last is +inf).
BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Histogram:
    """Counts per ``BUCKETS`` bound (not cumulative; the last: above them all) and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.sum = 0.0

    def add(self, seconds: float) -> None:
        self.sum += seconds
        self.counts[bisect_left(BUCKETS, seconds)] += 1  # the first bound >= seconds, else the last


class Stats:
    def __init__(self) -> None:
        self.verdicts: Counter[str] = Counter()  # eom verdicts: accept, reject, ...
        self.requests: Counter[str] = Counter()  # per op
        self.events: Counter[str] = Counter()  # busy, worker_lost, filter error in ..., ...
        self.would: Counter[str] = Counter()  # monitor mode's refusals, by kind: reject, drop, ...
        self.tags: Counter[str] = Counter()  # what the filter named as having fired
        self.latencies: deque[float] = deque(maxlen=RING)
        self.histogram = Histogram()  # eom latencies, for defangctl histo
        self._seconds: deque[list[int]] = deque()  # [epoch second, messages]
        # for the metrics (defang.multiplexor.metrics): per stage (op) the decision's time in
        # the multiplexor, its wait in the queue, the worker's time in the filter
        self.decision: dict[str, Histogram] = {}
        self.waited: dict[str, Histogram] = {}
        self.filtering: dict[str, Histogram] = {}
        self.checks: Counter[tuple[str, str]] = Counter()  # (scanner, outcome)
        self.actions: Counter[str] = Counter()  # by name, as the worker asked for them
        self.recycles: Counter[str] = Counter()  # workers let go, by reason
        self.reloads: Counter[str] = Counter()  # ok, failed
        self.errors: deque[str] = deque(maxlen=ERRORS)  # the last ones, for defangctl top

    def record(self, op: str, verdict: str, latency: float, error: str | None,
               would: list[str] = (), tags: list[str] = (), *, waited: float = 0.0,  # type: ignore[assignment]
               elapsed: float = 0.0, checks: list[str] = (), actions: list[list] = (),  # type: ignore[assignment]
               qid: str = "") -> None:  # fmt: skip
        self.requests[op] += 1
        # latency: from the worker's start; the decision: from the request's arrival
        for table, seconds in ((self.decision, waited + latency), (self.waited, waited),
                               (self.filtering, elapsed)):  # fmt: skip
            histo = table.get(op)
            if histo is None:
                histo = table[op] = Histogram()
            histo.add(seconds)
        for check in checks:
            name, _, outcome = check.partition(" ")[0].partition(":")
            self.checks[(name, outcome)] += 1
        for action in actions:
            self.actions[action[0]] += 1
        if error:  # by kind ("filter error in filter_end"), not by text: the keys stay few
            self.events[error.split(":", 1)[0]] += 1
            self.errors.append(f"{time.strftime('%H:%M:%S')} {qid or '-'} {op}: {error[:200]}")
        for entry in would:
            self.would[entry.split(" ", 1)[0]] += 1
        for tag in tags:
            self.tags[tag if tag in self.tags or len(self.tags) < MAX_TAGS else "(other)"] += 1
        if op != "eom":
            return
        # at end of message "continue" means the message is accepted
        self.verdicts["accept" if verdict == "continue" else verdict] += 1
        self.latencies.append(latency)
        self.histogram.add(latency)
        now = int(time.time())
        secs = self._seconds
        if secs and secs[-1][0] == now:
            secs[-1][1] += 1
        else:
            secs.append([now, 1])
            while secs and secs[0][0] <= now - HORIZON:
                secs.popleft()

    def count(self, event: str, what: str = "", *, error: bool = True) -> None:
        """One more ``event``; an ``error`` (all but a worker's normal exit) also goes to the
        last errors ``defangctl top`` shows, after ``what`` it was about."""
        self.events[event] += 1
        if error:
            self.errors.append(f"{time.strftime('%H:%M:%S')} {what + ': ' if what else ''}{event}")

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
            "errors": list(self.errors),
            "tags": dict(self.tags),
            "messages_per_second": self.rates(),
            "latency_ms": self.percentiles(),
            "histogram": {
                "bounds_ms": [b * 1000 for b in BUCKETS],
                "counts": list(self.histogram.counts),
            },
        }
