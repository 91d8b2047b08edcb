"""``defang.greylist``: ask an unknown (client network, sender, recipient) to retry later.

    from defang import greylist

    def filter_sender(conn, sender):
        conn.notes["sender"] = sender

    def filter_recipient(conn, recipient):
        return greylist.check(conn, conn.notes.get("sender", ""), recipient)

A real MTA retries a 4xx; most spamware does not.  The first attempt of a triplet gets
``451 4.7.1 Greylisted, try again in N seconds``; a retry after ``delay`` seconds (and
within ``retry_window``) passes, and the triplet then passes at once for ``pass_ttl``
seconds (renewed, at most daily, while it keeps sending).  A client network whose triplets
passed ``auto_allow`` times is never delayed again (it retries correctly: a real MTA).
The client is its network (``ipv4_prefix``, ``ipv6_prefix``: a sending farm retries from
another address of the same pool).  Defaults: ``[greylist]``; each can be given per call.

Never delayed: a connection without an IP (local submission), an authenticated client
(``{auth_authen}``, unless ``exempt_authenticated=False``), a client in
``exempt_networks``, a sender or recipient in (or under) ``exempt_domains``.  The state is
``defang.state``'s: on SQLite one host's, on Redis every relay's, so a retry through
another relay passes.  When the state cannot be reached: ``[state] on_error``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from defang.core.verdicts import Verdict, tempfail
from defang.workers.api import services, state
from defang.workers.api.conn import client_address
from defang.workers.stores.state import CURRENT, GreylistSettings, StateError

log = logging.getLogger("defang.filter")

DAY = 86400.0


def network(ip: str, settings: GreylistSettings) -> str | None:
    """The client network of ``ip`` (``203.0.113.0/24``, ``2001:db8::/64``); None if not an IP."""
    addr = client_address(ip)
    if addr is None:
        return None
    bits = settings.ipv4_prefix if addr.version == 4 else settings.ipv6_prefix
    return str(ipaddress.ip_network(f"{addr}/{bits}", strict=False))


def in_domains(address: str, domains: Iterable[str]) -> bool:
    """Whether the domain of ``address`` is one of ``domains`` or under one."""
    domain = address.rpartition("@")[2].lower().rstrip(".")
    return any(domain == d or domain.endswith("." + d) for d in (x.lower().strip(".") for x in domains))


def in_networks(ip: str, networks: Iterable[str]) -> bool:
    addr = client_address(ip)
    if addr is None:
        return False
    return any(addr in ipaddress.ip_network(n, strict=False) for n in networks)


def _exempt(conn: Any, sender: str, recipient: str, networks: Iterable[str], domains: Iterable[str],
            authenticated: bool) -> str | None:  # fmt: skip
    if authenticated and conn.macros.get("{auth_authen}"):
        return "authenticated"
    if networks and in_networks(conn.ip or "", networks):
        return "network"
    if domains and (in_domains(sender, domains) or in_domains(recipient, domains)):
        return "domain"
    return None


def check(conn: Any, sender: str, recipient: str, *, exempt_networks: Iterable[str] = (),
          exempt_domains: Iterable[str] = (), exempt_authenticated: bool = True,
          **overrides: Any) -> Verdict | None:  # fmt: skip
    """The tempfail for a triplet that must retry, None when it passes (``overrides``:
    ``delay``, ``retry_window``, ``pass_ttl``, ``auto_allow``, ``ipv4_prefix``, ``ipv6_prefix``)."""
    settings = replace(services.CURRENT.greylist, **overrides) if overrides else services.CURRENT.greylist
    queue_id = conn.macros.get("i") or "-"
    net = network(conn.ip or "", settings)
    if net is None:
        return None
    why = _exempt(conn, sender, recipient, exempt_networks, exempt_domains, exempt_authenticated)
    if why:
        log.debug("%s: greylist: %s exempt (%s)", queue_id, net, why)
        return None
    try:
        wait = _wait(net, (sender or "<>").lower(), recipient.lower(), settings)
    except StateError as exc:
        return state.unavailable("greylist", exc, queue_id)
    if wait <= 0:
        return None
    retry = math.ceil(wait)
    when = time.strftime("%H:%M:%S UTC", time.gmtime(CURRENT.clock() + retry))
    log.info("%s: greylisted %s from=<%s> to=<%s>: retry in %ds", queue_id, net, sender, recipient, retry)
    if conn.decision is not None:
        conn.tag("greylisted")
    unit = "second" if retry == 1 else "seconds"
    return tempfail(f"Greylisted, try again in {retry} {unit} (after {when})", "451", "4.7.1")


def _wait(net: str, sender: str, recipient: str, s: GreylistSettings) -> float:
    """Seconds this triplet must still wait: <= 0 when it passes (and then it is recorded)."""
    st = state.store()
    now = CURRENT.clock()
    if s.auto_allow and st.get(f"defang:gl:ok:{net}") is not None:
        return 0.0
    # hashed: a fixed size whatever the addresses' length, and no sender can write an
    # address that makes another triplet's key ("a@b|c" + "d" against "a@b" + "c|d")
    triplet = hashlib.sha256(json.dumps([net, sender, recipient]).encode()).hexdigest()[:32]
    passed = st.get(f"defang:gl:p:{triplet}")
    if passed is not None:
        if now - float(passed) > DAY:
            st.set(f"defang:gl:p:{triplet}", repr(now), s.pass_ttl)
        return 0.0
    pending = f"defang:gl:w:{triplet}"
    if st.set_if_absent(pending, repr(now), s.delay + s.retry_window):
        return s.delay if s.delay > 0 else 1.0  # a first attempt always retries once
    first = st.get(pending)
    waited = now - float(first) if first is not None else 0.0
    if waited > s.delay + s.retry_window:  # too late (the entry outlived its expiry): start again
        st.set(pending, repr(now), s.delay + s.retry_window)
        return s.delay if s.delay > 0 else 1.0
    if waited < s.delay:
        return s.delay - waited
    st.set(f"defang:gl:p:{triplet}", repr(now), s.pass_ttl)
    st.delete(pending)
    if s.auto_allow and st.incr(f"defang:gl:n:{net}", 1, s.pass_ttl) >= s.auto_allow:
        st.set(f"defang:gl:ok:{net}", repr(now), s.pass_ttl)
    return 0.0
