"""``defang test MESSAGE``: run the filter on one message in this process, no MTA.

For an admin editing filter.py: what would defang decide, and which actions would it
take?  The message is spooled exactly as the front end would spool it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from defang.core import wire
from defang.core.config import Config
from defang.workers.loader import load_filter
from defang.workers.runner import FilterRunner


def spool_message(raw: bytes, dest: Path) -> int:
    """Write ``raw`` in spool form (CRLF line ends, header / blank line / body)."""
    data = raw.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, body = data, b""
    out = head.rstrip(b"\r\n") + b"\r\n\r\n" + body
    dest.write_bytes(out)
    return len(out)


def run_trial(cfg: Config, message: str, *, sender: str, recipients: list[str], ip: str,
              helo: str) -> dict[str, Any]:  # fmt: skip
    loaded = load_filter(str(cfg.filter))
    for line in loaded.warnings:
        print(line, file=sys.stderr)
    runner = FilterRunner.from_config(loaded, cfg)
    runner.initialize()
    notes: dict[str, Any] = {}

    def conn() -> wire.ConnInfo:
        return wire.ConnInfo("test", ip, f"[{ip}]", 0, helo, {}, notes)

    def decide(request: wire.DecisionRequest) -> dict[str, Any]:
        nonlocal notes
        reply = runner.handle(request)
        if reply.notes is not None:
            notes = reply.notes
        return wire.verdict_to_wire(reply.verdict)

    out: dict[str, Any] = {"filter": str(cfg.filter), "hooks": sorted(runner.hooks)}
    out["connect"] = decide(wire.Connect(conn()))
    out["helo"] = decide(wire.Helo(conn()))
    out["mail"] = decide(wire.Mail(conn(), sender, []))
    accepted = []
    for rcpt in recipients:
        verdict = decide(wire.Rcpt(conn(), rcpt, sender))
        out.setdefault("rcpt", {})[rcpt] = verdict
        if verdict["action"] in ("continue", "accept"):
            accepted.append(rcpt)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "message"
        size = spool_message(Path(message).read_bytes(), path)
        reply = runner.handle(wire.EndOfMessage(conn(), str(path), sender, accepted, "TEST", size))
    out["eom"] = {"verdict": wire.verdict_to_wire(reply.verdict), "actions": reply.actions}
    runner.cleanup()
    return out


def _verdict_text(v: dict[str, Any]) -> str:
    if v.get("code"):
        return f"{v['action']} {v['code']} {v.get('dsn') or ''} {v.get('text') or ''}".rstrip()
    return v["action"]


def render(result: dict[str, Any]) -> str:
    """The trial as an admin reads it: one line per SMTP stage, then the actions."""
    lines = [f"filter: {result['filter']} (hooks: {', '.join(result['hooks']) or 'none'})"]
    for stage in ("connect", "helo", "mail"):
        lines.append(f"{stage:<15} {_verdict_text(result[stage])}")
    for rcpt, v in result.get("rcpt", {}).items():
        lines.append(f"{'rcpt ' + rcpt:<15} {_verdict_text(v)}")
    eom = result["eom"]
    lines.append(f"{'end of message':<15} {_verdict_text(eom['verdict'])}")
    if eom["actions"] and eom["verdict"]["action"] not in ("continue", "accept"):
        lines.append("  (the actions below are not applied: the message is refused)")
    for action in eom["actions"]:
        lines.append(f"  {action[0]}: {', '.join(str(a) for a in action[1:])}")
    return "\n".join(lines)
