"""DNS for the checks: dnspython, one resolver per worker, a TTL-respecting cache, and
several lookups side by side.

dnspython does all of the DNS (queries, answers, the cache): ``Resolver`` only sets it up
from ``[dns]`` (servers, a timeout per try, a lifetime per lookup, the cache's size) and
maps its outcomes to what a mail check needs:

- an answer: the records; no such name (NXDOMAIN) or no such record: an empty list;
- a timeout, SERVFAIL, a refusal, an unreachable server: ``TempError`` (a "temperror"
  for SPF, DKIM and DMARC; the filter decides, never an exception the admin meets).

The synchronous resolver is also made dnspython's default for this process, so that the
libraries that do their own lookups (pyspf, dkimpy, authheaders) use the same servers,
timeouts and cache.  ``many`` runs lookups concurrently (``dns.asyncresolver`` on one
event loop, the same cache): a message's three blocklists cost one wait, not three.

dnspython costs ~7.5 MB per process to import: this module is imported only by filters
that use ``defang.auth`` (at load, in the zygote, so the workers share it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from defang.core.config import DnsSection


class TempError(Exception):
    """The lookup did not get an answer (timeout, SERVFAIL, refused, unreachable)."""


# A name DNS cannot hold (an empty label ``a..b``, a label over 63 octets, a name over 255):
# no record can be there, now or on a retry.  Its "no answer" is an answer, [], as for
# NXDOMAIN, not a TempError: the names come from the message (a From domain, a link), and a
# TempError would tempfail the message on every retry until it expires.
_NO_SUCH_NAME = (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer, dns.exception.SyntaxError,
                 dns.name.NameTooLong)  # fmt: skip


#: ``[dns]`` as declared in defang.core.config: servers ("127.0.0.1", "127.0.0.1:5353",
#: "[::1]:53"; () = /etc/resolv.conf), timeout (one try of one server), lifetime (one lookup)
DnsSettings = DnsSection


def _server(spec: str) -> dns.nameserver.Nameserver:
    host, port = spec, 53
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif spec.count(":") == 1:
        host, _, p = spec.partition(":")
        port = int(p)
    return dns.nameserver.Do53Nameserver(host, port)


def _setup(resolver: Any, settings: DnsSettings, cache: dns.resolver.LRUCache) -> Any:
    if settings.servers:
        resolver.nameservers = [_server(s) for s in settings.servers]
    resolver.timeout = settings.timeout
    resolver.lifetime = settings.lifetime
    resolver.cache = cache
    return resolver


class Resolver:
    """This worker's DNS."""

    def __init__(self, settings: DnsSettings) -> None:
        self.settings = settings
        configure = not settings.servers
        cache = dns.resolver.LRUCache(settings.cache_size)
        self.sync = _setup(dns.resolver.Resolver(configure=configure), settings, cache)
        self.aio = _setup(dns.asyncresolver.Resolver(configure=configure), settings, cache)
        dns.resolver.default_resolver = self.sync  # pyspf, dkimpy, authheaders: the same servers

    def query(self, name: str, rdtype: str) -> list[Any]:
        """The records of ``name``; [] when there is none (or the name cannot be one);
        TempError when no answer came."""
        try:
            return list(self.sync.resolve(name, rdtype, search=False))
        except _NO_SUCH_NAME:
            return []
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as exc:
            raise TempError(_why(exc)) from None
        except dns.exception.DNSException as exc:
            raise TempError(f"{type(exc).__name__}: {exc}") from None

    def many(self, queries: Sequence[tuple[str, str]]) -> list[list[Any] | TempError]:
        """``query`` for each (name, type), side by side; a TempError in place of a failed one."""
        if len(queries) <= 1:
            return [self._catch(name, rdtype) for name, rdtype in queries]
        return asyncio.run(self._gather(queries))

    def _catch(self, name: str, rdtype: str) -> list[Any] | TempError:
        try:
            return self.query(name, rdtype)
        except TempError as exc:
            return exc

    async def _gather(self, queries: Sequence[tuple[str, str]]) -> list[list[Any] | TempError]:
        async def one(name: str, rdtype: str) -> list[Any] | TempError:
            try:
                return list(await self.aio.resolve(name, rdtype, search=False))
            except _NO_SUCH_NAME:
                return []
            except dns.exception.DNSException as exc:
                return TempError(_why(exc))

        return list(await asyncio.gather(*(one(n, t) for n, t in queries)))


def warm_up() -> None:
    """Do once, before the workers are forked, what dnspython does on first use: import
    the record types' modules, build and parse a query and an answer, start and close an
    event loop.  Made in each worker instead, that cost ~3-4 MB of private memory in every
    worker that looks anything up (measured: smaps Private_Dirty of a forked child)."""
    import dns.message
    import dns.rrset

    for rdtype in ("A", "AAAA", "TXT", "MX", "PTR", "CNAME", "SOA", "NS"):
        query = dns.message.make_query("warm-up.invalid", rdtype)
        answer = dns.message.make_response(query)
        data = {"A": "127.0.0.2", "AAAA": "::1", "TXT": '"v=spf1 -all"', "MX": "10 mx.invalid.",
                "PTR": "host.invalid.", "CNAME": "other.invalid.", "NS": "ns.invalid.",
                "SOA": "ns.invalid. admin.invalid. 1 2 3 4 5"}[rdtype]  # fmt: skip
        answer.answer.append(dns.rrset.from_text("warm-up.invalid.", 300, "IN", rdtype, data))
        dns.message.from_wire(answer.to_wire())
    asyncio.run(asyncio.sleep(0))


def _why(exc: Exception) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "DNS timeout: no answer within the lifetime"
    return describe(str(exc))


def describe(text: str) -> str:
    """dnspython's text (or a library's that carries it, pyspf's), shortened and without
    what varies between two runs of one lookup (servers' ports, seconds waited):
    "... Server Do53:127.0.0.1@5353 answered REFUSED" -> "DNS server answered REFUSED",
    "The resolution lifetime expired after 2.003 seconds" -> "DNS timeout"."""
    for rcode in ("SERVFAIL", "REFUSED", "FORMERR", "NOTIMP"):
        if f"answered {rcode}" in text:
            return f"DNS server answered {rcode}"
    if "lifetime expired" in text or "timed out" in text.lower() or "Timeout" in text:
        return "DNS timeout: no answer within the lifetime"
    return text if len(text) < 200 else text[:197] + "..."
