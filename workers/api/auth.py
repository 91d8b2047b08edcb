"""``defang.auth``: who is really sending.  DNS blocklists, SPF, DKIM, DMARC, ARC, the
Authentication-Results header, DKIM signing and ARC sealing, for filters.

    from defang import auth

    def filter_relay(conn):
        if auth.dnsbl(conn.ip, ["zen.spamhaus.org"]):
            return reject(...)

A filter that uses it imports it (``from defang import auth``), at load: dnspython and
the libraries are then imported once, in the zygote, and every worker shares them (a
filter that does not use it pays nothing).  The checks run through the worker's resolver
(``[dns]``: servers, timeouts, a TTL cache), several lookups side by side.  Every outcome
is a result (``temperror`` when DNS did not answer, ``permerror`` for a broken record),
never an exception the filter must catch.

The SPF result of MAIL FROM is kept in ``conn.notes`` (key ``defang.spf``), so that
``check(msg)`` at the end of the message, possibly in another worker, does not ask again.
"""

from __future__ import annotations

import re
import socket
from functools import cache
from typing import Any

from defang.workers.api import services
from defang.workers.checks import dnsbl as lists
from defang.workers.checks.auth import (
    ArcResult,
    AuthResults,
    DkimResult,
    DmarcResult,
    SpfResult,
    check_dmarc,
    check_spf,
    results_header,
    verify_arc,
    verify_dkim,
)
from defang.workers.checks.dnsbl import Listing, Listings
from defang.workers.checks.resolver import DnsSettings, Resolver, warm_up
from defang.workers.checks.signing import Key, Keys, SigningError, final_message, seal, sign

__all__ = ["ArcResult", "AuthResults", "DkimResult", "DmarcResult", "Listing", "Listings", "SigningError",
           "SpfResult", "add_results_header", "arc_seal", "authserv_id", "check", "dkim_sign", "dnsbl",
           "rhsbl", "spf", "uribl"]  # fmt: skip

warm_up()  # at the filter's load, in the zygote: see resolver.warm_up

NOTES_KEY = "defang.spf"
MAX_URI_DOMAINS = 20
_LABEL = rb"[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?"
_URL = re.compile(rb"(?i)\bhttps?://(" + _LABEL + rb"(?:\." + _LABEL + rb")+)")


@cache
def resolver() -> Resolver:
    """This worker's resolver, made on first use from its settings."""
    a = services.CURRENT.auth
    return Resolver(DnsSettings(a.dns_servers, a.dns_timeout, a.dns_lifetime, a.dns_cache_size))


@cache
def keys() -> Keys:
    a = services.CURRENT.auth
    return Keys({d: Key(d, s, p) for d, s, p in a.dkim_keys}, Key(*a.arc_key) if a.arc_key else None)


def authserv_id() -> str:
    return services.CURRENT.auth.authserv_id or socket.gethostname()


# --- blocklists --------------------------------------------------------------------------


def dnsbl(ip: Any, zones: str | list[str]) -> Listings:
    """The client IP (or ``conn``) in IP blocklists, all zones asked side by side."""
    address = getattr(ip, "ip", ip)
    try:
        names = [(zone, lists.ip_name(address, zone)) for zone in lists.zones_of(zones)]
    except ValueError:
        return Listings(str(address), [Listing(z, "", error=f"{address!r} is not an IP address")
                                       for z in lists.zones_of(zones)])  # fmt: skip
    return lists.look_up(resolver(), address, names)


def rhsbl(domain: str, zones: str | list[str]) -> Listings:
    """A domain (the sender's, HELO's) in domain blocklists."""
    domain = domain.rpartition("@")[2].strip("[]").lower()
    names = [(z, lists.domain_name(domain, z)) for z in lists.zones_of(zones)]
    return lists.look_up(resolver(), domain, names)


def uribl(msg: Any, zones: str | list[str], max_domains: int = MAX_URI_DOMAINS) -> Listings:
    """The registered domains of the http(s) links in the text and HTML parts (the first
    ``max_domains`` different ones) in URI blocklists; ``subject`` lists them."""
    import authheaders  # publicsuffix2, through it: the registered domain

    found: list[str] = []
    for part in msg.parts:
        if part.is_multipart or not part.content_type.startswith("text/"):
            continue
        for host in _URL.findall(part.payload[: 1 << 20]):
            host = host.decode("ascii").lower()
            domain = authheaders.get_org_domain(host)
            if domain not in found:
                found.append(domain)
            if len(found) >= max_domains:
                break
    names = [(z, lists.domain_name(d, z)) for d in found for z in lists.zones_of(zones)]
    return lists.look_up(resolver(), ",".join(found), names)


