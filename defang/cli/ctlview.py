"""Human-readable tables for defangctl (the --json output is the raw reply)."""

from __future__ import annotations

from typing import Any


def render(command: str, reply: dict[str, Any]) -> str:
    if not reply.get("ok"):
        return f"error: {reply.get('error', 'unknown error')}"
    if command == "reload":
        return _reload(reply)
    if command == "workers":
        return _workers(reply)
    if command == "histo":
        return _histo(reply)
    return _status(reply)


def _reload(r: dict[str, Any]) -> str:
    """One line for the reload, then one per option it applied, one per option that needs
    a restart, one per warning about the config."""
    lines = [f"reloaded: generation {r.get('gen')}, hooks: {', '.join(r.get('hooks') or []) or 'none'}"]
    config = r.get("config") or {}
    changed, restart = config.get("changed") or [], config.get("restart") or []
    if config and not changed and not restart:
        lines.append("config: no option changed")
    lines += [f"changed: {line}" for line in changed]
    lines += [f"not applied: {line}" for line in restart]  # "... (needs a restart; still ...)"
    lines += [f"warning: {line}" for line in config.get("warnings") or []]
    return "\n".join(lines)


def _status(r: dict[str, Any]) -> str:
    lat = r.get("latency_ms", {})
    rates = r.get("messages_per_second", {})
    verdicts = ", ".join(f"{k} {v}" for k, v in sorted(r.get("verdicts", {}).items())) or "none yet"
    events = ", ".join(f"{k} {v}" for k, v in sorted(r.get("events", {}).items())) or "none"
    would = ", ".join(f"{k} {v}" for k, v in sorted(r.get("would", {}).items()))
    tags = ", ".join(f"{k} {v}" for k, v in sorted(r.get("tags", {}).items(), key=lambda kv: -kv[1])[:20])
    q = r.get("queue", {})
    lines = [
        f"multiplexor pid {r.get('pid')}, up {r.get('uptime')}s, filter {r.get('filter')} "
        f"(generation {r.get('generation')})",
        f"hooks:     {', '.join(r.get('hooks') or []) or 'none'}",
        f"queue:     {q.get('depth')}/{q.get('size')}",
        f"messages:  {verdicts}",
        f"events:    {events}",
        *([f"would:     {would} (monitor mode: not carried out)"] if would else []),
        *([f"tags:      {tags}"] if tags else []),
        f"rate:      {rates.get('1m')}/s 1m, {rates.get('5m')}/s 5m, {rates.get('15m')}/s 15m",
        f"latency:   p50 {lat.get('p50')} ms, p95 {lat.get('p95')} ms, p99 {lat.get('p99')} ms",
    ]
    if r.get("spawn_failures"):
        lines.append(f"WARNING:   {r['spawn_failures']} worker start failures in a row (backing off)")
    if r.get("last_load_error"):
        lines.append(f"last reload error: {r['last_load_error']}")
    return "\n".join(lines) + "\n\n" + _workers(r)


def _workers(r: dict[str, Any]) -> str:
    rows = [("ID", "PID", "GEN", "STATE", "SERVED", "RSS", "QUEUE ID", "BUSY FOR")]
    for w in r.get("workers", []):
        busy = f"{w['busy_for']:.1f}s" if w.get("busy_for") is not None else ""
        rss = f"{w['rss'] // 1048576} MB" if w.get("rss") else ""
        rows.append((str(w["id"]), str(w["pid"]), str(w["gen"]), w["state"], str(w["served"]),
                     rss, w.get("queue_id") or w.get("op") or "", busy))  # fmt: skip
    return "\n".join(_table(rows))


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows of cells as lines, each column as wide as its widest cell."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip() for row in rows]


def _histo(r: dict[str, Any]) -> str:
    h = r.get("histogram", {})
    bounds, counts = h.get("bounds_ms", []), h.get("counts", [])
    if not counts or not sum(counts):
        return "no messages yet"
    top = max(counts)
    labels = [f"<= {b:g} ms" for b in bounds] + [f"> {bounds[-1]:g} ms"]
    width = max(len(s) for s in labels)
    out = []
    for label, n in zip(labels, counts, strict=True):
        bar = "#" * (round(50 * n / top) if n else 0)
        out.append(f"{label.rjust(width)} | {bar} {n}")
    return "\n".join(out)


VERDICTS = ("accept", "reject", "tempfail", "discard")


def top(cur: dict[str, Any], prev: dict[str, Any] | None, seconds: float) -> list[str]:
    """``defangctl top``'s screen from two status replies ``seconds`` apart (``prev`` None:
    the first, no rates yet)."""
    counts = cur.get("verdicts", {})
    names = [*VERDICTS, *sorted(set(counts) - set(VERDICTS))]
    if prev is None or seconds <= 0:
        rates = "  ".join(f"{v} -" for v in names)
    else:
        before = prev.get("verdicts", {})
        rates = "  ".join(f"{v} {(counts.get(v, 0) - before.get(v, 0)) / seconds:.1f}" for v in names)
    totals = "  ".join(f"{v} {counts.get(v, 0)}" for v in names)
    lat, q = cur.get("latency_ms", {}), cur.get("queue", {})
    workers = cur.get("workers", [])
    states: dict[str, int] = {}
    for w in workers:
        states[w["state"]] = states.get(w["state"], 0) + 1
    pool = cur.get("pool", {})
    lines = [
        f"defang top: multiplexor pid {cur.get('pid')}, up {cur.get('uptime')}s, generation "
        f"{cur.get('generation')}, filter {cur.get('filter')}",
        f"messages/s  {rates}",
        f"total       {totals}",
        f"latency     p50 {lat.get('p50')} ms  p95 {lat.get('p95')} ms  p99 {lat.get('p99')} ms",
        f"queue       {q.get('depth')}/{q.get('size')}   workers "
        + (", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none")
        + f" (max {pool.get('max_workers')})",
        "",
    ]
    rows = [("ID", "PID", "GEN", "STATE", "SERVED", "MESSAGE", "BUSY FOR")]
    for w in workers:
        busy = f"{w['busy_for']:.1f}s" if w.get("busy_for") is not None else ""
        rows.append((str(w["id"]), str(w["pid"]), str(w["gen"]), w["state"], str(w["served"]),
                     w.get("queue_id") or w.get("op") or "", busy))  # fmt: skip
    lines += _table(rows)
    errors = cur.get("errors") or []
    lines += ["", "last errors" if errors else "last errors: none", *(f"  {e}" for e in reversed(errors))]
    lines += ["", "q quits"]
    return lines
