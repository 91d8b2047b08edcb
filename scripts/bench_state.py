#!/usr/bin/env python3
"""The shared-state profile of scripts/bench: greylisting at 2 KB, SQLite vs Redis vs none.

    scripts/bench --state [--runs 3] [--count 2000] [--conns 20]

Three stacks behind private Postfix instances, the same 2 KB messages (bench.py's "2k"
profile, one sender, one recipient): defang-minimal (no state), and
bench/filters/defang_greylist.py (greylisting at RCPT TO, every triplet known after the
warm-up, auto-allow off so every message asks for its triplet) with ``[state] backend =
"sqlite"`` (the file in the stack's runtime dir) and with ``"redis"`` (a private
redis-server on loopback, defang.testbed.redisd).
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cells  # noqa: E402

import bench  # noqa: E402
from defang.testbed.redisd import RedisServer  # noqa: E402


class NamedStack(bench.DefangStack):
    """A DefangStack under a name of its own (two stacks run the same filter)."""

    def __init__(self, filter_name: str, name: str, settings: dict) -> None:
        super().__init__(filter_name, settings=settings)
        self.name = name


def main() -> int:
    args = bench_cells.arguments("state", __doc__)
    if args is None:
        return 1
    profile = replace(bench.PROFILES["2k"], count=args.count, conns=args.conns)
    factory = bench.MessageFactory(profile)
    grey = {"greylist": {"delay": 0}}
    with RedisServer() as redis:
        stacks: list[bench.Stack] = [
            bench.DefangStack("minimal"),
            NamedStack("greylist", "defang-greylist-sqlite", {**grey, "state": {"backend": "sqlite"}}),
            NamedStack("greylist", "defang-greylist-redis", {**grey, "state": {"backend": "redis",
                                                                               "redis_url": redis.url}}),
        ]  # fmt: skip
        results = bench_cells.take_turns(stacks, factory, args.runs, lambda text: print(text, flush=True))
    bench_cells.report("2 KB messages, greylisting with every triplet known", args, results, stacks, "state")
    return 0


if __name__ == "__main__":
    sys.exit(main())
