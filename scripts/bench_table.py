"""Render the performance table (bench/README.md) from a ``scripts/bench --out`` JSON file.

Why a script: the docs must show measured numbers, and only numbers from one
results file (one machine, one run, its commit and load stated), never hand-copied.

    .venv/bin/python scripts/bench_table.py bench/results/2026-01-01-host.json
    .venv/bin/python scripts/bench_table.py RESULTS.json --update bench/README.md

``--update`` replaces the text between ``<!-- bench-table:start -->`` and
``<!-- bench-table:end -->`` in the given file.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

START, END = "<!-- bench-table:start -->", "<!-- bench-table:end -->"

#: (stack name in the results, label in the table), in table order
ROWS = [
    ("postfix", "Postfix alone (no milter)"),
    ("nullmilter", "do-nothing pymilter milter"),
    ("defang-minimal", "defang, minimal filter"),
    ("defang-headers", "defang, header filter"),
    ("mimedefang-minimal", "MIMEDefang 3.3, minimal filter"),
    ("mimedefang-headers", "MIMEDefang 3.3, header filter"),
    ("defang-minimal-inet", "defang, minimal, inet socket"),
    ("defang-minimal-inet-nodelay", "defang, minimal, inet + TCP_NODELAY"),
]
PROFILE_LABEL = {"2k": "2 KB text, 20 conns", "140k": "140 KB attachment, 20 conns",
                 "7m": "7 MB attachment, 10 conns"}  # fmt: skip


def _med(cell: dict[str, float] | None, nd: int = 0) -> str:
    return "–" if not cell else f"{cell['median']:.{nd}f}"


def _range(cell: dict[str, float] | None, nd: int = 0) -> str:
    if not cell:
        return "–"
    if round(cell["min"], nd) == round(cell["max"], nd):
        return f"{cell['median']:.{nd}f}"
    return f"{cell['median']:.{nd}f} ({cell['min']:.{nd}f}–{cell['max']:.{nd}f})"


def render(doc: dict[str, Any], source: str = "") -> str:
    """The Markdown block: a caption naming machine, commit and load, then one table."""
    m = doc["machine"]
    by = {(r["profile"], r["stack"]): r for r in doc["summary"]}
    profiles = [p for p in ("2k", "140k", "7m") if any(k[0] == p for k in by)]
    runs = max((r["runs"] for r in doc["summary"]), default=0)
    lines = [
        f"Measured by `scripts/bench` on {m['date'][:10]}: {m['nproc']} CPUs ({m['cpu_model']}), "
        f"{m['memory_gb']:.0f} GB, kernel {m['kernel']}, Python {m['python']}, Postfix {m['postfix']}, "
        f"defang `{m['defang_commit'][:10]}`, load average {m['loadavg_start'][0]:.2f} at start; "
        f"median of {runs} runs (min–max), the stacks taking turns. Client, Postfix, sink and filter "
        f"share the machine; the filters' spools are under `{m.get('filters_dir', '/tmp')}`. "
        f"CPU is per message over the filter's whole process tree; PSS is the peak summed over it."
        + (f" Source: `{source}`." if source else ""),
        "",
        "| messages | stack | msg/s | end-of-DATA p50 / p99 ms | filter CPU ms/msg | peak PSS MB | "
        "tempfailed |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in profiles:
        for stack, label in ROWS:
            r = by.get((p, stack))
            if r is None:
                continue
            lines.append(
                f"| {PROFILE_LABEL.get(p, p)} | {label} | {_range(r['msgs_per_s'])} | "
                f"{_med(r['eod_p50_ms'], 1)} / {_med(r['eod_p99_ms'], 1)} | {_med(r['filter_cpu_ms'], 2)} | "
                f"{_med(r['peak_pss_mb'])} | {r['tempfailed']} of {r['messages']} |"
            )
    ratio_lines = []
    for it in doc.get("ratios", []):
        md, pf = it.get("vs_mimedefang") or {}, it.get("vs_postfix") or {}
        if it["stack"] not in ("defang-minimal", "defang-headers") or not (md or pf):
            continue
        parts = []
        if md.get("msgs_per_s") is not None:
            parts.append(f"{md['msgs_per_s']:.2f}× MIMEDefang's msg/s at {md['filter_cpu']:.2f}× its CPU "
                         f"per message" if md.get("filter_cpu") is not None else
                         f"{md['msgs_per_s']:.2f}× MIMEDefang's msg/s")  # fmt: skip
        if pf.get("msgs_per_s") is not None:
            parts.append(f"{pf['msgs_per_s']:.2f}× Postfix alone")
        ratio_lines.append(f"- {PROFILE_LABEL.get(it['profile'], it['profile'])}, {it['stack']}: "
                           + "; ".join(parts))
    if ratio_lines:
        lines += ["", *ratio_lines]
    return "\n".join(lines) + "\n"


def update(path: Path, block: str) -> None:
    """Replace the marked region of ``path`` with ``block``."""
    text = path.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no {START} ... {END} markers")
    path.write_text(pattern.sub(lambda _m: f"{START}\n{block}{END}", text))


def main(argv: list[str] | None = None) -> int:
    """Print the table, or write it into a file's marked region with --update."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a JSON file written by scripts/bench --out")
    ap.add_argument("--update", metavar="FILE",
                    help="replace the marked table in FILE (e.g. bench/README.md)")  # fmt: skip
    args = ap.parse_args(argv)
    doc = json.loads(Path(args.results).read_text())
    block = render(doc, args.results)
    if args.update:
        update(Path(args.update), block)
    else:
        sys.stdout.write(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
