#!/usr/bin/env python3
"""The scanner profile of scripts/bench: spamd and clamd on every message, defang
(the two checks side by side) against MIMEDefang (one after the other), 140 KB messages.

    scripts/bench --scanners [--runs 3] [--count 300] [--conns 10] [--only defang,mimedefang]

One private spamd (4 children) and one private clamd (defang.testbed.scanners: Debian's
daemons, loopback, offline) serve every stack, so the scanners' own work is the same for
all.  For each stack, behind its own private Postfix relaying to smtp-sink, the same
client sends the same 140 KB messages (bench.py's "140k" profile: a text part and a
100 KB base64 attachment): messages/s, end-of-DATA latency p50/p99 (from the final "."
to the reply: what the sending MTA waits), CPU and memory of the stack.

Beside them, "the scanners alone": the same messages sent straight to spamd and to
clamd by defang's client, with the same concurrency, one daemon at a time: each
scanner's own latency.  The target (issue 16): defang's end-of-DATA p50 within the slower
scanner's p50 + 10% (the waits overlap); MIMEDefang's near the sum.

Stacks: defang-scanners (bench/filters/defang_scanners.py), mimedefang-scanners
(bench/filters/mimedefang_scanners.pl, when MIMEDefang is installed: scripts/bench
--with-mimedefang --scanners).  The stacks take turns run by run, as in bench.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cells  # noqa: E402

import bench  # noqa: E402  (scripts/bench.py: the stacks, the load generator, the measures)
from defang.testbed.scanners import Clamd, Spamd, scanners_available  # noqa: E402
from defang.workers.api.scanning import Scanner, Scans, ScanSettings  # noqa: E402


class MimeDefangScanners(bench.MimeDefangStack):
    """MIMEDefang with the scanner filter, the daemons' addresses filled in."""

    def __init__(self, spamd: Spamd, clamd: Clamd) -> None:
        super().__init__("scanners")
        text = self.filter_src.read_text()
        text = text.replace("@CLAMD_SOCKET@", str(clamd.socket_path)).replace("@SPAMD_PORT@", str(spamd.port))
        generated = Path(tempfile.mkdtemp(prefix="md-scanners-")) / "mimedefang_scanners.pl"
        generated.write_text(text)
        self.filter_src = generated

    def describe(self) -> dict:
        return {**super().describe(), "filter": "bench/filters/mimedefang_scanners.pl"}


def scanners_alone(factory: bench.MessageFactory, spamd: Spamd, clamd: Clamd, count: int,
                   conns: int) -> dict[str, dict[str, float]]:  # fmt: skip
    """Each scanner's own latency on the profile's messages, ``conns`` at a time."""
    workdir = Path(tempfile.mkdtemp(prefix="bench-scanners-"))
    paths = []
    for i in range(count):
        head, body = factory.build("alone", i)
        path = workdir / f"{i}.eml"
        path.write_bytes(head + body)
        paths.append(path)
    spam = ScanSettings(spamassassin=Scanner("spamassassin", spamd.inet))
    virus = ScanSettings(clamav=Scanner("clamav", clamd.unix))
    out = {"spamd alone": _latencies(paths, spam, "spamassassin", conns),
           "clamd alone": _latencies(paths, virus, "clamav", conns)}  # fmt: skip
    for path in paths:
        path.unlink()
    workdir.rmdir()
    return out


def _latencies(paths: list[Path], settings: ScanSettings, check: str, conns: int) -> dict[str, float]:
    times: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    queue = list(paths)

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                path = queue.pop()
            scans = Scans(settings, str(path), path.stat().st_size, "bench")
            t0 = time.perf_counter()
            result = scans.result(check)
            took = time.perf_counter() - t0
            with lock:
                times.append(took)
                if result.error:
                    errors.append(result.error)

    threads = [threading.Thread(target=worker) for _ in range(conns)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"p50_ms": round(bench.percentile(times, 50) * 1000, 1),
            "p99_ms": round(bench.percentile(times, 99) * 1000, 1),
            "per_s": round(len(paths) / wall, 1), "errors": len(errors)}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scanners", action="store_true", help=argparse.SUPPRESS)  # how scripts/bench gets here
    ap.add_argument("--with-mimedefang", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--count", type=int, default=300, help="measured messages per run")
    ap.add_argument("--conns", type=int, default=10, help="concurrent SMTP connections")
    ap.add_argument("--only", default="", help="comma-separated stack groups: defang, mimedefang")
    ap.add_argument("--out", action="store_true", help="write bench/results/<date>-scanners.md and .json")
    args = ap.parse_args()
    missing = scanners_available()
    if missing:
        print(f"bench_scanners: {missing}", file=sys.stderr)
        return 1
    if os.geteuid() != 0:
        print("bench_scanners: needs root (Postfix's master, MIMEDefang's user)", file=sys.stderr)
        return 1
    profile = replace(bench.PROFILES["140k"], count=args.count, conns=args.conns, warmup=30)
    factory = bench.MessageFactory(profile)
    spamd, clamd = Spamd(children=4).start(), Clamd().start()

    def log(text: str) -> None:
        print(text, flush=True)

    try:
        alone = scanners_alone(factory, spamd, clamd, args.count, args.conns)
        for name, figures in alone.items():
            log(f"  {name:28} p50 {figures['p50_ms']} ms, p99 {figures['p99_ms']} ms, "
                f"{figures['per_s']} msg/s, errors {figures['errors']}")  # fmt: skip
        settings = {"spamassassin": {"address": spamd.inet, "timeout": 60},
                    "clamav": {"address": clamd.unix, "timeout": 60}}  # fmt: skip
        stacks: list[bench.Stack] = [bench.DefangStack("scanners", settings=settings)]
        if bench.MimeDefangStack.available():
            stacks.append(MimeDefangScanners(spamd, clamd))
        only = {s for s in args.only.split(",") if s}
        stacks = [s for s in stacks if not only or s.group in only]
        results = bench_cells.take_turns(stacks, factory, args.runs, log)
    finally:
        spamd.stop()
        clamd.stop()
    lines = table(alone, results, stacks, args)
    print("\n".join(lines))
    if args.out:
        stem = bench.BENCH / "results" / f"{time.strftime('%Y-%m-%d')}-scanners"
        stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
        stem.with_suffix(".json").write_text(json.dumps(
            {"alone": alone, "runs": [asdict(r) for r in results], "machine": bench.machine_info(),
             "stacks": {s.name: s.describe() for s in stacks}}, indent=2))  # fmt: skip
        print(f"wrote {stem}.md and .json")
    return 0


def table(alone: dict, results: list[bench.RunResult], stacks: list[bench.Stack],
          args: argparse.Namespace) -> list[str]:  # fmt: skip
    out = [f"scanner profile: 140 KB messages, {args.count} per run, {args.conns} connections, "
           f"{args.runs} runs (medians, min-max); {os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}",
           "", *bench_cells.HEADER]  # fmt: skip
    for name, f in alone.items():
        out.append(f"| {name} | {f['per_s']} | {f['p50_ms']} | {f['p99_ms']} | | | errors {f['errors']} |")
    out += bench_cells.rows(results, stacks)
    slower = max(f["p50_ms"] for f in alone.values())
    both = sum(f["p50_ms"] for f in alone.values())
    out += ["", f"slower scanner alone: p50 {slower} ms; target for defang: <= {slower * 1.1:.1f} ms; "
            f"the two scanners one after the other: {both:.1f} ms"]  # fmt: skip
    return out


if __name__ == "__main__":
    sys.exit(main())
