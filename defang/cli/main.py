"""``defang``: run the daemons, or check, try and replay the filter without an MTA.

Each command takes only the options that apply to it.  A problem is one line on
standard error, ``what: why``, and a non-zero exit; no traceback reaches the admin.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from defang.cli.parser import CLIENTS, FILTER, OPTIONS, RUNTIME, SOCKET, build_parser
from defang.core import config as configmod
from defang.core import logsetup


def _passthrough(args: argparse.Namespace, command: str) -> list[str]:
    """``defang run``'s options that ``command`` (a daemon it starts) takes too."""
    out: list[str] = []
    for name in OPTIONS[command]:
        value = getattr(args, name, None)
        if value:
            out += [f"--{name.replace('_', '-')}", value]
    return out


def _config_reader(args: argparse.Namespace) -> Callable[[], configmod.Config]:
    """Read the config file as this command does, with its command-line overrides: the
    daemons read it again on each reload (``defang.core.reconfig``)."""
    return lambda: configmod.load(args.config, filter_path=getattr(args, FILTER, None),
                                  socket=getattr(args, SOCKET, None),
                                  runtime_dir=getattr(args, RUNTIME, None),
                                  client=args.command in CLIENTS)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    reread = _config_reader(args)
    try:
        cfg = reread()
    except configmod.ConfigError as exc:
        print(f"defang: {exc}", file=sys.stderr)
        return 2
    logsetup.configure(cfg)
    # once, by the first process: the daemons `defang run` forks (they get --ready-fd) are
    # already unprivileged, their directories made
    if args.command == "run" or args.command in ("milter", "multiplexor") and args.ready_fd is None:
        from defang.core.privileges import PrivilegeError, unsafe_files

        for line in unsafe_files({"filter": cfg.filter, "config": cfg.source}, cfg.daemon_user):
            logging.getLogger("defang").warning("%s", line)
        try:
            daemon_identity(cfg)
        except PrivilegeError as exc:
            print(f"defang: {exc}", file=sys.stderr)
            return 2
    # Each command imports what it runs, here: ``defang milter`` must not load the MIME
    # engine, ``defang check`` no daemon.
    if args.command == "run":
        # Every daemon's and the workers' code is imported before the forks, so that
        # all of defang's processes share those pages.
        from defang import supervisor
        from defang.frontend import daemon as _milter  # noqa: F401
        from defang.multiplexor import daemon as _multiplexor  # noqa: F401
        from defang.workers import zygote as _zygote  # noqa: F401

        # The runtime dir was decided here, as the user defang was started as (root:
        # /run/defang); the daemons, already unprivileged, are told it rather than
        # deciding again (they would name the defang user's own default).
        def daemon(command: str) -> Callable[[int], int]:
            told = ["--runtime-dir", str(cfg.runtime_dir)]
            return lambda fd: main([command, *_passthrough(args, command), *told, "--ready-fd", str(fd)])

        return supervisor.run(cfg, multiplexor=daemon("multiplexor"), milter=daemon("milter"))
    if args.command == "milter":
        from defang.frontend.daemon import serve

        return serve(cfg, args.ready_fd, reread=reread)
    if args.command == "multiplexor":
        from defang.multiplexor.daemon import Multiplexor
        from defang.workers.zygote import main as zygote_main

        return Multiplexor(cfg, zygote_main, ready_fd=args.ready_fd, reread=reread).run()
    if args.command == "check":
        return check(cfg, args.strict)
    if args.command == "test":
        from defang.cli.trial import main as test_main

        return test_main(cfg, args)
    if args.command == "replay":
        from defang.cli.replay import main as replay_main

        return replay_main(cfg, args)
    if args.command == "quarantine":
        from defang.cli.quarantine import run as run_quarantine

        return run_quarantine(cfg, args)
    if args.command == "lists":
        from defang.cli.lists import run as run_lists

        return run_lists(cfg, args)
    logging.getLogger("defang").error("unknown command %s", args.command)
    return 2


def daemon_identity(cfg: configmod.Config) -> None:
    """Make the daemons' directories, then stop being root (defang.core.privileges says why).

    Done once, by the first process: ``defang run`` before it forks the daemons (which
    then never were root), ``defang milter`` or ``defang multiplexor`` on their own.
    """
    from pathlib import Path

    from defang.core import privileges
    from defang.workers.stores.quarantine import quarantine_dir

    dirs = [(cfg.runtime_dir, privileges.RUNTIME_DIR_MODE), (cfg.spool_dir, privileges.PRIVATE_DIR_MODE),
            (quarantine_dir(cfg), privileges.PRIVATE_DIR_MODE)]  # fmt: skip
    files: tuple[Path, ...] = ()
    if cfg.state_backend == "sqlite":
        if cfg.state_path.parent != cfg.runtime_dir:  # [state] path's folder
            dirs.append((cfg.state_path.parent, privileges.PRIVATE_DIR_MODE))
        files = tuple(Path(f"{cfg.state_path}{end}") for end in ("", "-wal", "-shm"))
    for sock in (configmod.unix_socket_path(cfg.milter_socket), cfg.multiplexor_socket, cfg.control_socket):
        if sock is not None and not sock.parent.exists():
            dirs.append((sock.parent, privileges.RUNTIME_DIR_MODE))
    if cfg.log_destination == "file":
        privileges.give_log_file(cfg.log_file, cfg.daemon_user, cfg.daemon_group)
    groups = (cfg.socket_group, cfg.control_group)
    privileges.become_daemon_user(cfg.daemon_user, cfg.daemon_group, tuple(g for g in groups if g), dirs,
                                  files)  # fmt: skip


def check(cfg: configmod.Config, strict: bool) -> int:
    """Exit 0 when the filter loads (1 with ``--strict`` and a warning about the filter, who
    may write it, or the config's timeouts), 1 when it does not."""
    from defang.core.configcheck import timeout_warnings
    from defang.core.privileges import unsafe_files
    from defang.workers.loader import FilterLoadError, load_filter
    from defang.workers.runner import FilterRunner

    try:
        loaded = load_filter(str(cfg.filter))
        FilterRunner.from_config(loaded, cfg).prepare()  # the signing keys, the suffix list
    except FilterLoadError as exc:
        print(exc, file=sys.stderr)
        return 1
    files = {"filter": cfg.filter, "config": cfg.source}
    warnings = [*loaded.warnings, *unsafe_files(files, cfg.daemon_user), *timeout_warnings(cfg)]
    for line in warnings:
        print(line, file=sys.stderr)
    print(f"{cfg.filter}: OK; hooks: {', '.join(sorted(loaded.hooks)) or 'none'}")
    if strict and warnings:
        print(f"{cfg.filter}: {len(warnings)} warning(s) and --strict", file=sys.stderr)
        return 1
    return 0
