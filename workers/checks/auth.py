"""Sender authentication: SPF (pyspf), DKIM and ARC verification (dkimpy), DMARC
(authheaders), and the Authentication-Results header (authres, RFC 8601).

Each check is one well-kept library; this module runs them through the worker's resolver
(``resolver.Resolver``: configured servers, one cache) and turns every outcome into a
result with an RFC 8601 result word, never an exception:

- SPF: pass, fail, softfail, neutral, none, temperror (DNS did not answer), permerror
  (a broken record), with the explanation;
- DKIM: one result per signature (pass, fail, neutral for a malformed one, temperror
  when the key lookup got no answer: dkimpy itself would call that a fail);
- ARC: the chain's validation (pass, fail, none);
- DMARC: pass, fail, none, temperror, permerror, with the From domain and its policy;
  aligned with SPF's MAIL FROM domain or any passing DKIM signature's d= (relaxed or
  strict, as the record says).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import authheaders
import authres
import authres.arc
import authres.dmarc
import dkim
import spf
from authheaders import dmarc_lookup

from defang.workers.checks.resolver import Resolver, TempError

log = logging.getLogger("defang.filter")


# authheaders reads and parses the public suffix list (12,000 rules) on every call that
# needs an organizational domain: 230 ms, twice or more per message (measured: DMARC took
# 1.15 s a message).  Parsed once per process instead, here, at import: in the zygote, for
# every worker to share.  Same list, same answers; only the reading is kept.
@cache
def _suffix_list(location: str) -> Any:
    with open(location) as f:
        return dmarc_lookup.PublicSuffixList(f)


def _org_domain_from(location: Any, domain: str) -> str:
    return _suffix_list(str(location)).get_public_suffix(domain)


dmarc_lookup.get_org_domain_from_suffix_list = _org_domain_from
authheaders.get_org_domain("example.com")
# dkimpy logs every bad signature at ERROR: ordinary traffic, not defang's errors
_DKIM_LOG = logging.getLogger("defang.dkimpy")
_DKIM_LOG.addHandler(logging.NullHandler())
_DKIM_LOG.propagate = False


@dataclass(frozen=True)
class SpfResult:
    result: str  # pass fail softfail neutral none temperror permerror
    explanation: str = ""
    identity: str = ""  # the MAIL FROM address, or postmaster@HELO for the null sender
    scope: str = "mailfrom"  # or "helo"

    def __str__(self) -> str:
        return f"spf={self.result} ({self.explanation})" if self.explanation else f"spf={self.result}"


@dataclass(frozen=True)
class DkimResult:
    result: str  # pass fail neutral temperror permerror
    domain: str = ""  # d=
    selector: str = ""  # s=
    identity: str = ""  # i=
    comment: str = ""


@dataclass(frozen=True)
class DmarcResult:
    result: str  # pass fail none temperror permerror
    from_domain: str = ""
    policy: str = ""  # none quarantine reject ("" without a record)
    comment: str = ""


@dataclass(frozen=True)
class ArcResult:
    result: str  # pass fail none
    comment: str = ""


@dataclass
class AuthResults:
    """Everything ``auth.check(msg)`` found, for the filter and the header."""

    spf: SpfResult | None = None
    dkim: list[DkimResult] = field(default_factory=list)
    arc: ArcResult | None = None
    dmarc: DmarcResult | None = None

    @property
    def dkim_pass(self) -> list[str]:
        """The d= domains of the signatures that verified."""
        return [d.domain for d in self.dkim if d.result == "pass"]


# --- SPF -------------------------------------------------------------------------------


def check_spf(ip: str, sender: str, helo: str, timeout: float) -> SpfResult:
    """SPF for the MAIL FROM identity; for the null sender, the HELO identity (RFC 7208 2.3)."""
    scope = "mailfrom" if sender else "helo"
    identity = sender or f"postmaster@{helo}"
    try:
        result, explanation = spf.check2(i=ip, s=identity, h=helo, timeout=timeout, querytime=timeout)
    except TempError as exc:
        return SpfResult("temperror", str(exc), identity, scope)
    except Exception as exc:  # pyspf's own failures: a malformed identity, an address it cannot read
        return SpfResult("permerror", f"{type(exc).__name__}: {exc}", identity, scope)
    return SpfResult(result, explanation, identity, scope)


# --- DKIM, ARC ------------------------------------------------------------------------


class _Txt:
    """dkimpy's and authheaders' DNS function, through our resolver; notes a lookup that
    got no answer (dkimpy turns DnsTimeoutError into a plain failure)."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.temp: str | None = None  # a lookup that got no answer
        self.missing: str | None = None  # a name that has no TXT record

    def __call__(self, name: Any, timeout: float = 5) -> Any:
        qname = name.decode("ascii", "replace") if isinstance(name, bytes) else str(name)
        try:
            records = self.resolver.query(qname.rstrip("."), "TXT")
        except TempError as exc:
            self.temp = f"{qname.rstrip('.')}: {exc}"
            raise dkim.DnsTimeoutError(self.temp) from None
        if not records:
            self.missing = qname.rstrip(".")
            return None
        data = b"".join(records[0].strings)
        return data if isinstance(name, bytes) else data.decode("utf-8", "replace")


