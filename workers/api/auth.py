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

import logging
import re
import socket
from email.utils import getaddresses
from functools import cache
from typing import Any

from defang.workers.api import services
from defang.workers.checks import arheader
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
from defang.workers.checks.dmarc import org_domain, suffix_list
from defang.workers.checks.dnsbl import Listing, Listings
from defang.workers.checks.resolver import DnsSettings, Resolver, warm_up
from defang.workers.checks.signing import Keys, SigningError, final_message, seal, sign

__all__ = ["ArcResult", "AuthResults", "DkimResult", "DmarcResult", "Listing", "Listings", "SigningError",
           "SpfResult", "add_results_header", "arc_seal", "authserv_id", "check", "dkim_sign", "dnsbl",
           "rhsbl", "spf", "uribl"]  # fmt: skip

warm_up()  # at the filter's load, in the zygote: see resolver.warm_up
suffix_list()  # the shipped public suffix list, read once in the zygote for every worker
log = logging.getLogger("defang.filter")

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
    return Keys.of(a.dkim_keys, a.arc_key)


def prepare() -> None:
    """When the filter loads (and on every reload), with its settings: read the signing keys
    and the public suffix list, so that one that cannot be used refuses the load, in one
    line (SigningError, OSError), never a message; both are then shared by the workers."""
    keys.cache_clear()
    keys().check()
    path = services.CURRENT.auth.public_suffix_list
    try:
        suffix_list(path)
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise SigningError(f"[auth] public_suffix_list {path}: {why}") from None


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
    found: list[str] = []
    for part in msg.parts:
        if part.is_multipart or not part.content_type.startswith("text/"):
            continue
        for host in _URL.findall(part.payload[: 1 << 20]):
            host = host.decode("ascii").lower()
            domain = org_domain(host, services.CURRENT.auth.public_suffix_list)
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
    r, a = resolver(), services.CURRENT.auth
    results = AuthResults(spf=spf(msg), dkim=verify_dkim(data, r, a.dkim_accept_rsa_sha1),
                          arc=verify_arc(data, r))  # fmt: skip
    fields = msg.get_all_headers("From")
    results.dmarc = check_dmarc(_author_domains(fields), results.spf, results.dkim, r, a.public_suffix_list,
                                len(fields))  # fmt: skip
    msg._auth = results
    return results


_LENIENT_DOMAIN = re.compile(r"@\[?([A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?)")


def _author_domains(fields: list[str]) -> list[str]:
    """The domain of every address in the From field(s), in order.  A field the stdlib's
    strict parser cannot read (``Bank <a@bank.example>>``) still shows a mail client's
    reader an address: its domains are read leniently, so that a malformed From cannot
    take a p=reject domain out of DMARC (reading more domains can only be stricter)."""
    domains = []
    for value in fields:
        addresses = [addr for _, addr in getaddresses([value]) if "@" in addr]
        if addresses:
            domains += [addr.rpartition("@")[2].lower().strip(">").rstrip(".") for addr in addresses]
        else:
            domains += [d.lower().rstrip(".") for d in _LENIENT_DOMAIN.findall(value)]
    return domains


def _from_domain(msg: Any) -> str:
    """The one From domain ("" with none or several)."""
    domains = _author_domains(msg.get_all_headers("From"))
    return domains[0] if len(domains) == 1 else ""


def add_results_header(msg: Any, results: AuthResults | None = None) -> str:
    """Add ``Authentication-Results: <authserv-id>; spf=... dkim=... arc=... dmarc=...`` at
    the top, after removing every one that claims our authserv-id however written (read
    by RFC 8601's grammar: a version, comments, a quoted-string), with a log line counting
    them and the tag ``forged_auth_results``; its value."""
    value = results_header(authserv_id(), results or check(msg))
    ours = authserv_id()
    found = msg.get_all_headers(arheader.NAME)
    forged = [i for i in range(len(found), 0, -1) if arheader.claims(found[i - 1], ours)]
    for index in forged:  # last first: the indexes of the others stay valid
        msg.delete_header(arheader.NAME, index)
    if forged:
        log.info("%s: removed %d Authentication-Results claiming %s (RFC 8601 5)", msg.queue_id or "-",
                 len(forged), ours)  # fmt: skip
        msg.tag("forged_auth_results")
    msg.insert_header(0, arheader.NAME, value)
    return value


# --- signing -----------------------------------------------------------------------------


def dkim_sign(msg: Any, domain: str | None = None) -> None:
    """Sign the message with ``domain``'s keys (default: the From domain; an RSA and an
    Ed25519 key: two signatures) as it leaves:
    after every header and body change.  No key for the domain: the message is tempfailed
    with an ERROR line (a configuration mistake must not send unsigned mail)."""
    domain = (domain or _from_domain(msg)).lower()
    keys().for_domain(domain)  # now: a missing key is the filter's error, with its line

    def step(message: Any, actions: list[list[Any]]) -> list[list[Any]]:
        headers = sign(final_message(message.path, actions), keys(), domain,
                       services.CURRENT.auth.dkim_body_canonicalization)  # fmt: skip
        return [["insert_header", 0, name, value] for name, value in reversed(headers)]

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
