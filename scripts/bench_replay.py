#!/usr/bin/env python3
"""How fast ``defang replay`` runs a corpus through a filter, beside what admins do today.

    .venv/bin/python scripts/bench_replay.py [--messages 10000] [--jobs 1 2] [--loop 193]

The messages are the corpus mix (../shared/corpus, every message in turn, until there are
``--messages``: its 193 messages range from 300 bytes to 1 MB, from plain text to a
200-part and a 6-level nested message), linked into one directory.  Each filter (the
default filters/filter.py and the modular example chain) is replayed over it with each
``--jobs``: wall-clock time (time.monotonic), messages per second, and the CPU seconds of
the replay and its processes.  The baseline is a shell loop running ``defang test`` once
per message over the first ``--loop`` corpus messages (a process, an interpreter and a
filter load per message), as admins script it today.

Prints one table (Markdown); nothing is asserted: figures on a shared 2-core machine move.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "corpus"
FILTERS = {
    "default": REPO / "filters" / "filter.py",
    "modular": REPO / "filters" / "examples" / "modular" / "filter.py",
}


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def mix(directory: Path, count: int) -> int:
    corpus = sorted(CORPUS.glob("*.eml"))
    if not corpus:
        sys.exit(f"bench_replay: no corpus at {CORPUS}")
    for n in range(count):
        source = corpus[n % len(corpus)]
        os.symlink(source, directory / f"{n:05d}-{source.name}")
    return sum((corpus[n % len(corpus)]).stat().st_size for n in range(count))


def replay(directory: Path, filter_path: Path, jobs: int) -> dict[str, float]:
    cpu, start = children_cpu(), time.monotonic()
    done = subprocess.run([sys.executable, "-m", "defang", "replay", str(directory), "--json", "--filter",
                           str(filter_path), "--jobs", str(jobs)], capture_output=True, cwd=REPO)  # fmt: skip
    wall = time.monotonic() - start
    if done.returncode not in (0, 1):
        sys.exit(f"bench_replay: defang replay exited {done.returncode}: {done.stderr.decode()[-500:]}")
    summary = json.loads(done.stdout)["summary"]
    return {"messages": summary["messages"], "wall": wall, "cpu": children_cpu() - cpu,
            "outcomes": summary["filters"][0]["outcomes"]}  # fmt: skip


def shell_loop(filter_path: Path, count: int) -> dict[str, float]:
    corpus = sorted(CORPUS.glob("*.eml"))[:count]
    cpu, start = children_cpu(), time.monotonic()
    for eml in corpus:
        subprocess.run([sys.executable, "-m", "defang", "test", str(eml), "--filter", str(filter_path)],
                       capture_output=True, cwd=REPO)  # fmt: skip
    return {"messages": len(corpus), "wall": time.monotonic() - start, "cpu": children_cpu() - cpu}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--loop", type=int, default=193, help="messages for the shell-loop baseline (0: none)")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="defang-bench-replay-") as tmp:
        directory = Path(tmp)
        size = mix(directory, args.messages)
        for name, path in FILTERS.items():
            if args.loop:
                r = shell_loop(path, args.loop)
                rows.append((name, "shell loop over `defang test`", r, None))
            for jobs in args.jobs:
                r = replay(directory, path, jobs)
                rows.append((name, f"`defang replay --jobs {jobs}`", r, r["outcomes"]))
        shutil.rmtree(directory, ignore_errors=True)
    print(f"corpus mix: {args.messages} messages, {size / 2**20:.0f} MB; {os.cpu_count()} cores; "
          f"{time.strftime('%Y-%m-%d %H:%M')}\n")  # fmt: skip
    print("| filter | how | messages | wall s | msg/s | CPU s | outcomes |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name, how, r, outcomes in rows:
        shown = ", ".join(f"{k} {v}" for k, v in outcomes.items()) if outcomes else ""
        print(f"| {name} | {how} | {r['messages']} | {r['wall']:.1f} | {r['messages'] / r['wall']:.0f} | "
              f"{r['cpu']:.1f} | {shown} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
