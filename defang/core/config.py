"""Configuration: one TOML file (``etc/defang.toml``), command-line overrides on top.

Every option has a default here and a documented line in ``etc/defang.toml``; an
unknown key is an error (a typo must not silently leave a default in force).
Relative paths are taken relative to the directory of the config file, so the
default ``etc/defang.toml`` finds ``filters/filter.py`` wherever it is run from.

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


@dataclass(frozen=True)
class Config:
    # [daemon]
    runtime_dir: Path = Path()
    filter: Path = DEFAULT_FILTER
    log_level: str = "info"
    daemon_user: str = "defang"
    daemon_group: str = "defang"
    # [log], [metrics] (defang.core.logsetup, defang.multiplexor.metrics)
    log_format: str = "text"
    log_destination: str = "stderr"
    log_file: Path = Path()
    log_syslog_facility: str = "mail"
    log_syslog_socket: Path = Path("/dev/log")
    metrics_listen: str = ""
    tick_interval: float = 0.0  # [filter]: filter_tick every so many seconds; 0 = never
    tick_timeout: float = 30.0
    # [milter]
    milter_socket: str = ""
    socket_mode: int = 0o660
    socket_group: str = "postfix"
    spool_dir: Path = Path()
    milter_io_timeout: int = 600
    tcp_nodelay: bool = True
    request_timeout: float = 0.0
    max_message_size: int = 50 * 1024 * 1024
    max_header_bytes: int = 1024 * 1024
    max_headers: int = 1000
    max_recipients: int = 1000
    macros: tuple[str, ...] = (
        "i", "j", "_", "{daemon_name}", "{daemon_addr}", "{daemon_port}",
        "{if_addr}", "{client_addr}", "{client_port}", "{client_name}",
        "{auth_type}", "{auth_authen}", "{auth_author}",
        "{tls_version}", "{cipher}", "{cert_subject}", "{cert_issuer}", "{mail_mailer}",
    )  # fmt: skip
    # [multiplexor]
    multiplexor_socket: Path = Path()
    control_socket: Path = Path()
    control_socket_mode: int = 0o660
    control_group: str = ""
    min_workers: int = 2
    max_workers: int = 10
    min_spare: int = 1
    idle_timeout: float = 300.0
    max_frame_size: int = 1024 * 1024
    busy_timeout: float = 60.0
    busy_grace: float = 5.0
    queue_size: int = 200
    queue_timeout: float = 120.0
    max_requests: int = 500
    max_requests_jitter: int = 50
    max_rss: int = 0
    # [filter]
    max_notes_bytes: int = 64 * 1024
    filter_mode: str = "enforce"
    monitor_rules: tuple[str, ...] = ()
    max_cpu_seconds: float = 10.0
    on_cpu_limit: ReplySpec = ReplySpec("554", "5.6.0", "Message too costly to check (local limit)")
    on_filter_error: ReplySpec = ReplySpec("451", "4.3.0", "Temporary filter error, try again later")
    on_internal_error: ReplySpec = ReplySpec(
        "451", "4.3.0", "Mail filter unavailable, try again later"
    )
    on_busy: ReplySpec = ReplySpec("451", "4.3.2", "defang busy, try again later")
    on_message_too_large: ReplySpec = ReplySpec("552", "5.3.4", "Message size exceeds limit")
    on_header_too_large: ReplySpec = ReplySpec("552", "5.3.4", "Message header exceeds limit")
    on_too_many_recipients: ReplySpec = ReplySpec("452", "4.5.3", "Too many recipients")
    # [mime]
    mime_max_parts: int = 5000
    mime_max_depth: int = 50
    mime_max_decoded_size: int = 100 * 1024 * 1024
    mime_max_archive_members: int = 5000
    mime_max_archive_depth: int = 3
    mime_max_archive_expansion: int = 100 * 1024 * 1024
    mime_on_limit: ReplySpec = ReplySpec("554", "5.6.0", "Message structure exceeds local limits")
    # [quarantine]
    quarantine_dir: Path = Path()
    quarantine_release_method: str = "sendmail"
    quarantine_sendmail_path: Path = Path("/usr/sbin/sendmail")
    quarantine_smtp_host: str = "127.0.0.1"
    quarantine_smtp_port: int = 25
    quarantine_max_files: int = 100
    quarantine_max_bytes: int = 50 * 1024 * 1024
    # [spamassassin] (spamd), [clamav] (clamd): "" = not asked
    spamassassin_address: str = ""
    spamassassin_connect_timeout: float = 2.0
    spamassassin_timeout: float = 20.0
    spamassassin_max_size: int = 512000
    spamassassin_user: str = ""
    spamassassin_add_received: bool = True
    clamav_address: str = ""
    clamav_connect_timeout: float = 2.0
    clamav_timeout: float = 20.0
    clamav_max_size: int = 25 * 1024 * 1024
    clamav_fd_passing: bool = True
    # [rspamd]: "" = not asked
    rspamd_address: str = ""
    rspamd_connect_timeout: float = 2.0
    rspamd_timeout: float = 10.0
    rspamd_max_size: int = 20 * 1024 * 1024
    # [notify]
    notify_method: str = "sendmail"
    notify_sendmail_path: Path = Path("/usr/sbin/sendmail")
    notify_smtp_host: str = "127.0.0.1"
    notify_smtp_port: int = 25
    notify_timeout: float = 60.0
    notify_from: str = "MAILER-DAEMON"
    notify_administrator: str = "postmaster"
    # [split]
    split_method: str = "sendmail"
    split_sendmail_path: Path = Path("/usr/sbin/sendmail")
    split_smtp_host: str = "127.0.0.1"
    split_smtp_port: int = 25
    split_timeout: float = 10.0
    split_max_copies: int = 50
    # [dns], [auth], [dkim], [arc] (defang.auth)
    dns_servers: tuple[str, ...] = ()
    dns_timeout: float = 2.0
    dns_lifetime: float = 5.0
    dns_cache_size: int = 10000
    authserv_id: str = ""
    dkim_keys: tuple[tuple[str, str, str], ...] = ()  # (domain, selector, key file)
    dkim_body_canonicalization: str = "relaxed"
    arc_key: tuple[str, str, str] | None = None
    public_suffix_list: str = ""
    dkim_accept_rsa_sha1: bool = False
    # [state] (defang.state: greylisting, rate limits, lists), [greylist]
    state_backend: str = "sqlite"
    state_path: Path = Path()
    state_redis_url: str = "redis://127.0.0.1:6379/0"
    state_timeout: float = 2.0
    state_on_error: str = "tempfail"
    state_sweep_interval: float = 300.0
    greylist_delay: float = 300.0
    greylist_retry_window: float = 4 * 3600.0
    greylist_pass_ttl: float = 36 * 86400.0
    greylist_auto_allow: int = 5
    greylist_ipv4_prefix: int = 24
    greylist_ipv6_prefix: int = 64
    # [verify] (defang.verify: recipients probed at the next hop)
    verify_host: str = ""
    verify_port: int = 25
    verify_helo: str = ""
    verify_sender: str = ""
    verify_timeout: float = 10.0
    verify_positive_ttl: float = 86400.0
    verify_negative_ttl: float = 3600.0
    verify_on_error: str = "tempfail"
    source: Path | None = field(default=None, compare=False)

    def effective_request_timeout(self) -> float:
        """How long the front end waits for a decision before it tempfails.

        Longer than anything the multiplexor itself may take (queue wait, then a hung
        worker's deadline), so that normally the multiplexor answers first and says why.
        """
        if self.request_timeout > 0:
            return self.request_timeout
        return self.queue_timeout + self.busy_timeout + self.busy_grace + 5.0


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


# (section, key) -> (Config attribute, converter)
KEYS: dict[tuple[str, str], tuple[str, Any]] = {
    ("daemon", "runtime_dir"): ("runtime_dir", as_path),
    ("daemon", "filter"): ("filter", as_path),
    ("daemon", "log_level"): ("log_level", as_level),
    ("daemon", "user"): ("daemon_user", as_name),
    ("daemon", "group"): ("daemon_group", as_name),
    ("log", "format"): ("log_format", lambda v: as_choice(v, ("text", "kv", "json"))),
    ("log", "destination"): ("log_destination", lambda v: as_choice(v, ("stderr", "syslog", "file"))),
    ("log", "file"): ("log_file", as_path),
    ("log", "syslog_facility"): ("log_syslog_facility", as_facility),
    ("log", "syslog_socket"): ("log_syslog_socket", as_path),
    ("metrics", "listen"): ("metrics_listen", as_loopback),
    ("filter", "tick_interval"): ("tick_interval", as_num),
    ("filter", "tick_timeout"): ("tick_timeout", as_pos_num),
    ("milter", "socket"): ("milter_socket", as_str),
    ("milter", "socket_mode"): ("socket_mode", as_mode),
    ("milter", "socket_group"): ("socket_group", as_str),
    ("milter", "spool_dir"): ("spool_dir", as_path),
    ("milter", "io_timeout"): ("milter_io_timeout", as_pos_int),
    ("milter", "tcp_nodelay"): ("tcp_nodelay", as_bool),
    ("milter", "request_timeout"): ("request_timeout", as_num),
    ("milter", "max_message_size"): ("max_message_size", as_pos_int),
    ("milter", "max_header_bytes"): ("max_header_bytes", as_pos_int),
    ("milter", "max_headers"): ("max_headers", as_pos_int),
    ("milter", "max_recipients"): ("max_recipients", as_pos_int),
    ("milter", "macros"): ("macros", as_macros),
    ("multiplexor", "socket"): ("multiplexor_socket", as_path),
    ("multiplexor", "control_socket"): ("control_socket", as_path),
    ("multiplexor", "control_socket_mode"): ("control_socket_mode", as_mode),
    ("multiplexor", "control_group"): ("control_group", as_str),
    ("multiplexor", "min_workers"): ("min_workers", as_int),
    ("multiplexor", "max_workers"): ("max_workers", as_pos_int),
    ("multiplexor", "min_spare"): ("min_spare", as_int),
    ("multiplexor", "idle_timeout"): ("idle_timeout", as_num),
    ("multiplexor", "max_frame_size"): ("max_frame_size", as_pos_int),
    ("multiplexor", "busy_timeout"): ("busy_timeout", as_num),
    ("multiplexor", "busy_grace"): ("busy_grace", as_num),
    ("multiplexor", "queue_size"): ("queue_size", as_int),
    ("multiplexor", "queue_timeout"): ("queue_timeout", as_num),
    ("multiplexor", "max_requests"): ("max_requests", as_int),
    ("multiplexor", "max_requests_jitter"): ("max_requests_jitter", as_int),
    ("multiplexor", "max_rss"): ("max_rss", as_int),
    ("filter", "max_notes_bytes"): ("max_notes_bytes", as_pos_int),
    ("filter", "mode"): ("filter_mode", as_filter_mode),
    ("filter", "monitor_rules"): ("monitor_rules", as_names),
    ("filter", "max_cpu_seconds"): ("max_cpu_seconds", as_num),
    ("filter", "on_cpu_limit"): ("on_cpu_limit", _reply),
    ("replies", "on_filter_error"): ("on_filter_error", _reply),
    ("replies", "on_internal_error"): ("on_internal_error", _reply),
    ("replies", "on_busy"): ("on_busy", _reply),
    ("replies", "on_message_too_large"): ("on_message_too_large", _reply),
    ("replies", "on_header_too_large"): ("on_header_too_large", _reply),
    ("replies", "on_too_many_recipients"): ("on_too_many_recipients", _reply),
    ("mime", "max_parts"): ("mime_max_parts", as_int),
    ("mime", "max_depth"): ("mime_max_depth", as_int),
    ("mime", "max_decoded_size"): ("mime_max_decoded_size", as_int),
    ("mime", "max_archive_members"): ("mime_max_archive_members", as_int),
    ("mime", "max_archive_depth"): ("mime_max_archive_depth", as_int),
    ("mime", "max_archive_expansion"): ("mime_max_archive_expansion", as_int),
    ("mime", "on_limit"): ("mime_on_limit", _reply),
    ("quarantine", "dir"): ("quarantine_dir", as_path),
    ("quarantine", "release_method"): ("quarantine_release_method", as_release_method),
    ("quarantine", "sendmail_path"): ("quarantine_sendmail_path", as_path),
    ("quarantine", "smtp_host"): ("quarantine_smtp_host", as_str),
    ("quarantine", "smtp_port"): ("quarantine_smtp_port", as_port),
    ("quarantine", "max_files"): ("quarantine_max_files", as_file_cap),
    ("quarantine", "max_bytes"): ("quarantine_max_bytes", as_int),
    ("spamassassin", "address"): ("spamassassin_address", lambda v: _address(v, "spamd")),
    ("spamassassin", "connect_timeout"): ("spamassassin_connect_timeout", as_pos_num),
    ("spamassassin", "timeout"): ("spamassassin_timeout", as_pos_num),
    ("spamassassin", "max_size"): ("spamassassin_max_size", as_pos_int),
    ("spamassassin", "user"): ("spamassassin_user", as_str),
    ("spamassassin", "add_received"): ("spamassassin_add_received", as_bool),
    ("clamav", "address"): ("clamav_address", lambda v: _address(v, "clamd")),
    ("clamav", "connect_timeout"): ("clamav_connect_timeout", as_pos_num),
    ("clamav", "timeout"): ("clamav_timeout", as_pos_num),
    ("clamav", "max_size"): ("clamav_max_size", as_pos_int),
    ("clamav", "fd_passing"): ("clamav_fd_passing", as_bool),
    ("rspamd", "address"): ("rspamd_address", lambda v: _address(v, "rspamd")),
    ("rspamd", "connect_timeout"): ("rspamd_connect_timeout", as_pos_num),
    ("rspamd", "timeout"): ("rspamd_timeout", as_pos_num),
    ("rspamd", "max_size"): ("rspamd_max_size", as_pos_int),
    ("notify", "method"): ("notify_method", as_release_method),
    ("notify", "sendmail_path"): ("notify_sendmail_path", as_path),
    ("notify", "smtp_host"): ("notify_smtp_host", as_str),
    ("notify", "smtp_port"): ("notify_smtp_port", as_port),
    ("notify", "timeout"): ("notify_timeout", as_pos_num),
    ("notify", "from"): ("notify_from", as_str),
    ("notify", "administrator"): ("notify_administrator", as_str),
    ("split", "method"): ("split_method", as_release_method),
    ("split", "sendmail_path"): ("split_sendmail_path", as_path),
    ("split", "smtp_host"): ("split_smtp_host", as_str),
    ("split", "smtp_port"): ("split_smtp_port", as_port),
    ("split", "timeout"): ("split_timeout", as_pos_num),
    ("split", "max_copies"): ("split_max_copies", as_pos_int),
    ("dns", "servers"): ("dns_servers", lambda v: tuple(as_server(x) for x in as_list(v))),
    ("dns", "timeout"): ("dns_timeout", as_pos_num),
    ("dns", "lifetime"): ("dns_lifetime", as_pos_num),
    ("dns", "cache_size"): ("dns_cache_size", as_pos_int),
    ("auth", "authserv_id"): ("authserv_id", as_str),
    ("auth", "public_suffix_list"): ("public_suffix_list", as_str),
    ("dkim", "accept_rsa_sha1"): ("dkim_accept_rsa_sha1", as_bool),
    ("dkim", "keys"): ("dkim_keys", lambda v: tuple(as_key(k) for k in as_list(v))),
    ("dkim", "body_canonicalization"): ("dkim_body_canonicalization", as_canon),
    ("arc", "key"): ("arc_key", lambda v: as_key(v) if v else None),
    ("state", "backend"): ("state_backend", lambda v: as_choice(v, ("sqlite", "redis"))),
    ("state", "path"): ("state_path", as_path),
    ("state", "redis_url"): ("state_redis_url", as_redis_url),
    ("state", "timeout"): ("state_timeout", as_pos_num),
    ("state", "on_error"): ("state_on_error", lambda v: as_choice(v, ("tempfail", "accept"))),
    ("state", "sweep_interval"): ("state_sweep_interval", as_pos_num),
    ("greylist", "delay"): ("greylist_delay", as_num),
    ("greylist", "retry_window"): ("greylist_retry_window", as_pos_num),
    ("greylist", "pass_ttl"): ("greylist_pass_ttl", as_pos_num),
    ("greylist", "auto_allow"): ("greylist_auto_allow", as_int),
    ("greylist", "ipv4_prefix"): ("greylist_ipv4_prefix", lambda v: as_prefix(v, 32)),
    ("greylist", "ipv6_prefix"): ("greylist_ipv6_prefix", lambda v: as_prefix(v, 128)),
    ("verify", "host"): ("verify_host", as_str),
    ("verify", "port"): ("verify_port", as_port),
    ("verify", "helo"): ("verify_helo", _one_word),
    ("verify", "sender"): ("verify_sender", _one_word),
    ("verify", "timeout"): ("verify_timeout", as_pos_num),
    ("verify", "positive_ttl"): ("verify_positive_ttl", as_num),
    ("verify", "negative_ttl"): ("verify_negative_ttl", as_num),
    ("verify", "on_error"): ("verify_on_error", lambda v: as_choice(v, ("tempfail", "accept"))),
}

_ATTRS = {f.name for f in fields(Config)}
assert all(attr in _ATTRS for attr, _ in KEYS.values())


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

