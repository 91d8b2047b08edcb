"""``defang quarantine list | show ID | release ID [--to ADDR] | delete ID`` (each ``--json``).

The store and the release live in ``defang.workers.stores.quarantine`` (the workers write entries);
this module only turns them into a command line: text for people, ``--json`` for
scripts.  Exit status: 0 done, 1 the entry or the release failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from defang.workers.stores.quarantine import (
    QuarantineError,
    QuarantineStore,
    quarantine_dir,
    release,
)
from defang.workers.stores.submit import Submission


def add_parser(sub: Any, common: Any) -> None:
    """Register the ``quarantine`` sub-command on ``defang``'s sub-parsers."""
    p = sub.add_parser("quarantine", help="list, show, release or delete quarantined messages")
    qsub = p.add_subparsers(dest="qcommand", required=True)
    for name, helptext in (("list", "every entry, oldest first"), ("show", "one entry's metadata"),
                           ("release", "send the original message again through the MTA"),
                           ("delete", "remove an entry")):  # fmt: skip
        q = qsub.add_parser(name, help=helptext)
        common(q)  # on each command, so that "defang quarantine list --config C" works
        q.add_argument("--json", action="store_true", help="machine-readable output")
        if name != "list":
            q.add_argument("id", help="entry ID, e.g. 20261121T132001Z-ab12cd")
        if name == "release":
            q.add_argument("--to", action="append", metavar="ADDR",
                           help="recipient instead of the original ones (repeatable)")  # fmt: skip


def run(cfg: Any, args: argparse.Namespace) -> int:
    store = QuarantineStore(quarantine_dir(cfg))
    try:
        if args.qcommand == "list":
            return _list(store, args.json)
        if args.qcommand == "show":
            meta = store.get(args.id)
            _print(meta if args.json else _describe(meta), args.json)
            return 0
        if args.qcommand == "release":
            record = release(store, args.id, Submission.for_release(cfg), args.to)
            if args.json:
                _print({"id": args.id, "released": record}, True)
            else:
                print(f"released {args.id} via {record['via']} to {', '.join(record['recipients'])}")
            return 0
        if args.qcommand == "delete":
            store.delete(args.id)
            if args.json:
                _print({"id": args.id, "deleted": True}, True)
            else:
                print(f"deleted {args.id}")
            return 0
    except PermissionError as exc:  # 0700: the daemons' user's (SECURITY.md)
        return _fail(args, f"{exc.filename}: Permission denied: the quarantine is for root and "
                           f"the daemons' user ({cfg.daemon_user}); run as one of them")  # fmt: skip
    except (QuarantineError, OSError) as exc:
        return _fail(args, str(exc))
    return 2


def _fail(args: argparse.Namespace, why: str) -> int:
    if getattr(args, "json", False):
        _print({"error": why}, True)
    else:
        print(f"defang quarantine: {why}", file=sys.stderr)
    return 1


def _list(store: QuarantineStore, as_json: bool) -> int:
    entries = list(store.entries())
    if as_json:
        _print(entries, True)
        return 0
    if not entries:
        print(f"no quarantined messages in {store.root}")
        return 0
    print(f"{'ID':24} {'SIZE':>9}  {'SENDER':30} {'RCPTS':>5}  REASON")
    for e in entries:
        if "error" in e:
            print(f"{e['id']:24} {'?':>9}  {e['error']}")
            continue
        reason = "; ".join(e.get("reasons") or [])
        print(f"{e['id']:24} {e['message']['size']:>9}  {_cut(e.get('sender') or '<>', 30):30} "
              f"{len(e.get('recipients') or []):>5}  {_cut(reason, 60)}")  # fmt: skip
    return 0


def _describe(meta: dict[str, Any]) -> str:
    conn = meta.get("conn") or {}
    lines = [
        f"id:         {meta['id']}",
        f"time:       {meta.get('time')}",
        f"queue id:   {meta.get('queue_id') or '-'}",
        f"sender:     <{meta.get('sender') or ''}>",
        f"recipients: {', '.join(meta.get('recipients') or []) or '-'}",
        f"client:     {conn.get('hostname') or '-'} [{conn.get('ip') or '-'}] helo={conn.get('helo') or '-'}",
        f"subject:    {meta.get('subject') or ''}",
        f"message:    {meta['message']['file']} ({meta['message']['size']} bytes, sha256 "
        f"{meta['message']['sha256'][:16]}...)",
    ]
    for reason in meta.get("reasons") or []:
        lines.append(f"reason:     {reason}")
    for part in meta.get("parts") or []:
        lines.append(f"part:       {part['file']} {part['content_type']} {part.get('filename') or '-'!r} "
                     f"({part['size']} bytes): {part['reason']}")  # fmt: skip
    for rel in meta.get("releases") or []:
        lines.append(f"released:   {rel['time']} via {rel['via']} to {', '.join(rel['recipients'])}")
    lines.append("headers:")
    lines += [f"  {k}: {v}" for k, v in meta.get("headers") or []]
    return "\n".join(lines)


def _cut(text: str, width: int) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


def _print(obj: Any, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, ensure_ascii=False))
    else:
        print(obj)
