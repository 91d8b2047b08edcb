"""What ``defang replay`` prints: the progress bar while it runs, then the summary (text
for people, ``--json`` for scripts) and, with ``--compare``, the messages whose outcome
differs, side by side.  rich draws both: it wraps table cells to the terminal's width,
which a side-by-side view of long SMTP replies needs."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from defang.cli.trial import verdict_text


@contextlib.contextmanager
def progress(total: int, show: bool) -> Iterator[Callable[[Any], Any]]:
    """``advance(record)`` counts a record and hands it back; a bar on standard error
    when that is a terminal."""
    console = Console(stderr=True)
    if not show or not console.is_terminal:
        yield lambda record: record
        return
    columns = (TextColumn("replay"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.speed} msg/s"),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("replay", total=total)

        def advance(record: Any) -> Any:
            bar.advance(task)
            return record

        yield advance


def show(summary: dict[str, Any], records: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print(json.dumps({"summary": summary, "messages": records}, indent=2, ensure_ascii=False))
        return
    out = Console(highlight=False, soft_wrap=True)
    rate = f"{summary['per_second']:.0f} msg/s" if summary["per_second"] else "-"
    skipped = f"; {summary['skipped_files']} files skipped (not *.eml)" if summary["skipped_files"] else ""
    out.print(f"replayed {summary['messages']} messages in {summary['seconds']:.1f} s ({rate}, "
              f"{summary['jobs']} processes){skipped}", markup=False)  # fmt: skip
    for f in summary["filters"]:
        out.print(f"\nfilter {f['filter']}", markup=False)
        _counts(out, "outcome", f["outcomes"])
        _counts(out, "reply", f["replies"])
        _counts(out, "action (delivered messages)", f["actions"])
        _counts(out, "monitor: would", f["would"])
        _counts(out, "tag", f["tags"])
        if f["notices"]["asked"]:
            n = f["notices"]
            how = f"{n['sent']} sent" if summary.get("send_mail") else "none sent: --send-mail sends them"
            out.print(f"  notices the filter asked for: {n['asked']} ({how})", markup=False)
        if f["errors"]:
            out.print(f"  errors: {len(f['errors'])} (defang test FILE shows the traceback)", markup=False)
            for e in f["errors"][:20]:
                out.print(f"    {e['name']}: {e['error']}", markup=False)
            if len(f["errors"]) > 20:
                out.print(f"    ... and {len(f['errors']) - 20} more (--json lists them all)", markup=False)
        out.print("  slowest:", markup=False)
        for s in f["slowest"]:
            out.print(f"    {s['seconds'] * 1000:8.1f} ms  {s['name']}", markup=False)
    if "differ" in summary:
        _differences(out, summary, records)
    for r in summary.get("released", []):
        out.print(f"released {r['id']} via {r['via']} to {', '.join(r['recipients'])}", markup=False)


def _counts(out: Console, title: str, counts: dict[str, int]) -> None:
    if not counts:
        return
    out.print(f"  {title}:", markup=False)
    for name, n in counts.items():
        out.print(f"    {n:7d}  {name}", markup=False)


def _differences(out: Console, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
    differ = set(summary["differ"])
    a, b = (f["filter"] for f in summary["filters"])
    out.print(f"\n{len(differ)} of {summary['messages']} messages differ", markup=False)
    if not differ:
        return
    table = Table(show_lines=True, expand=True)
    for title in ("message", a, b):  # folded, not cut: a file name or a reply must be whole
        table.add_column(title, overflow="fold")
    for r in records:
        if r["name"] in differ:
            table.add_row(r["name"], _describe(r["results"][0]), _describe(r["results"][1]))
    out.print(table, soft_wrap=False)


def _describe(result: dict[str, Any]) -> str:
    error = result["error"]
    lines = [f"error: {error.splitlines()[0]}" if error else verdict_text(result["outcome"])]
    lines += [f"{a[0]} {' '.join(str(x) for x in a[1:])}".rstrip() for a in result["actions"]]
    lines += [f"quarantine: {q}" for q in result["quarantine"]]
    lines += [f"would {w}" for w in result["would"]]
    return "\n".join(lines)
