"""What the profile benchmarks (bench_scanners.py, bench_auth.py, bench_state.py) share:
running stacks in turns through bench.py's measure, and the table rows of the results."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench

HEADER = ["| stack | msg/s | end-of-DATA p50 ms | p99 ms | filter CPU ms/msg | peak PSS MB | "
          "acc/rej/tmp/err |", "|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip


def take_turns(stacks: list[bench.Stack], factory: bench.MessageFactory, runs: int,
               log: Callable[[str], None]) -> list[bench.RunResult]:  # fmt: skip
    """Every stack ``runs`` times, taking turns (forward, then backward, ...), each behind
    its own private Postfix relaying to one sink, warmed up before every run."""
    results: list[bench.RunResult] = []
    bed = bench.Bed(Path(tempfile.mkdtemp(prefix="bench-bed-", dir=bench.stack_parent())))
    try:
        for run in range(1, runs + 1):
            for stack in stacks if run % 2 else list(reversed(stacks)):
                stack.start()
                try:
                    with bed.postfix(stack) as pf:
                        bench.warm_up(bed, pf, stack, factory, log if run == 1 else None)
                        results.append(bench.measure(bed, pf, stack, factory, run, log))
                finally:
                    stack.stop()
    finally:
        bed.close()
    return results


def arguments(name: str, doc: str | None) -> argparse.Namespace | None:
    """The options of a 2 KB profile (``scripts/bench --NAME``); None (said why) when not root."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(f"--{name}", action="store_true", help=argparse.SUPPRESS)  # how scripts/bench gets here
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--count", type=int, default=2000, help="measured messages per run")
    ap.add_argument("--conns", type=int, default=20, help="concurrent SMTP connections")
    ap.add_argument("--out", action="store_true", help=f"write bench/results/<date>-{name}.md")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print(f"bench_{name}: needs root (Postfix's master)", file=sys.stderr)
        return None
    return args


def report(what: str, args: Any, results: list[bench.RunResult], stacks: list[bench.Stack],
           name: str) -> None:  # fmt: skip
    """Print the profile's table (``what``: its messages), and with ``args.out`` write it
    to bench/results/<date>-<name>.md."""
    when = time.strftime("%Y-%m-%d %H:%M")
    lines = [f"{name} profile: {what}, {args.count} per run, {args.conns} connections, {args.runs} runs "
             f"(medians, min-max); {os.cpu_count()} cores; {when}",
             "", *HEADER, *rows(results, stacks)]  # fmt: skip
    print("\n".join(lines))
    if args.out:
        path = bench.BENCH / "results" / f"{time.strftime('%Y-%m-%d')}-{name}.md"
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path}")


def rows(results: list[bench.RunResult], stacks: list[bench.Stack]) -> list[str]:
    """One table row per stack: medians (min-max) over its runs."""

    def cell(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})" if values else "-"

    out = []
    for stack in stacks:
        runs = [r for r in results if r.stack == stack.name]
        if not runs:
            continue
        cpu = [r.filter_cpu_ms_per_msg for r in runs if r.filter_cpu_ms_per_msg is not None]
        pss = [r.peak_pss_mb for r in runs if r.peak_pss_mb is not None]
        kinds = ("accepted", "rejected", "tempfailed", "errors")
        counts = "/".join(str(sum(getattr(r, k) for r in runs)) for k in kinds)
        out.append(f"| {stack.name} | {cell([r.msgs_per_s for r in runs])} | "
                   f"{cell([r.eod_ms['p50'] for r in runs])} | {cell([r.eod_ms['p99'] for r in runs])} | "
                   f"{cell(cpu)} | {cell(pss)} | {counts} |")  # fmt: skip
    return out
