"""What the profile benchmarks (bench_scanners.py, bench_auth.py) share with each other:
running stacks in turns through bench.py's measure, and the table rows of the results."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path

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
