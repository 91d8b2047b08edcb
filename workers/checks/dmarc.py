"""DMARC (RFC 7489) for every author domain of a message, through the worker's resolver.

Why not authheaders' ``dmarc_per_from`` (which defang used first): it reads one TXT record
at ``_dmarc.`` (a non-DMARC record listed first hid a ``p=reject``), ignores ``pct``,
takes one DKIM result, reads the SPF domain with a pattern that stops at a hyphen, and
its organisational domain of a TLD the public suffix list does not know is the bare TLD
(so ``evil.nosuchtld`` aligned with ``bank.nosuchtld``).  The parts that are a library's
job stay one: the record's tag list is read by dkimpy's parser (DMARC uses DKIM's
syntax, RFC 7489 §6.4), the organisational domain by ``publicsuffixlist`` (the PSL
algorithm with its default rule ``*``, and a list an admin can replace: ``[auth]
public_suffix_list``).  What is left is RFC 7489's own steps, each named by its clause:

- §6.6.1: every domain of the From field(s) is an author domain; each is evaluated and
  the strictest outcome among the failing ones stands;
- §6.6.3: the policy record is the one TXT record at ``_dmarc.<author domain>`` that starts
  ``v=DMARC1``; none there: the one at the organisational domain's; more than one at
  either: no policy;
- §3.1: identifiers align, strict (same name) or relaxed (same organisational domain),
  as ``adkim``/``aspf`` say; SPF's identifier is the MAIL FROM domain, or the HELO name
  for the null sender (§4.1 via RFC 7208 §2.4);
- §6.6.4: ``pct`` samples the failing messages a policy applies to; one outside the
  sample gets the next policy down (reject, quarantine, none): ``disposition``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from dkim.util import InvalidTagValueList, parse_tag_value
from publicsuffixlist import PublicSuffixList

from defang.workers.checks.resolver import Resolver, TempError

STRICTNESS = {"none": 0, "quarantine": 1, "reject": 2}
NEXT_DOWN = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_VERSION = re.compile(r"v\s*=\s*DMARC1\s*(;|$)")  # §6.3: "v" first, value exactly DMARC1


@dataclass(frozen=True)
class DmarcResult:
    result: str  # pass fail none temperror permerror
    from_domain: str = ""  # the author domain this result is about (the deciding one of several)
    policy: str = ""  # the published policy: none quarantine reject ("" without a record)
    comment: str = ""
    pct: int = 100  # the record's pct= (§6.6.4)
    disposition: str = ""  # what to apply: for a fail, the policy, or the next one down outside pct's sample
    from_domains: tuple[str, ...] = ()  # every author domain evaluated (§6.6.1)


@dataclass(frozen=True)
class _Record:
    at: str  # the name whose _dmarc record it is (the author or organisational domain)
    policy: str
    pct: int
    adkim: str
    aspf: str


@cache
def suffix_list(path: str = "") -> PublicSuffixList:
    """The public suffix list: ``path`` ([auth] public_suffix_list) or the one that ships with
    publicsuffixlist; read once per process (in the zygote, for every worker)."""
    if not path:
        return PublicSuffixList()
    with open(path, encoding="utf-8") as f:
        return PublicSuffixList(f)


def org_domain(domain: str, psl: str = "") -> str:
    """The organisational domain (RFC 7489 §3.2): the public suffix plus one label.  A TLD
    the list does not know is a public suffix by the list's default rule ``*``; a name
    that is itself a public suffix is its own.  An empty label (``b..bank.example``) is no
    label: the list is asked about the labels there are, so such a name still falls
    under its neighbours' policy (the list's answer for it would be none at all)."""
    domain = domain.lower().rstrip(".")
    labels = ".".join(label for label in domain.split(".") if label)
    return suffix_list(psl).privatesuffix(labels) or domain


def aligned(a: str, b: str, mode: str, psl: str = "") -> bool:
    """Identifier alignment (§3.1): strict ``s`` is the same name, relaxed the same
    organisational domain."""
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if not a or not b:
        return False
    return a == b if mode == "s" else org_domain(a, psl) == org_domain(b, psl)


def _records(domain: str, resolver: Resolver) -> list[str]:
    """The TXT records at _dmarc.``domain`` that start v=DMARC1 (TempError: no answer)."""
    found = resolver.query(f"_dmarc.{domain}", "TXT")
    texts = [b"".join(r.strings).decode("utf-8", "replace").strip() for r in found]
    return [t for t in texts if _VERSION.match(t)]


def _parse(text: str, at: str, from_org: bool) -> _Record | str:
    """The record's policy tags, or why it gives none (§6.3, §6.6.3 step 6)."""
    try:
        tags = {k.decode().lower(): v.decode().strip() for k, v in parse_tag_value(text.encode()).items()}
    except (InvalidTagValueList, UnicodeDecodeError) as exc:
        return f"malformed record at _dmarc.{at}: {exc.__class__.__name__}"
    policy = tags.get("p", "").lower()
    if policy not in STRICTNESS:
        if not tags.get("rua"):  # §6.6.3 step 6: no valid p= and nowhere to report: no DMARC
            return f"record at _dmarc.{at} has no valid p="
        policy = "none"
    sp = tags.get("sp", "").lower()
    if from_org and sp in STRICTNESS:
        policy = sp
    pct = tags.get("pct", "100")
    return _Record(at, policy, int(pct) if pct.isdigit() and int(pct) <= 100 else 100,
                   "s" if tags.get("adkim", "r").lower() == "s" else "r",
                   "s" if tags.get("aspf", "r").lower() == "s" else "r")  # fmt: skip


