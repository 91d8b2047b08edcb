"""Converters from TOML values to Config fields: each raises TypeError saying what it expected.

``config.load`` turns that into ``file: [section] key = value: why``.
"""

from __future__ import annotations

import ipaddress
from logging.handlers import SysLogHandler
from pathlib import Path
from typing import Any


def as_path(v: Any) -> Path:
    if not isinstance(v, str):
        raise TypeError("expected a path string")
    return Path(v)


def as_int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TypeError("expected a non-negative integer")
    return v


def as_pos_int(v: Any) -> int:
    if as_int(v) == 0:
        raise TypeError("expected a positive integer")
    return v


def as_file_cap(v: Any) -> int:
    """Files of one quarantine entry: 0 (no cap) or at least 2 (message.eml and meta.json)."""
    if as_int(v) == 1:
        raise TypeError("expected 0 (no limit) or at least 2: message.eml and meta.json are always kept")
    return v


def as_num(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or v < 0:
        raise TypeError("expected a non-negative number")
    return float(v)


def as_bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise TypeError("expected true or false")
    return v


def as_str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("expected a string")
    return v


def as_mode(v: Any) -> int:
    if isinstance(v, str):
        return int(v, 8)
    raise TypeError('expected an octal string such as "0660"')


def as_level(v: Any) -> str:
    if v not in ("debug", "info", "warning", "error"):
        raise TypeError("expected debug, info, warning or error")
    return v


def as_macros(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(m, str) for m in v):
        raise TypeError("expected a list of macro names")
    return tuple(v)




def as_filter_mode(v: Any) -> str:
    if v not in ("enforce", "monitor"):
        raise TypeError('expected "enforce" or "monitor"')
    return v


def as_names(v: Any) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(m, str) and m for m in v):
        raise TypeError("expected a list of names")
    return tuple(v)


def as_release_method(v: Any) -> str:
    if v not in ("sendmail", "smtp"):
        raise TypeError('expected "sendmail" or "smtp"')
    return v


def as_pos_num(v: Any) -> float:
    if as_num(v) <= 0:
        raise TypeError("expected a number > 0")
    return float(v)




def as_list(v: Any) -> list:
    if not isinstance(v, list):
        raise TypeError("expected a list")
    return v


def as_server(v: Any) -> str:
    host = as_str(v)
    if host.count(":") == 1:
        host, _, port = host.partition(":")
        as_port(int(port) if port.isdigit() else -1)
    try:
        ipaddress.ip_address(host.strip("[]").split("]:")[0])
    except ValueError:
        raise TypeError(f"{v!r}: a server is an IP address, with :PORT if not 53") from None
    return v


def as_key(v: Any) -> tuple[str, str, str]:
    """A signing key: {domain = "example.com", selector = "s1", key = "/etc/defang/dkim/s1.key"}."""
    if not isinstance(v, dict) or set(v) != {"domain", "selector", "key"}:
        raise TypeError('expected {domain = "...", selector = "...", key = "/path/to/key.pem"}')
    if not all(isinstance(x, str) and x for x in v.values()):
        raise TypeError("domain, selector and key must be non-empty strings")
    if not v["key"].startswith("/"):
        raise TypeError(f"key {v['key']!r}: an absolute path")
    return (v["domain"].lower(), v["selector"], v["key"])


def as_canon(v: Any) -> str:
    if v not in ("relaxed", "simple"):
        raise TypeError('expected "relaxed" or "simple"')
    return v


def as_port(v: Any) -> int:
    if as_pos_int(v) > 65535:
        raise TypeError("expected a TCP port (1-65535)")
    return v


def as_name(v: Any) -> str:
    """A user or group name (looked up when the daemons start, not here: the config may be
    checked on another machine)."""
    if not isinstance(v, str) or not v or v.startswith("-") or any(c in v for c in ":/ \t\n"):
        raise TypeError("expected a user or group name")
    return v


def as_choice(v: Any, choices: tuple[str, ...]) -> str:
    if v not in choices:
        raise TypeError("expected " + " or ".join(f'"{c}"' for c in choices))
    return v


def as_prefix(v: Any, bits: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= bits:
        raise TypeError(f"expected a prefix length from 0 to {bits}")
    return v


def as_redis_url(v: Any) -> str:
    url = as_str(v)
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise TypeError('expected a Redis URL: "redis://HOST:PORT/DB", "rediss://..." or "unix:///path"')
    return url


def as_loopback(v: Any) -> str:
    """``"127.0.0.1:9187"``, ``"[::1]:9187"`` or "" (off): an address only this host reaches."""
    text = as_str(v)
    if text:
        loopback_address(text)
    return text


def loopback_address(text: str) -> tuple[str, int]:
    """``as_loopback``'s text as the (host, port) to bind (``[::1]:9187`` -> ``("::1", 9187)``);
    TypeError, saying why, for anything else."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise TypeError("expected HOST:PORT (a loopback address and a port), or \"\" for off")
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise TypeError(f"{host!r} is not an IP address (a loopback address: 127.0.0.1 or [::1])") from None
    if not ip.is_loopback:
        raise TypeError(f"{host} is not a loopback address: the metrics are for this host only "
                        "(a scraper elsewhere reaches them through a proxy or a tunnel)")  # fmt: skip
    return str(ip), int(port)


def as_facility(v: Any) -> str:
    """A syslog facility by name: mail, daemon, local0 ... local7, ..."""
    if v not in SysLogHandler.facility_names:
        raise TypeError("expected a syslog facility: mail, daemon, user or local0 to local7")
    return v
