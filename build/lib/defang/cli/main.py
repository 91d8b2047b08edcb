"""``defang``: run the daemons, or check and try the filter without an MTA."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from defang.cli.quarantine import add_parser as add_quarantine_parser
from defang.core import config as configmod
from defang.core import logsetup


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="config file (default: etc/defang.toml of this checkout)")
    p.add_argument("--filter", help="filter.py to run (overrides [daemon] filter)")
    p.add_argument("--socket", help="milter socket: unix:/path or inet:PORT@HOST")
    p.add_argument("--runtime-dir", help="sockets and spool (overrides [daemon] runtime_dir)")


def _passthrough(args: argparse.Namespace) -> list[str]:
    out: list[str] = []
    for flag in ("config", "filter", "socket", "runtime_dir"):
        value = getattr(args, flag, None)
        if value:
            out += [f"--{flag.replace('_', '-')}", value]
    return out


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="defang", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="multiplexor, workers and milter front end, in the foreground")
    _common(p)
    for name, helptext in (("milter", "the milter front end alone"),
                           ("multiplexor", "the multiplexor and its workers alone")):  # fmt: skip
        p = sub.add_parser(name, help=helptext)
        _common(p)
        p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p = sub.add_parser("check", help="load filter.py and report its hooks or its error")
    _common(p)
    p = sub.add_parser("test", help="run the filter on one message file, print the decision")
    _common(p)
    p.add_argument("message", help="a raw RFC 5322 message (.eml)")
    p.add_argument("--sender", default="sender@example.org")
    p.add_argument("--rcpt", action="append", help="recipient (repeatable)")
    p.add_argument("--ip", default="192.0.2.1")
    p.add_argument("--helo", default="client.example.org")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_quarantine_parser(sub, _common)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = configmod.load(args.config, filter_path=args.filter, socket=args.socket,
                             runtime_dir=args.runtime_dir)  # fmt: skip
    except configmod.ConfigError as exc:
        print(f"defang: {exc}", file=sys.stderr)
        return 2
    logsetup.setup(cfg.log_level)
    # Each command imports what it runs, here: ``defang milter`` must not load the MIME
    # engine, ``defang check`` no daemon.
    if args.command == "run":
        # Every daemon's and the workers' code is imported before the forks, so that
        # all of defang's processes share those pages.
        from defang import supervisor
        from defang.frontend import daemon as _milter  # noqa: F401
        from defang.multiplexor import daemon as _multiplexor  # noqa: F401
        from defang.workers import zygote as _zygote  # noqa: F401

        base = _passthrough(args)
        return supervisor.run(
            cfg,
            multiplexor=lambda fd: main(["multiplexor", *base, "--ready-fd", str(fd)]),
            milter=lambda fd: main(["milter", *base, "--ready-fd", str(fd)]),
        )
    if args.command == "milter":
        from defang.frontend.daemon import serve

        return serve(cfg, args.ready_fd)
    if args.command == "multiplexor":
        from defang.multiplexor.daemon import Multiplexor
        from defang.workers.zygote import main as zygote_main

        cfg.runtime_dir.mkdir(parents=True, exist_ok=True)
        return Multiplexor(cfg, zygote_main, ready_fd=args.ready_fd).run()
    if args.command == "check":
        from defang.workers.loader import FilterLoadError, load_filter

        try:
            loaded = load_filter(str(cfg.filter))
        except FilterLoadError as exc:
            print(exc, file=sys.stderr)
            return 1
        for line in loaded.warnings:
            print(line, file=sys.stderr)
        print(f"{cfg.filter}: OK; hooks: {', '.join(sorted(loaded.hooks)) or 'none'}")
        return 0
    if args.command == "test":
        from defang.cli.trial import render, run_trial

        result = run_trial(cfg, args.message, sender=args.sender, recipients=args.rcpt or
                           ["postmaster@example.org"], ip=args.ip, helo=args.helo)  # fmt: skip
        print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else render(result))
        return 0
    if args.command == "quarantine":
        from defang.cli.quarantine import run as run_quarantine

        return run_quarantine(cfg, args)
    logging.getLogger("defang").error("unknown command %s", args.command)
    return 2