# --- SPF, DKIM, DMARC, ARC ---------------------------------------------------------------


def spf(conn_or_msg: Any, sender: str | None = None) -> SpfResult:
    """SPF for MAIL FROM (the HELO name for the null sender): in ``filter_sender(conn,
    sender)`` as ``auth.spf(conn, sender)``, or at end of message as ``auth.spf(msg)``."""
    conn = getattr(conn_or_msg, "conn", conn_or_msg)
    if sender is None:
        sender = getattr(conn_or_msg, "sender", "")
    kept = (conn.notes or {}).get(NOTES_KEY)
    if isinstance(kept, list) and len(kept) == 4 and kept[0] == (sender or f"postmaster@{conn.helo}"):
        return SpfResult(kept[1], kept[2], kept[0], kept[3])
    resolver()  # pyspf asks dnspython's default resolver: ours, once made
    result = check_spf(conn.ip, sender, conn.helo, services.CURRENT.auth.dns_lifetime)
    conn.notes[NOTES_KEY] = [result.identity, result.result, result.explanation[:300], result.scope]
    return result


def check(msg: Any) -> AuthResults:
    """SPF (kept from MAIL FROM, or asked now), every DKIM signature, ARC and DMARC for
    the From domain; asked once per message."""
    kept = getattr(msg, "_auth", None)
    if kept is not None:
        return kept
    with open(msg.path, "rb") as f:
        data = f.read()
    r = resolver()
    results = AuthResults(spf=spf(msg), dkim=verify_dkim(data, r), arc=verify_arc(data, r))
    results.dmarc = check_dmarc(_from_domain(msg), results.spf, results.dkim, r)
    msg._auth = results
    return results


def _from_domain(msg: Any) -> str:
    from email.utils import getaddresses

    froms = [addr for _, addr in getaddresses(msg.get_all_headers("From")) if "@" in addr]
    return froms[0].rpartition("@")[2].lower().strip(">") if len(froms) == 1 else ""


def add_results_header(msg: Any, results: AuthResults | None = None) -> str:
    """Add ``Authentication-Results: <authserv-id>; spf=... dkim=... arc=... dmarc=...`` at
    the top (after removing any that claim our authserv-id); its value."""
    value = results_header(authserv_id(), results or check(msg))
    ours = authserv_id().lower()
    found = msg.get_all_headers("Authentication-Results")
    for index in range(len(found), 0, -1):  # forged ones, last first: indexes stay valid
        if found[index - 1].strip().split(";", 1)[0].strip().lower() == ours:
            msg.change_header("Authentication-Results", "", index)
    msg.insert_header(0, "Authentication-Results", value)
    return value


# --- signing -----------------------------------------------------------------------------


def dkim_sign(msg: Any, domain: str | None = None) -> None:
    """Sign the message with ``domain``'s key (default: the From domain) as it leaves:
    after every header and body change.  No key for the domain: the message is tempfailed
    with an ERROR line (a configuration mistake must not send unsigned mail)."""
    domain = (domain or _from_domain(msg)).lower()
    keys().for_domain(domain)  # now: a missing key is the filter's error, with its line

    def step(message: Any, actions: list[list[Any]]) -> list[list[Any]]:
        name, value = sign(final_message(message.path, actions), keys(), domain,
                           services.CURRENT.auth.dkim_body_canonicalization)  # fmt: skip
        return [["insert_header", 0, name, value]]

    _last(msg, step)


def arc_seal(msg: Any) -> None:
    """Add an ARC set as the message leaves (after ``add_results_header``: the seal carries
    our Authentication-Results)."""
    if keys().arc is None:
        raise SigningError("no [arc] key configured")

    def step(message: Any, actions: list[list[Any]]) -> list[list[Any]]:
        headers = seal(final_message(message.path, actions), keys(), authserv_id())
        return [["insert_header", 0, name, value] for name, value in reversed(headers)]

    _last(msg, step)


def _last(msg: Any, step: Any) -> None:
    if msg._last_steps is None:
        msg._last_steps = []
    msg._last_steps.append(step)
