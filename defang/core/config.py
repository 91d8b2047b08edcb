"""Configuration: one TOML file (``etc/defang.toml``), command-line overrides on top.

Every option is declared once, in its section's frozen dataclass here (default, and the
converter of its TOML value in the field's metadata); ``Config`` and ``KEYS`` are made from
those, an engine takes its section as-is (``cfg.section(MimeSection)``), and each option has
a documented line in ``etc/defang.toml``.  An unknown key is an error (a typo must not
silently leave a default in force).  Relative paths are taken relative to the directory
of the config file, so the default ``etc/defang.toml`` finds ``filters/filter.py``
wherever it is run from.

Where the defaults are (``DEFAULTS``): an installed defang carries ``etc/`` and
``filters/`` as package data, ``<site-packages>/defang/etc`` and ``defang/filters``; a
source tree has them beside ``defang/``.  Both keep the two folders side by side, so the
default config's ``filter = "../filters/filter.py"`` holds in either.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from defang.core.convert import (
    as_bool,
    as_canon,
    as_choice,
    as_facility,
    as_file_cap,
    as_filter_mode,
    as_int,
    as_key,
    as_level,
    as_list,
    as_loopback,
    as_macros,
    as_mode,
    as_name,
    as_names,
    as_num,
    as_path,
    as_port,
    as_pos_int,
    as_pos_num,
    as_prefix,
    as_redis_url,
    as_release_method,
    as_server,
    as_str,
)
from defang.core.options import SECTIONS, flat_view, opt, options, section_of
from defang.core.verdicts import Verdict, for_reply

_PACKAGE = Path(__file__).resolve().parent.parent  # .../defang


def _defaults_dir() -> Path:
    """The folder holding ``etc/`` and ``filters/``: the installed package, else the source tree."""
    if (_PACKAGE / "etc" / "defang.toml").is_file():
        return _PACKAGE
    return _PACKAGE.parent


DEFAULTS = _defaults_dir()
DEFAULT_CONFIG = DEFAULTS / "etc" / "defang.toml"
DEFAULT_FILTER = DEFAULTS / "filters" / "filter.py"
MiB = 1024 * 1024


class ConfigError(Exception):
    """The configuration cannot be used; the text says which key and why."""


@dataclass(frozen=True)
class ReplySpec:
    """An SMTP reply the daemons give on their own (not decided by the filter)."""

    code: str
    dsn: str
    text: str

    @property
    def verdict(self) -> Verdict:
        return for_reply(self.code, self.dsn, self.text)


def _reply(v: Any) -> ReplySpec:
    if not isinstance(v, dict) or set(v) - {"code", "dsn", "text"}:
        raise TypeError("expected a table with code, dsn and text")
    code, dsn, text = str(v.get("code", "")), str(v.get("dsn", "")), str(v.get("text", ""))
    if len(code) != 3 or code[0] not in "45" or not code.isdigit():
        raise TypeError(f"code {code!r} is not a 4xx or 5xx SMTP code")
    if not dsn.startswith(code[0] + "."):
        raise TypeError(f"dsn {dsn!r} does not match code {code}")
    if "\r" in text or "\0" in text:
        raise TypeError("text may not contain CR or NUL (an SMTP reply is lines of text)")
    return ReplySpec(code, dsn, text)


def _address(v: Any, what: str) -> str:
    if as_str(v):
        try:
            socket_address(v)
        except ConfigError as exc:
            raise TypeError(f"{what} address: {exc}") from None
    return v


def _one_word(v: Any) -> str:
    """A name or address that goes on an SMTP command line (``[verify] helo``, ``sender``)."""
    if any(c.isspace() or not c.isprintable() or c in "<>" for c in as_str(v)):
        raise TypeError("expected one word (no space, control character or angle bracket)")
    return v


@options("daemon")
class DaemonSection:
    runtime_dir: Path = opt(Path(), as_path)
    filter: Path = opt(DEFAULT_FILTER, as_path)
    log_level: str = opt("info", as_level)
    user: str = opt("defang", as_name, flat="daemon_user")
    group: str = opt("defang", as_name, flat="daemon_group")


@options("log", "log_")  # defang.core.logsetup
class LogSection:
    format: str = opt("text", lambda v: as_choice(v, ("text", "kv", "json")))
    destination: str = opt("stderr", lambda v: as_choice(v, ("stderr", "syslog", "file")))
    file: Path = opt(Path(), as_path)
    syslog_facility: str = opt("mail", as_facility)
    syslog_socket: Path = opt(Path("/dev/log"), as_path)


@options("metrics", "metrics_")  # defang.multiplexor.metrics
class MetricsSection:
    listen: str = opt("", as_loopback)


@options("milter")
class MilterSection:
    socket: str = opt("", as_str, flat="milter_socket")
    socket_mode: int = opt(0o660, as_mode)
    socket_group: str = opt("postfix", as_str)
    spool_dir: Path = opt(Path(), as_path)
    io_timeout: int = opt(600, as_pos_int, flat="milter_io_timeout")
    tcp_nodelay: bool = opt(True, as_bool)
    request_timeout: float = opt(0.0, as_num)
    max_message_size: int = opt(50 * MiB, as_pos_int)
    max_header_bytes: int = opt(MiB, as_pos_int)
    max_headers: int = opt(1000, as_pos_int)
    max_recipients: int = opt(1000, as_pos_int)
    macros: tuple[str, ...] = opt((
        "i", "j", "_", "{daemon_name}", "{daemon_addr}", "{daemon_port}",
        "{if_addr}", "{client_addr}", "{client_port}", "{client_name}",
        "{auth_type}", "{auth_authen}", "{auth_author}",
        "{tls_version}", "{cipher}", "{cert_subject}", "{cert_issuer}", "{mail_mailer}",
    ), as_macros)  # fmt: skip


@options("multiplexor")
class MultiplexorSection:
    socket: Path = opt(Path(), as_path, flat="multiplexor_socket")
    control_socket: Path = opt(Path(), as_path)
    control_socket_mode: int = opt(0o660, as_mode)
    control_group: str = opt("", as_str)
    min_workers: int = opt(2, as_int)
    max_workers: int = opt(10, as_pos_int)
    min_spare: int = opt(1, as_int)
    idle_timeout: float = opt(300.0, as_num)
    max_frame_size: int = opt(MiB, as_pos_int)
    busy_timeout: float = opt(60.0, as_num)
    busy_grace: float = opt(5.0, as_num)
    queue_size: int = opt(200, as_int)
    queue_timeout: float = opt(120.0, as_num)
    max_requests: int = opt(500, as_int)
    max_requests_jitter: int = opt(50, as_int)
    max_rss: int = opt(0, as_int)


@options("filter")
class FilterSection:
    max_notes_bytes: int = opt(64 * 1024, as_pos_int)
    mode: str = opt("enforce", as_filter_mode, flat="filter_mode")
    monitor_rules: tuple[str, ...] = opt((), as_names)
    max_cpu_seconds: float = opt(10.0, as_num)
    on_cpu_limit: ReplySpec = opt(ReplySpec("554", "5.6.0", "Message too costly to check (local limit)"),
                                  _reply)  # fmt: skip
    tick_interval: float = opt(0.0, as_num)  # filter_tick every so many seconds; 0 = never
    tick_timeout: float = opt(30.0, as_pos_num)


@options("replies")
class RepliesSection:
    on_filter_error: ReplySpec = opt(ReplySpec("451", "4.3.0", "Temporary filter error, try again later"),
                                     _reply)  # fmt: skip
    on_internal_error: ReplySpec = opt(ReplySpec("451", "4.3.0", "Mail filter unavailable, try again later"),
                                       _reply)  # fmt: skip
    on_busy: ReplySpec = opt(ReplySpec("451", "4.3.2", "defang busy, try again later"), _reply)
    on_message_too_large: ReplySpec = opt(ReplySpec("552", "5.3.4", "Message size exceeds limit"), _reply)
    on_header_too_large: ReplySpec = opt(ReplySpec("552", "5.3.4", "Message header exceeds limit"), _reply)
    on_too_many_recipients: ReplySpec = opt(ReplySpec("452", "4.5.3", "Too many recipients"), _reply)


@options("mime", "mime_")  # defang.workers.mime.limits.MimeLimits (0 = no limit)
class MimeSection:
    """The ``[mime]`` limits; see etc/defang.toml for what each one bounds."""

    max_parts: int = opt(5000, as_int)
    max_depth: int = opt(50, as_int)
    max_decoded_size: int = opt(100 * MiB, as_int)
    max_archive_members: int = opt(5000, as_int)
    max_archive_depth: int = opt(3, as_int)
    max_archive_expansion: int = opt(100 * MiB, as_int)
    on_limit: ReplySpec = opt(ReplySpec("554", "5.6.0", "Message structure exceeds local limits"), _reply)


@options("quarantine", "quarantine_")
class QuarantineSection:
    dir: Path = opt(Path(), as_path)
    release_method: str = opt("sendmail", as_release_method)
    sendmail_path: Path = opt(Path("/usr/sbin/sendmail"), as_path)
    smtp_host: str = opt("127.0.0.1", as_str)
    smtp_port: int = opt(25, as_port)
    max_files: int = opt(100, as_file_cap)
    max_bytes: int = opt(50 * MiB, as_int)


@options("spamassassin", "spamassassin_")  # the scanners (api.scanning.Scanner): address "" = not asked
class SpamassassinSection:
    address: str = opt("", lambda v: _address(v, "spamd"))
    connect_timeout: float = opt(2.0, as_pos_num)
    timeout: float = opt(20.0, as_pos_num)
    max_size: int = opt(512000, as_pos_int)
    user: str = opt("", as_str)
    add_received: bool = opt(True, as_bool)


@options("clamav", "clamav_")
class ClamavSection:
    address: str = opt("", lambda v: _address(v, "clamd"))
    connect_timeout: float = opt(2.0, as_pos_num)
    timeout: float = opt(20.0, as_pos_num)
    max_size: int = opt(25 * MiB, as_pos_int)
    fd_passing: bool = opt(True, as_bool)


@options("rspamd", "rspamd_")
class RspamdSection:
    address: str = opt("", lambda v: _address(v, "rspamd"))
    connect_timeout: float = opt(2.0, as_pos_num)
    timeout: float = opt(10.0, as_pos_num)
    max_size: int = opt(20 * MiB, as_pos_int)


@options("notify", "notify_")
class NotifySection:
    method: str = opt("sendmail", as_release_method)
    sendmail_path: Path = opt(Path("/usr/sbin/sendmail"), as_path)
    smtp_host: str = opt("127.0.0.1", as_str)
    smtp_port: int = opt(25, as_port)
    timeout: float = opt(60.0, as_pos_num)
    from_: str = opt("MAILER-DAEMON", as_str, key="from")
    administrator: str = opt("postmaster", as_str)


@options("split", "split_")
class SplitSection:
    method: str = opt("sendmail", as_release_method)
    sendmail_path: Path = opt(Path("/usr/sbin/sendmail"), as_path)
    smtp_host: str = opt("127.0.0.1", as_str)
    smtp_port: int = opt(25, as_port)
    timeout: float = opt(10.0, as_pos_num)
    max_copies: int = opt(50, as_pos_int)


@options("dns", "dns_")  # defang.workers.checks.resolver.DnsSettings
class DnsSection:
    servers: tuple[str, ...] = opt((), lambda v: tuple(as_server(x) for x in as_list(v)))  # () = resolv.conf
    timeout: float = opt(2.0, as_pos_num)  # one try of one server
    lifetime: float = opt(5.0, as_pos_num)  # one lookup, all tries
    cache_size: int = opt(10000, as_pos_int)


@options("auth")  # [dns], [auth], [dkim], [arc]: defang.auth
class AuthSection:
    authserv_id: str = opt("", as_str)
    public_suffix_list: str = opt("", as_str)  # "" = the list that ships with publicsuffixlist


@options("dkim", "dkim_")
class DkimSection:
    accept_rsa_sha1: bool = opt(False, as_bool)  # RFC 8301: rsa-sha1 signatures fail
    keys: tuple[tuple[str, str, str], ...] = opt((), lambda v: tuple(as_key(k) for k in as_list(v)))
    body_canonicalization: str = opt("relaxed", as_canon)


@options("arc", "arc_")
class ArcSection:
    key: tuple[str, str, str] | None = opt(None, lambda v: as_key(v) if v else None)  # domain, selector, file


@options("state", "state_")  # defang.workers.stores.state.StateSettings
class StateSection:
    backend: str = opt("sqlite", lambda v: as_choice(v, ("sqlite", "redis")))
    path: Path = opt(Path(), as_path)
    redis_url: str = opt("redis://127.0.0.1:6379/0", as_redis_url)
    timeout: float = opt(2.0, as_pos_num)
    on_error: str = opt("tempfail", lambda v: as_choice(v, ("tempfail", "accept")))
    sweep_interval: float = opt(300.0, as_pos_num)


@options("greylist", "greylist_")  # defang.workers.stores.state.GreylistSettings (seconds)
class GreylistSection:
    delay: float = opt(300.0, as_num)
    retry_window: float = opt(4 * 3600.0, as_pos_num)
    pass_ttl: float = opt(36 * 86400.0, as_pos_num)
    auto_allow: int = opt(5, as_int)
    ipv4_prefix: int = opt(24, lambda v: as_prefix(v, 32))
    ipv6_prefix: int = opt(64, lambda v: as_prefix(v, 128))


@options("verify", "verify_")  # defang.workers.checks.smtpverify.VerifySettings (probes at the next hop)
class VerifySection:
    host: str = opt("", as_str)
    port: int = opt(25, as_port)
    helo: str = opt("", _one_word)
    sender: str = opt("", _one_word)
    timeout: float = opt(10.0, as_pos_num)
    positive_ttl: float = opt(86400.0, as_num)
    negative_ttl: float = opt(3600.0, as_num)
    on_error: str = opt("tempfail", lambda v: as_choice(v, ("tempfail", "accept")))


def _effective_request_timeout(self: Any) -> float:
    """How long the front end waits for a decision before it tempfails.

    Longer than anything the multiplexor itself may take (queue wait, then a hung
    worker's deadline), so that normally the multiplexor answers first and says why.
    """
    if self.request_timeout > 0:
        return self.request_timeout
    return self.queue_timeout + self.busy_timeout + self.busy_grace + 5.0


#: every option under its flat name (``cfg.mime_max_parts``), as the daemons read it, and the file
#: it was read from; ``cfg.section(MimeSection)`` gives a section as its engine takes it
_SOURCE = ("source", "Path | None", field(default=None, compare=False))
Config = flat_view("Config", *SECTIONS, module=__name__, extra=(_SOURCE,),
                   namespace={"effective_request_timeout": _effective_request_timeout, "section": section_of})

#: (section, key) -> (Config attribute, converter)
KEYS: dict[tuple[str, str], tuple[str, Any]] = {
    (s.SECTION, s.KEYS[f.name]): (s.FLAT[f.name], f.metadata["conv"]) for s in SECTIONS for f in fields(s)
}


#: the runtime dir of a defang started as root, as a packaged daemon's (only root may
#: create it, so no local user can take the name first)
SYSTEM_RUNTIME_DIR = Path("/run/defang")
#: With the system runtime dir (a tmpfs, emptied at boot), what must outlive a reboot goes
#: where a packaged daemon keeps it: the quarantine in the spool tree, the state in /var/lib.
SYSTEM_QUARANTINE_DIR = Path("/var/spool/defang/quarantine")
SYSTEM_STATE_PATH = Path("/var/lib/defang/state.sqlite3")


def default_runtime_dir() -> Path:
    """Where the sockets and spool go when neither the config nor a flag says.

    Started as root: ``/run/defang``.  Started by systemd with ``RuntimeDirectory=``: the
    directory it made (``$RUNTIME_DIRECTORY``).  Otherwise a directory that needs no root:
    ``$XDG_RUNTIME_DIR/defang``, else ``/tmp/defang-UID``.  Decided once, by the first
    process and before it gives up root (``defang run`` hands it to the daemons it forks):
    asked again after the switch it would name the unprivileged user's directory.
    """
    if os.geteuid() == 0:
        return SYSTEM_RUNTIME_DIR
    systemd = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if systemd.startswith("/"):
        return Path(systemd)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isdir(xdg):
        return Path(xdg) / "defang"
    return Path(f"/tmp/defang-{os.geteuid()}")


def running_runtime_dir() -> Path:
    """The default runtime dir for a client (``defangctl``, ``defang quarantine``, ``lists``).

    Its own default when a defang of its user runs there (the directory is the user's),
    else ``/run/defang`` when the system's defang runs there (root, the ``defang`` user
    and members of its group all find it with no flag), else its own default (which the
    error then names).
    """
    mine = default_runtime_dir()
    try:
        ours = os.lstat(mine).st_uid in (0, os.geteuid())  # not a name another user took first
    except OSError:
        ours = False
    if ours and os.path.exists(mine / "control.sock"):
        return mine
    if os.path.exists(SYSTEM_RUNTIME_DIR / "control.sock"):  # only root may make /run/defang
        return SYSTEM_RUNTIME_DIR
    return mine


def load(
    path: str | os.PathLike[str] | None = None,
    *,
    filter_path: str | None = None,
    socket: str | None = None,
    runtime_dir: str | None = None,
    client: bool = False,
) -> Config:
    """Read the config file, apply overrides, fill in the derived paths.

    ``client``: for a command that talks to running daemons rather than being one; an
    unset runtime dir is then the one a defang runs in (``running_runtime_dir``).
    """
    cfg_path = Path(path) if path else DEFAULT_CONFIG
    try:
        with open(cfg_path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{cfg_path}: config file not found") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{cfg_path}: {exc}") from None
    base = cfg_path.resolve().parent
    values: dict[str, Any] = {}
    for section, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{cfg_path}: [{section}] must be a table")
        for key, raw in table.items():
            spec = KEYS.get((section, key))
            if spec is None:
                raise ConfigError(f"{cfg_path}: unknown option [{section}] {key}")
            attr, conv = spec
            try:
                value = conv(raw)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{cfg_path}: [{section}] {key} = {raw!r}: {exc}") from None
            if isinstance(value, Path) and raw and not value.is_absolute():
                value = (base / value).resolve()
            values[attr] = value
    cfg = replace(Config(), source=cfg_path.resolve(), **values)
    if "max_cpu_seconds" in values and 0 < (busy := cfg.busy_timeout) <= (cpu := cfg.max_cpu_seconds):
        raise ConfigError(f"{cfg_path}: [filter] max_cpu_seconds {cpu:g} must be below [multiplexor] "
                          f"busy_timeout {busy:g}: the pool would stop the worker (a 4xx) first")
    if filter_path:
        cfg = replace(cfg, filter=Path(filter_path).resolve())
    if socket:
        cfg = replace(cfg, milter_socket=socket)
    if runtime_dir:
        cfg = replace(cfg, runtime_dir=Path(runtime_dir).resolve())
    if client and str(cfg.runtime_dir) in ("", "."):
        cfg = replace(cfg, runtime_dir=running_runtime_dir())
    return finish(cfg)


def finish(cfg: Config) -> Config:
    """Derive the paths left empty from the runtime dir (the quarantine and the state
    file of a system defang, whose runtime dir is emptied at boot: under /var)."""
    run = cfg.runtime_dir if str(cfg.runtime_dir) not in ("", ".") else default_runtime_dir()
    system = run == SYSTEM_RUNTIME_DIR
    derived: dict[str, Any] = {"runtime_dir": run}
    if str(cfg.spool_dir) in ("", "."):
        derived["spool_dir"] = run / "spool"
    if str(cfg.multiplexor_socket) in ("", "."):
        derived["multiplexor_socket"] = run / "multiplexor.sock"
    if str(cfg.quarantine_dir) in ("", "."):
        derived["quarantine_dir"] = SYSTEM_QUARANTINE_DIR if system else run / "quarantine"
    if str(cfg.state_path) in ("", "."):
        derived["state_path"] = SYSTEM_STATE_PATH if system else run / "state.sqlite3"
    if str(cfg.control_socket) in ("", "."):
        derived["control_socket"] = run / "control.sock"
    if not cfg.milter_socket:
        derived["milter_socket"] = f"unix:{run / 'milter.sock'}"
    cfg = replace(cfg, **derived)
    check_socket_spec(cfg.milter_socket)
    if cfg.socket_mode & 0o002:
        raise ConfigError(f"[milter] socket_mode {cfg.socket_mode:04o}: others could write to the milter "
                          "socket and answer for the MTA; give the MTA's group access instead")  # fmt: skip
    if cfg.log_destination == "file" and str(cfg.log_file) in ("", "."):
        raise ConfigError('[log] destination = "file" needs [log] file, the path to write to')
    if cfg.min_workers > cfg.max_workers:
        raise ConfigError(f"[multiplexor] min_workers {cfg.min_workers} > max_workers {cfg.max_workers}")
    if cfg.min_spare > cfg.max_workers:
        raise ConfigError(f"[multiplexor] min_spare {cfg.min_spare} > max_workers {cfg.max_workers}")
    if 0 < cfg.busy_timeout <= cfg.max_cpu_seconds:  # the default, over a smaller busy_timeout (load)
        cfg = replace(cfg, max_cpu_seconds=cfg.busy_timeout / 2)
    return cfg


def socket_address(spec: str) -> str | tuple[str, int]:
    """A socket in the notation Postfix and Sendmail write, for the milter socket and the
    daemons defang talks to: ``unix:/path`` (or ``local:``) -> the path, ``inet:PORT@HOST``
    -> (host, port) (no host: 127.0.0.1).  ConfigError otherwise."""
    kind, _, rest = spec.partition(":")
    if kind in ("unix", "local") and rest.startswith("/"):
        return rest
    if kind in ("inet", "inet6"):
        port, _, host = rest.partition("@")
        if port.isdigit() and 0 < int(port) < 65536:
            return (host or "127.0.0.1", int(port))
    raise ConfigError(f"{spec!r}: expected unix:/absolute/path or inet:PORT@HOST")


def check_socket_spec(spec: str) -> None:
    """The milter socket: unix:/path, local:/path, inet:PORT@HOST."""
    try:
        socket_address(spec)
    except ConfigError as exc:
        raise ConfigError(f"milter socket {exc}") from None


def unix_socket_path(spec: str) -> Path | None:
    kind, _, rest = spec.partition(":")
    return Path(rest) if kind in ("unix", "local") else None

