"""``defang.lists``: allow and block lists, global and per recipient, in the shared state.

    from defang import lists

    def filter_recipient(conn, recipient):
        found = lists.check(conn, conn.notes.get("sender", ""), recipient)
        if found is not None:
            return found.verdict         # allow: accept(); block: 550 5.7.1; state down: on_error

Entries are envelope sender addresses (``alice@example.org``), domains (``example.org``:
the domain and every name under it) and client IP ranges (``203.0.113.0/24``, a single
address, IPv6 too).  A list is ``allow`` or ``block``, and its scope ``global`` or a
recipient (an address, or a domain for all its addresses).  Admins edit them with
``defang lists add|remove|show|import|export``; they live in the state (``[state]``), so
a change applies to the next message, without a reload, on every relay that shares it.

Allow lists are honoured first: an allow entry in the recipient's or the global list wins
over any block list (and a filter checks lists before greylisting, rate limits and
scores: the examples do).  ``check`` returns None when nothing matched.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from defang.core.verdicts import Verdict, accept, reject
from defang.workers.api import state
from defang.workers.api.conn import client_address
from defang.workers.stores.state import StateError, Store

log = logging.getLogger("defang.filter")

LISTS = ("allow", "block")
GLOBAL = "global"
SCOPES_KEY = "defang:list:scopes"  # every scope that has had an entry (for export)
BLOCKED = reject("Sender blocked by the recipient's policy", "550", "5.7.1")


class ListError(ValueError):
    """An entry or scope that is not an address, a domain or an IP range."""


def normalize(entry: str) -> tuple[str, bool]:
    """(the entry as stored, whether it is an IP range); ListError when it is none of the kinds."""
    text = entry.strip().lower()
    if not text or any(c.isspace() for c in text) or len(text) > 320:
        raise ListError(f"{entry!r}: expected an address, a domain or an IP range")
    try:
        return str(ipaddress.ip_network(text, strict=False)), True
    except ValueError:
        pass
    local, at, domain = text.rpartition("@")
    if at and not local:
        raise ListError(f"{entry!r}: an address needs a local part (a domain is written without @)")
    name = domain.rstrip(".")
    labels = name.split(".")
    if not name or any(not label or len(label) > 63 or label.startswith("-") or label.endswith("-")
                       or not all(c.isalnum() or c in "-_" for c in label) for label in labels):  # fmt: skip
        raise ListError(f"{entry!r}: expected an address, a domain or an IP range")
    return (f"{local}@{name}" if at else name), False


def scope_of(scope: str) -> str:
    if scope == GLOBAL:
        return scope
    value, is_net = normalize(scope)
    if is_net:
        raise ListError(f"{scope!r}: a scope is 'global', a recipient address or a recipient domain")
    return value


def _key(which: str, scope: str, nets: bool) -> str:
    if which not in LISTS:
        raise ListError(f"{which!r}: the lists are 'allow' and 'block'")
    return f"defang:list:{which}:{scope}" + (":net" if nets else "")


def add(which: str, entries: Iterable[str], scope: str = GLOBAL, st: Store | None = None) -> int:
    """Add entries to a list (ListError on a bad one, before anything is stored); how many were new."""
    st = st or state.store()
    scope = scope_of(scope)
    parsed = [normalize(e) for e in entries]
    st.sadd(SCOPES_KEY, [scope])
    names = [e for e, is_net in parsed if not is_net]
    nets = [e for e, is_net in parsed if is_net]
    return st.sadd(_key(which, scope, False), names) + st.sadd(_key(which, scope, True), nets)


def remove(which: str, entries: Iterable[str], scope: str = GLOBAL, st: Store | None = None) -> int:
    """Remove entries from a list; how many were there."""
    st = st or state.store()
    scope = scope_of(scope)
    parsed = [normalize(e) for e in entries]
    return (st.srem(_key(which, scope, False), [e for e, n in parsed if not n])
            + st.srem(_key(which, scope, True), [e for e, n in parsed if n]))  # fmt: skip


def show(which: str, scope: str = GLOBAL, st: Store | None = None) -> list[str]:
    """The entries of one list, sorted."""
    st = st or state.store()
    scope = scope_of(scope)
    return sorted(st.smembers(_key(which, scope, False)) | st.smembers(_key(which, scope, True)))


def scopes(st: Store | None = None) -> list[str]:
    """Every scope with entries, "global" first."""
    st = st or state.store()
    return sorted(st.smembers(SCOPES_KEY), key=lambda s: (s != GLOBAL, s))


@dataclass(frozen=True)
class Match:
    """What matched: ``list`` "allow" or "block", the ``scope``, the ``entry``."""

    list: str
    scope: str
    entry: str

    @property
    def allow(self) -> bool:
        return self.list == "allow"

    @property
    def verdict(self) -> Verdict:
        """``accept()`` for an allow entry, 550 5.7.1 for a block entry."""
        return accept() if self.allow else BLOCKED


@dataclass(frozen=True)
class Unavailable:
    """The state could not be reached and ``[state] on_error`` is "tempfail"."""

    verdict: Verdict
    allow = False


def _candidates(sender: str) -> list[str]:
    address = sender.strip().lower()
    domain = address.rpartition("@")[2].rstrip(".")
    labels = domain.split(".") if domain else []
    out = [address] if "@" in address else []
    return out + [".".join(labels[i:]) for i in range(len(labels))]


def _match_ip(st: Store, key: str, ip: str | None) -> str | None:
    addr = client_address(ip)
    if addr is None:
        return None
    for entry in st.smembers(key):
        try:
            if addr in ipaddress.ip_network(entry):
                return entry
        except ValueError:
            continue
    return None


def lookup(ip: str | None, sender: str, recipient: str | None = None,
           st: Store | None = None) -> Match | None:  # fmt: skip
    """The first entry that matches, allow lists first (recipient's, then global)."""
    st = st or state.store()
    names = _candidates(sender)
    wanted = [GLOBAL]
    if recipient:
        address = recipient.strip().lower()
        wanted = [address, address.rpartition("@")[2], GLOBAL]
    for which in LISTS:
        for scope in wanted:
            entry = st.sany(_key(which, scope, False), names) if names else None
            entry = entry or _match_ip(st, _key(which, scope, True), ip)
            if entry:
                return Match(which, scope, entry)
    return None


def check(conn: Any, sender: str, recipient: str | None = None) -> Match | Unavailable | None:
    """``lookup`` for a connection, logged; ``[state] on_error`` when the state is down
    (``Unavailable`` with the tempfail, or None for "accept")."""
    queue_id = conn.macros.get("i") or "-"
    try:
        found = lookup(conn.ip, sender, recipient)
    except StateError as exc:
        verdict = state.unavailable("lists", exc, queue_id)
        return Unavailable(verdict) if verdict is not None else None
    if found is not None:
        log.info("%s: %s list (%s) matched %s: from=<%s> to=<%s> ip=%s", queue_id, found.list, found.scope,
                 found.entry, sender, recipient or "", conn.ip)  # fmt: skip
        if conn.decision is not None:
            conn.tag(f"list_{found.list}")
    return found