def verify_dkim(message: bytes, resolver: Resolver) -> list[DkimResult]:
    """Every DKIM-Signature of ``message`` (in order), each verified on its own."""
    try:
        d = dkim.DKIM(message, logger=_DKIM_LOG)
    except Exception as exc:  # dkimpy cannot parse the message (malformed mail: IndexError too)
        why = f"message not readable by dkimpy: {type(exc).__name__}: {exc}"
        return [DkimResult("permerror", comment=why)]
    count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    results = []
    for idx in range(count):
        txt = _Txt(resolver)
        try:
            ok = d.verify(idx=idx, dnsfunc=txt)
        except dkim.ValidationError as exc:  # body hash mismatch, a bad signature
            results.append(DkimResult("fail", *_sig(d), comment=str(exc)[:120]))
            continue
        except Exception as exc:  # a signature that cannot be read (dkimpy's errors, and its bugs)
            result = "temperror" if txt.temp else "neutral"
            why = txt.temp or f"{type(exc).__name__}: {exc}"[:120]
            results.append(DkimResult(result, *_sig(d), comment=why))
            continue
        if ok:
            results.append(DkimResult("pass", *_sig(d)))
        elif txt.temp:
            results.append(DkimResult("temperror", *_sig(d), comment=txt.temp))
        elif txt.missing:
            results.append(DkimResult("permerror", *_sig(d), comment=f"no key at {txt.missing}"))
        else:
            results.append(DkimResult("fail", *_sig(d), comment="signature did not verify"))
    return results


def _sig(d: Any) -> tuple[str, str, str]:
    fields = getattr(d, "signature_fields", None) or {}

    def get(tag: bytes) -> str:
        return fields.get(tag, b"").decode("ascii", "replace")

    return get(b"d").lower(), get(b"s"), get(b"i")


def verify_arc(message: bytes, resolver: Resolver) -> ArcResult:
    txt = _Txt(resolver)
    try:
        cv, _results, comment = dkim.arc_verify(message, logger=_DKIM_LOG, dnsfunc=txt)
    except dkim.DKIMException as exc:
        return ArcResult("fail", str(exc))
    except Exception as exc:  # a message dkimpy cannot parse
        return ArcResult("none", f"message not readable by dkimpy: {type(exc).__name__}")
    result = cv.decode("ascii") if cv else "none"
    if txt.temp and result == "fail":
        return ArcResult("fail", f"temperror: {txt.temp}")
    return ArcResult(result, "" if comment in (None, "success") else str(comment))


# --- DMARC -----------------------------------------------------------------------------


def check_dmarc(from_domain: str, spf_result: SpfResult | None, dkims: list[DkimResult],
                resolver: Resolver) -> DmarcResult:  # fmt: skip
    """DMARC for ``from_domain`` (the RFC5322.From domain) given the SPF and DKIM results."""
    if not from_domain:
        return DmarcResult("permerror", comment="no From domain")
    spf_ar = None
    if spf_result is not None and spf_result.scope == "mailfrom":
        spf_ar = authres.SPFAuthenticationResult(result=spf_result.result, smtp_mailfrom=spf_result.identity)
    # the best DKIM result for alignment: an aligned pass, else any pass, else the first
    org = authheaders.get_org_domain(from_domain)
    passing = [d for d in dkims if d.result == "pass"]
    aligned = [d for d in passing if d.domain == from_domain or authheaders.get_org_domain(d.domain) == org]
    best = (aligned or passing or dkims or [None])[0]
    dkim_ar = None
    if best is not None:
        dkim_ar = authres.DKIMAuthenticationResult(result=best.result, header_d=best.domain)
    txt = _Txt(resolver)
    try:
        result, comment, _domain, policy = authheaders.dmarc_per_from(
            from_domain, spf_result=spf_ar, dkim_result=dkim_ar, dnsfunc=txt)  # fmt: skip
    except dkim.DnsTimeoutError:
        return DmarcResult("temperror", from_domain, comment=txt.temp or "DNS")
    except Exception as exc:  # a malformed record: authheaders' DMARCException, or worse
        return DmarcResult("permerror", from_domain, comment=f"{type(exc).__name__}: {exc}")
    return DmarcResult(result, from_domain, policy or "", str(comment or ""))


# --- the header ------------------------------------------------------------------------


def results_header(authserv_id: str, r: AuthResults) -> str:
    """The value of an Authentication-Results header for ``r`` (RFC 8601, via authres)."""
    parts: list[Any] = []
    if r.spf is not None:
        where = ({"smtp_mailfrom": r.spf.identity} if r.spf.scope == "mailfrom"
                 else {"smtp_helo": r.spf.identity.partition("@")[2]})  # fmt: skip
        comment = _comment(r.spf.explanation)
        parts.append(authres.SPFAuthenticationResult(result=r.spf.result, result_comment=comment, **where))
    for d in r.dkim or [DkimResult("none")]:
        parts.append(authres.DKIMAuthenticationResult(result=d.result, header_d=d.domain or None,
                                                      header_s=d.selector or None,
                                                      result_comment=_comment(d.comment)))  # fmt: skip
    if r.arc is not None:
        comment = _comment(r.arc.comment)
        parts.append(authres.arc.ARCAuthenticationResult(result=r.arc.result, result_comment=comment))
    if r.dmarc is not None:
        parts.append(authres.dmarc.DMARCAuthenticationResult(
            result=r.dmarc.result, header_from=r.dmarc.from_domain or None,
            policy=r.dmarc.policy.upper() or None, result_comment=_comment(r.dmarc.comment)))  # fmt: skip
    text = str(authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=parts))
    return text.partition(":")[2].strip()


def _comment(text: str) -> str | None:
    """A comment authres can write: no parentheses or backslashes inside, short."""
    clean = "".join(c for c in text if c not in "()\\\r\n").strip()
    return clean[:120] or None
