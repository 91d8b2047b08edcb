"""``defang lists add|remove|show|import|export``: the allow and block lists of ``defang.lists``.

    defang lists add block spam.example 198.51.100.0/24
    defang lists add allow boss@partner.example --scope alice@example.org
    defang lists show [allow|block] [--scope S] [--json]
    defang lists export > lists.txt ; defang lists import lists.txt

The lists live in the shared state (``[state]``): a change applies to the next message
on every relay sharing it, without a reload.  The text format of ``export`` and
``import`` is one entry a line, ``LIST SCOPE ENTRY`` (``block global spam.example``);
``#`` starts a comment.  An import checks every line before it stores anything.
Run as root with the SQLite back end, the command works as the daemons' user, so that
the files it makes stay theirs.  Exit status: 0 done, 1 the state failed, 2 bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from defang.core import privileges

# the parser is built for every command: the API (and its imports) only when this one runs
LISTS = ("allow", "block")


def add_parser(sub: Any, common: Any) -> None:
    """Register the ``lists`` sub-command on ``defang``'s sub-parsers."""
    p = sub.add_parser("lists", help="edit the allow and block lists (addresses, domains, IP ranges)")
    lsub = p.add_subparsers(dest="lcommand", required=True)
    for name, helptext in (("add", "add entries to a list"), ("remove", "remove entries from a list"),
                           ("show", "the entries of a list, or of every list"),
                           ("import", "add the entries of a file written by export ('-': stdin)"),
                           ("export", "every entry, one 'LIST SCOPE ENTRY' a line")):  # fmt: skip
        q = lsub.add_parser(name, help=helptext)
        common(q)
        if name in ("add", "remove"):
            q.add_argument("list", choices=LISTS)
            q.add_argument("entries", nargs="+", metavar="ENTRY",
                           help="an address, a domain (and the names under it), an IP address or range")
        if name == "show":
            q.add_argument("list", nargs="?", choices=LISTS)
            q.add_argument("--json", action="store_true", help="machine-readable output")
        if name in ("add", "remove", "show"):
            q.add_argument("--scope", default=None,
                           help="'global' or a recipient address or domain (default: global; show: all)")
        if name == "import":
            q.add_argument("file", help="a file in export's format, '-' for stdin")


def run(cfg: Any, args: argparse.Namespace) -> int:
    from defang.workers.api import lists
    from defang.workers.stores.state import StateError

    try:
        store = _open(cfg)
    except privileges.PrivilegeError as exc:
        return _fail(str(exc), 1)
    except StateError as exc:
        return _fail(str(exc), 1)
    try:
        return _run(store, args)
    except lists.ListError as exc:
        return _fail(str(exc), 2)
    except StateError as exc:
        return _fail(str(exc), 1)
    finally:
        store.close()


def _open(cfg: Any) -> Any:
    from defang.workers.stores.state import StateSettings, open_store

    settings = cfg.section(StateSettings)
    if settings.backend == "sqlite":  # the daemons' file: made and written as their user
        folder = settings.path.parent
        mode = privileges.RUNTIME_DIR_MODE if folder == cfg.runtime_dir else privileges.PRIVATE_DIR_MODE
        privileges.become_daemon_user(cfg.daemon_user, cfg.daemon_group, (), [(folder, mode)])
    return open_store(settings)


def _run(store: Any, args: argparse.Namespace) -> int:
    from defang.workers.api import lists

    scope = args.scope if getattr(args, "scope", None) else lists.GLOBAL
    if args.lcommand == "add":
        n = lists.add(args.list, args.entries, scope, store)
        print(f"{args.list} ({lists.scope_of(scope)}): {n} added, {len(args.entries) - n} already there")
    elif args.lcommand == "remove":
        n = lists.remove(args.list, args.entries, scope, store)
        print(f"{args.list} ({lists.scope_of(scope)}): {n} removed, {len(args.entries) - n} not there")
    elif args.lcommand == "show":
        rows = _rows(store, [args.list] if args.list else list(LISTS),
                     [args.scope] if args.scope else lists.scopes(store))  # fmt: skip
        if args.json:
            print(json.dumps([{"list": w, "scope": s, "entry": e} for w, s, e in rows], indent=1))
        else:
            for row in rows:
                print(" ".join(row))
    elif args.lcommand == "export":
        print("# defang lists export: LIST SCOPE ENTRY")
        for row in _rows(store, list(LISTS), lists.scopes(store)):
            print(" ".join(row))
    elif args.lcommand == "import":
        return _import(store, args.file)
    return 0


def _rows(store: Any, which: list[str], scopes: list[str]) -> list[tuple[str, str, str]]:
    from defang.workers.api import lists

    return [(w, lists.scope_of(s), e) for s in scopes for w in which for e in lists.show(w, s, store)]


def _import(store: Any, name: str) -> int:
    from defang.workers.api import lists

    try:
        text = sys.stdin.read() if name == "-" else open(name, encoding="utf-8").read()
    except OSError as exc:
        return _fail(f"{name}: {exc.strerror}", 2)
    except UnicodeDecodeError:
        return _fail(f"{name}: not UTF-8 text", 2)
    batches: dict[tuple[str, str], list[str]] = {}
    for n, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 3 or words[0] not in LISTS:
            return _fail(f"{name}:{n}: expected 'allow|block SCOPE ENTRY', got {line.strip()!r}", 2)
        try:
            entry = lists.normalize(words[2])[0]
            batches.setdefault((words[0], lists.scope_of(words[1])), []).append(entry)
        except lists.ListError as exc:
            return _fail(f"{name}:{n}: {exc}", 2)
    added = sum(lists.add(w, entries, s, store) for (w, s), entries in batches.items())
    total = sum(len(e) for e in batches.values())
    print(f"{name}: {total} entries, {added} new")
    return 0


def _fail(why: str, status: int) -> int:
    print(f"defang lists: {why}", file=sys.stderr)
    return status
