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
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(widths[i]) for i, c in enumerate(row)).rstrip()
                     for row in rows)  # fmt: skip


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
