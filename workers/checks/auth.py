"""Sender authentication: SPF (pyspf), DKIM and ARC verification (dkimpy), DMARC
(``dmarc``), and the Authentication-Results header (``arheader``, authres, RFC 8601).

Each check is one well-kept library; this module runs them through the worker's resolver
(``resolver.Resolver``: configured servers, one cache) and turns every outcome into a
result with an RFC 8601 result word, never an exception:

- SPF: pass, fail, softfail, neutral, none, temperror (DNS did not answer), permerror
  (a broken record), with the explanation;
- DKIM: one result per signature (pass, fail, neutral for a malformed one, temperror
  when the key lookup got no answer: dkimpy itself would call that a fail);
- ARC: the chain's validation (pass, fail, none);
- DMARC (``dmarc``): pass, fail, none, temperror, permerror for every author domain, with
  the policy, pct and the disposition.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

import dkim
import spf
from dkim.util import InvalidTagValueList, parse_tag_value

from defang.workers.checks import arheader
from defang.workers.checks.dmarc import DmarcResult, combine, evaluate
from defang.workers.checks.resolver import Resolver, TempError, describe

log = logging.getLogger("defang.filter")

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
    if result == "temperror":  # pyspf's text is dnspython's, with ports and seconds
        explanation = f"SPF temporary error: {describe(explanation)}"
    return SpfResult(result, explanation, identity, scope)


# --- DKIM, ARC ------------------------------------------------------------------------


class _Txt:
    """dkimpy's and authheaders' DNS function, through our resolver; notes a lookup that
    got no answer (dkimpy turns DnsTimeoutError into a plain failure)."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.temp: str | None = None  # a lookup that got no answer
        self.missing: str | None = None  # a name that has no TXT record
        self.data: bytes = b""  # the last record read (a DKIM key record: its h=)

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
        data = self.data = b"".join(records[0].strings)
        return data if isinstance(name, bytes) else data.decode("utf-8", "replace")


def verify_dkim(message: bytes, resolver: Resolver, accept_rsa_sha1: bool = False) -> list[DkimResult]:
    """Every DKIM-Signature of ``message`` (in order), each verified on its own; RSA and
    Ed25519 (RFC 8463, through PyNaCl).  dkimpy passes what RFC 8301 and the key record
    refuse, so a verified signature is also checked here: ``rsa-sha1`` fails unless
    ``accept_rsa_sha1`` (RFC 8301 §3.1), and so does a hash the key's ``h=`` leaves out
    (RFC 6376 §3.6.1)."""
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
            results.append(DkimResult("fail", *_sig(d), comment=plain(str(exc))))
            continue
        except Exception as exc:  # a signature that cannot be read (dkimpy's errors, and its bugs)
            result = "temperror" if txt.temp else "neutral"
            why = txt.temp or plain(f"{type(exc).__name__}: {exc}")
            results.append(DkimResult(result, *_sig(d), comment=why))
            continue
        if ok:
            refused = _refused(d.signature_fields.get(b"a", b""), txt.data, accept_rsa_sha1)
            results.append(DkimResult("fail" if refused else "pass", *_sig(d), comment=refused))
        elif txt.temp:
            results.append(DkimResult("temperror", *_sig(d), comment=txt.temp))
        elif txt.missing:
            results.append(DkimResult("permerror", *_sig(d), comment=f"no key at {txt.missing}"))
        else:
            results.append(DkimResult("fail", *_sig(d), comment="signature did not verify"))
    return results


def _refused(algorithm: bytes, key_record: bytes, accept_rsa_sha1: bool) -> str:
    """Why a signature dkimpy verified does not count ("" when it does)."""
    if algorithm.lower() == b"rsa-sha1" and not accept_rsa_sha1:
        return "rsa-sha1 is not accepted (RFC 8301 3.1)"
    try:
        allowed = parse_tag_value(key_record).get(b"h")
    except InvalidTagValueList:
        return ""  # dkimpy read the key: its record parses
    hashes = [h.strip().lower() for h in allowed.split(b":")] if allowed else []
    used = algorithm.lower().rpartition(b"-")[2]
    if hashes and used not in hashes:
        return f"the key record allows h={b':'.join(hashes).decode('ascii', 'replace')}, not {used.decode()}"
    return ""


_BYTES_REPR = re.compile(r"""\bb(['"])(.*?)\1""")


def plain(text: str, limit: int = 120) -> str:
    """A library's message as words for a header comment: no Python byte reprs
    (``got b'x'`` -> ``got x``), at most ``limit`` characters."""
    text = _BYTES_REPR.sub(lambda m: m.group(2), text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    # dkimpy answers None for a chain whose latest seal says cv=fail: the chain failed
    # (RFC 8617 §5.2), not "no chain"
    result = cv.decode("ascii") if cv is not None else "fail"
    if txt.temp and result == "fail":
        return ArcResult("fail", f"temperror: {txt.temp}")
    return ArcResult(result, "" if comment in (None, "success") else str(comment))


# --- DMARC -----------------------------------------------------------------------------


def check_dmarc(from_domains: list[str], spf_result: SpfResult | None, dkims: list[DkimResult],
                resolver: Resolver, psl: str = "", fields: int = 1) -> DmarcResult:  # fmt: skip
    """DMARC for the author domains (the RFC5322.From field's; more than one: each, the
    strictest failure stands, RFC 7489 §6.6.1) given the SPF and DKIM results.  SPF's
    identifier is its identity's domain: MAIL FROM's, or the HELO name for the null
    sender (RFC 7208 §2.4)."""
    if not from_domains:
        return DmarcResult("permerror", comment="no From domain")
    spf_res = spf_result.result if spf_result is not None else "none"
    spf_domain = spf_result.identity.rpartition("@")[2] if spf_result is not None else ""
    passes = [d.domain for d in dkims if d.result == "pass"]
    unique = list(dict.fromkeys(from_domains))
    return combine([evaluate(d, spf_res, spf_domain, passes, resolver, psl) for d in unique], fields)


# --- the header ------------------------------------------------------------------------


def results_header(serv_id: str, r: AuthResults) -> str:
    """The value of an Authentication-Results header for ``r`` (RFC 8601), folded."""
    parts: list[Any] = []
    if r.spf is not None:
        parts.append(arheader.spf_result(r.spf.result, r.spf.scope, r.spf.identity, r.spf.explanation))
    for d in r.dkim or [DkimResult("none")]:
        parts.append(arheader.dkim_result(d.result, d.domain, d.selector, d.comment))
    if r.arc is not None:
        parts.append(arheader.arc_result(r.arc.result, r.arc.comment))
    if r.dmarc is not None:
        d = r.dmarc
        parts.append(arheader.dmarc_result(d.result, d.from_domain, d.policy, d.comment))
    return arheader.header_value(serv_id, parts)
