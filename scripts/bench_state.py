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

import argparse
import os
import sys
import time
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
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--state", action="store_true", help=argparse.SUPPRESS)  # how scripts/bench gets here
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--count", type=int, default=2000, help="measured messages per run")
    ap.add_argument("--conns", type=int, default=20, help="concurrent SMTP connections")
    ap.add_argument("--out", action="store_true", help="write bench/results/<date>-state.md")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_state: needs root (Postfix's master)", file=sys.stderr)
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
    when = time.strftime("%Y-%m-%d %H:%M")
    lines = [f"state profile: 2 KB messages, greylisting with every triplet known, {args.count} per run, "
             f"{args.conns} connections, {args.runs} runs (medians, min-max); {os.cpu_count()} cores; {when}",
             "", *bench_cells.HEADER, *bench_cells.rows(results, stacks)]  # fmt: skip
    print("\n".join(lines))
    if args.out:
        path = bench.BENCH / "results" / f"{time.strftime('%Y-%m-%d')}-state.md"
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