def discover(domain: str, resolver: Resolver, psl: str = "") -> _Record | str | None:
    """The policy record for ``domain`` (§6.6.3); a text when there is none to apply
    (several records, a malformed one); None when nobody published one; TempError."""
    texts = _records(domain, resolver)
    org = org_domain(domain, psl)
    if not texts and org != domain:
        texts = _records(org, resolver)
        at, from_org = org, True
    else:
        at, from_org = domain, False
    if len(texts) > 1:
        return f"{len(texts)} DMARC records at _dmarc.{at}: no policy (RFC 7489 6.6.3)"
    if not texts:
        return None
    return _parse(texts[0], at, from_org)


def evaluate(domain: str, spf_result: str, spf_domain: str, dkim_passes: Sequence[str], resolver: Resolver,
             psl: str = "", sample: Any = random.randrange) -> DmarcResult:  # fmt: skip
    """DMARC for one author domain, given SPF's result and domain and the d= of every DKIM
    signature that verified."""
    try:
        record = discover(domain, resolver, psl)
    except TempError as exc:
        return DmarcResult("temperror", domain, comment=str(exc)[:200], from_domains=(domain,))
    if record is None:
        return DmarcResult("none", domain, from_domains=(domain,))
    if isinstance(record, str):
        result = "permerror" if record.startswith("malformed") else "none"
        return DmarcResult(result, domain, comment=record, from_domains=(domain,))
    via = [f"dkim {d}" for d in dkim_passes if aligned(d, domain, record.adkim, psl)]
    if spf_result == "pass" and aligned(spf_domain, domain, record.aspf, psl):
        via.insert(0, f"spf {spf_domain}")
    where = "" if record.at == domain else f" of {record.at}"
    if via:
        return DmarcResult("pass", domain, record.policy, f"aligned: {', '.join(via)}", record.pct, "none",
                           (domain,))  # fmt: skip
    disposition, note = record.policy, f"p={record.policy}{where}"
    if record.pct < 100:
        if sample(100) < record.pct:
            note += f", pct={record.pct}: in the sample"
        else:
            disposition = NEXT_DOWN[record.policy]
            note += f", pct={record.pct}: outside the sample, {disposition} applies"
    comment = f"no aligned identifier; {note}"
    return DmarcResult("fail", domain, record.policy, comment, record.pct, disposition, (domain,))


_ORDER = ("fail", "temperror", "permerror", "pass", "none")  # which author domain's result stands


def combine(results: Sequence[DmarcResult], fields: int = 1) -> DmarcResult:
    """Several author domains (§6.6.1): the strictest failing one stands (then a temperror,
    a permerror, a pass); the comment names every domain and its result."""
    if len(results) == 1 and fields <= 1:
        return results[0]
    order = sorted(results, key=lambda r: (_ORDER.index(r.result), -STRICTNESS.get(r.disposition, 0)))
    first = order[0]
    each = ", ".join(f"{r.from_domain} {r.result}" for r in results)
    what = f"{fields} From fields" if fields > 1 else f"{len(results)} author domains"
    comment = f"{what}: {each}; {first.from_domain}: {first.comment}".rstrip(": ")
    domains = tuple(r.from_domain for r in results)
    return DmarcResult(first.result, first.from_domain, first.policy, comment, first.pct, first.disposition,
                       domains)  # fmt: skip
