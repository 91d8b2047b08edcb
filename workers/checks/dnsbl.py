"""DNS blocklists: which names to ask, what the answers mean (the lookups: ``resolver``).

- An IP list (``zen.spamhaus.org``): the address reversed, IPv4 by octet
  (192.0.2.99 -> ``99.2.0.192.zen.spamhaus.org``), IPv6 by nibble, as
  ``dns.reversename`` writes them for in-addr.arpa and ip6.arpa.
- A domain list (RHSBL, URI lists): ``<domain>.<zone>``.

Listed: an A record in 127.0.0.0/8 (its last octets say why, per list); the TXT record
at the same name, when there is one, is the list's reason.  Not listed: no such name.
127.255.255.x is the lists' way to say "not for you" (Spamhaus's answer to queries
through a public resolver, or over quota): an error, not a listing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

import dns.reversename

from defang.workers.checks.resolver import Resolver, TempError


@dataclass(frozen=True)
class Listing:
    """One list's answer about one name."""

    zone: str
    query: str  # the name asked
    listed: bool = False
    codes: tuple[str, ...] = ()  # the 127.0.0.x answers
    reason: str = ""  # the TXT record
    error: str | None = None

    def __str__(self) -> str:
        if self.error:
            return f"{self.zone}: error: {self.error}"
        if not self.listed:
            return f"{self.zone}: not listed"
        return f"{self.zone}: listed ({', '.join(self.codes)}){': ' + self.reason if self.reason else ''}"


@dataclass(frozen=True)
class Listings:
    """The answers of every zone asked, in the order asked."""

    subject: str  # the IP address or domain looked up
    results: list[Listing] = field(default_factory=list)

    @property
    def listed(self) -> list[Listing]:
        return [r for r in self.results if r.listed]

    @property
    def errors(self) -> list[Listing]:
        return [r for r in self.results if r.error]

    def __bool__(self) -> bool:
        """True when any list has the subject: ``if auth.dnsbl(...)``."""
        return bool(self.listed)


def ip_name(ip: str, zone: str) -> str:
    """The name to ask ``zone`` about ``ip``; ValueError for something that is no address."""
    address = ipaddress.ip_address(ip)
    arpa = dns.reversename.from_address(str(address)).to_text(omit_final_dot=True)
    reversed_part = arpa.rsplit(".", 2)[0]  # in-addr.arpa, ip6.arpa: dropped
    return f"{reversed_part}.{zone.strip('.')}"


def domain_name(domain: str, zone: str) -> str:
    return f"{domain.strip('.').lower()}.{zone.strip('.')}"


def look_up(resolver: Resolver, subject: str, names: list[tuple[str, str]]) -> Listings:
    """Ask every (zone, name): the A and TXT records of all of them side by side."""
    queries = [(name, kind) for _, name in names for kind in ("A", "TXT")]
    answers = resolver.many(queries)
    results = []
    for i, (zone, name) in enumerate(names):
        a, text = answers[2 * i], answers[2 * i + 1]
        results.append(_listing(zone, name, a, text))
    return Listings(subject, results)


def _listing(zone: str, name: str, a: list | TempError, text: list | TempError) -> Listing:
    if isinstance(a, TempError):
        return Listing(zone, name, error=str(a))
    codes = tuple(sorted(r.address for r in a))
    if not codes:
        return Listing(zone, name)
    if any(c.startswith("127.255.255.") for c in codes):
        return Listing(zone, name, codes=codes, error=f"the list refused the query ({', '.join(codes)})")
    if not all(c.startswith("127.") for c in codes):
        return Listing(zone, name, codes=codes, error=f"not a list answer ({', '.join(codes)})")
    reason = ""
    if not isinstance(text, TempError) and text:
        reason = b" ".join(b"".join(r.strings) for r in text).decode("utf-8", "replace")[:300]
    return Listing(zone, name, listed=True, codes=codes, reason=reason)


def zones_of(zones: str | Iterable[str]) -> list[str]:
    return [zones] if isinstance(zones, str) else list(zones)
