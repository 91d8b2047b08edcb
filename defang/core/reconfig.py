"""What a reload does to the config: the options it applies, and those that need a restart.

A reload re-reads the config file, with the command line's overrides on top as at the
start (``defang run --filter X`` keeps X).  Most options are read afresh by whoever uses
them: the multiplexor's pool sizes, limits and timeouts; everything the workers use (the
filter, [filter], [mime], the scanners, [dns], [notify], ...), since a reload is a new
zygote and new workers; the milter's message limits and replies, which the front end
takes when it sees the new filter generation; the log level.  Some are fixed when the
daemons start: the sockets they listen on, who they run as, the directories made while
still root.  Those keep their running value until a restart, and the reload names them.

Pure: ``reconfigure`` compares two ``Config`` objects; reading the file is the caller's.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from defang.core.config import KEYS, Config, ReplySpec

#: Config attributes fixed at start-up: a reload names a change to one, and keeps the old value
RESTART_ONLY = frozenset({
    "runtime_dir", "daemon_user", "daemon_group",  # made and switched to while root
    "milter_socket", "socket_mode", "socket_group", "milter_io_timeout", "tcp_nodelay",  # the listener
    "spool_dir", "quarantine_dir", "state_path",  # directories made while root
    "multiplexor_socket", "control_socket", "control_socket_mode", "control_group",  # listening sockets
    "max_frame_size",  # the channels already open, on every socket
    "log_format", "log_destination", "log_file", "log_syslog_facility", "log_syslog_socket",  # set up once
    "metrics_listen",  # a listening socket
})  # fmt: skip

#: attribute -> "[section] key", as the admin writes it
OPTION_NAMES = {attr: f"[{section}] {key}" for (section, key), (attr, _) in KEYS.items()}


@dataclass(frozen=True)
class Reconfig:
    """The outcome of comparing the running config with the file as it reads now."""

    cfg: Config  # what the processes run with from now on (restart-only options unchanged)
    changed: tuple[str, ...] = ()  # '[multiplexor] max_workers: 10 -> 4'
    restart: tuple[str, ...] = ()  # '[milter] socket: unix:/a -> unix:/b (needs a restart; ...)'


def show(value: Any) -> str:
    """An option's value as the admin would recognise it in the file."""
    if isinstance(value, ReplySpec):
        return f"{value.code} {value.dsn} {value.text}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, Path) and str(value) in ("", "."):
        return '""'
    return str(value) if value is not None else '""'


def reconfigure(running: Config, fresh: Config) -> Reconfig:
    """What a reload applies: ``fresh`` except for the options fixed at start-up."""
    changed: list[str] = []
    restart: list[str] = []
    keep: dict[str, Any] = {}
    for f in fields(Config):
        name = OPTION_NAMES.get(f.name)
        old, new = getattr(running, f.name), getattr(fresh, f.name)
        if name is None or old == new:
            continue
        if f.name in RESTART_ONLY:
            restart.append(f"{name}: {show(old)} -> {show(new)} (needs a restart; still {show(old)})")
            keep[f.name] = old
        else:
            changed.append(f"{name}: {show(old)} -> {show(new)}")
    return Reconfig(replace(fresh, **keep), tuple(changed), tuple(restart))
