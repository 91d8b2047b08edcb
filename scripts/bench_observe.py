#!/usr/bin/env python3
"""The observability profile of scripts/bench: 2 KB messages with JSON logging and the
metrics on (scraped every second during the run), against the defaults (text lines, no
metrics), and JSON alone.

    scripts/bench --observe [--runs 3] [--count 2000] [--conns 20]

Both stacks run bench/filters/defang_minimal.py and log to a file (their standard
error, as the other profiles); issue 28's target: within 5%.
"""

from __future__ import annotations

import socket
import sys
import threading
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cells  # noqa: E402
from bench_state import NamedStack  # noqa: E402

import bench  # noqa: E402
from defang.testbed.ports import free_port  # noqa: E402


class Scraped(NamedStack):
    """defang with ``[log] format = "json"`` and ``[metrics] listen``, scraped each second."""

    def __init__(self) -> None:
        self.port = free_port()
        super().__init__("minimal", "defang-json-metrics", {"log": {"format": "json"},
                                                             "metrics": {"listen": f"127.0.0.1:{self.port}"}})
        self.scrapes = 0
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        super().start()
        self._done.clear()
        self._thread = threading.Thread(target=self._scrape, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(10)
        super().stop()

    def _scrape(self) -> None:
        while not self._done.wait(1.0):
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
                    while s.recv(65536):
                        pass
                self.scrapes += 1
            except OSError as exc:
                print(f"bench_observe: scrape failed: {exc}", file=sys.stderr)


def main() -> int:
    args = bench_cells.arguments("observe", __doc__)
    if args is None:
        return 1
    profile = replace(bench.PROFILES["2k"], count=args.count, conns=args.conns)
    factory = bench.MessageFactory(profile)
    observed = Scraped()
    stacks: list[bench.Stack] = [bench.DefangStack("minimal"), observed,
                                 NamedStack("minimal", "defang-json", {"log": {"format": "json"}})]
    results = bench_cells.take_turns(stacks, factory, args.runs, lambda text: print(text, flush=True))
    bench_cells.report(f"2 KB messages, JSON log lines and metrics ({observed.scrapes} scrapes) against the "
                       "defaults", args, results, stacks, "observe")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
