"""What a scanner said about a message: plain data, the same whatever went wrong.

A result never raises.  ``error`` says why there is no verdict (the daemon is down, it
timed out, it answered garbage: asking again later may work); ``skipped`` says why the
message was not sent at all (the check is not configured, or the message is over the size
cap: asking again never will).  A message over the cap also has ``oversize``, its size in
bytes.  Either way ``scanned`` is False and the filter decides (the default filter
tempfails mail it could not scan for viruses, and refuses mail too big to scan).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

#: clamd names that come from heuristics, not a signature of known malware
HEURISTIC_PREFIXES = ("Heuristics.", "PUA.")


@dataclass(frozen=True)
class Result:
    """What every check's result has: why there is no verdict, if there is none."""

    #: why there is no verdict (the daemon is down, timed out, answered garbage); None if there is one
    error: str | None = None
    #: why the message was not sent at all (not configured, over the size cap); None if it was
    skipped: str | None = None
    #: how long the check took, in seconds
    seconds: float = 0.0
    #: skipped for being over the check's ``max_size``: the message's size in bytes, else 0
    oversize: int = 0

    #: the check's name, first in ``str(result)``
    NAME: ClassVar[str] = "check"

    @property
    def scanned(self) -> bool:
        """True when there is a verdict (neither ``error`` nor ``skipped``)."""
        return self.error is None and self.skipped is None

    def verdict(self) -> str:
        """The verdict in a few words (a scanned result)."""
        return "scanned"

    def __str__(self) -> str:
        if not self.scanned:
            return f"{self.NAME}: not scanned: {self.error or self.skipped}"
        return f"{self.NAME}: {self.verdict()}"


@dataclass(frozen=True)
class SpamResult(Result):
    """SpamAssassin's verdict: score, the required score, the rules that hit."""

    #: the message's score
    score: float = 0.0
    #: the score from which SpamAssassin calls it spam (its ``required_score``)
    required: float = 0.0
    #: True when ``score`` reached ``required``
    is_spam: bool = False
    #: rule name -> its points, for every rule that hit
    rules: dict[str, float] = field(default_factory=dict)
    #: SpamAssassin's report (its report template: the table of the rules that hit)
    report: str = ""

    def status_header(self) -> str:
        """``X-Spam-Status`` in SpamAssassin's own default form (``_YESNO_, score=_SCORE_
        required=_REQD_ tests=_TESTS_ autolearn=_AUTOLEARN_ version=_VERSION_``), so tools
        that parse it find every field.  spamd's REPORT answer says neither whether it
        learned from the message nor its version: ``autolearn=unavailable`` (SpamAssassin's
        own word when the outcome of learning is not known) and ``version=unknown``."""
        tests = ",".join(sorted(self.rules)) or "none"
        return (f"{'Yes' if self.is_spam else 'No'}, score={self.score:.1f} required={self.required:.1f} "
                f"tests={tests} autolearn=unavailable version=unknown")  # fmt: skip

    NAME: ClassVar[str] = "spamassassin"

    def verdict(self) -> str:
        return f"{self.score:.1f}/{self.required:.1f} {'spam' if self.is_spam else 'ham'}"


@dataclass(frozen=True)
class VirusResult(Result):
    """ClamAV's verdict: infected (with the signature names) or clean."""

    #: True when clamd found anything (a signature, or a heuristic: see ``category``)
    infected: bool = False
    #: the names clamd reported ("Win.Test.EICAR_HDB-1", "Heuristics.Encrypted.Zip")
    viruses: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        """Scanned, and nothing found."""
        return self.scanned and not self.infected

    @property
    def suspicious(self) -> list[str]:
        """The names found by clamd's heuristics rather than a signature
        (``Heuristics.*``, e.g. an encrypted archive or a broken executable, and
        ``PUA.*``, potentially unwanted software)."""
        return [v for v in self.viruses if v.startswith(HEURISTIC_PREFIXES)]

    @property
    def category(self) -> str:
        """MIMEDefang's category of the result: "ok" (clean), "virus" (a signature
        matched), "suspicious" (only heuristics matched), or "unscanned" (``error`` or
        ``skipped`` says why)."""
        if not self.scanned:
            return "unscanned"
        if not self.infected:
            return "ok"
        return "suspicious" if len(self.suspicious) == len(self.viruses) else "virus"

    NAME: ClassVar[str] = "clamav"

    def verdict(self) -> str:
        """"clean", or "infected: " and the names."""
        return "infected: " + ", ".join(self.viruses) if self.infected else "clean"


@dataclass(frozen=True)
class RspamdResult(Result):
    """rspamd's verdict: its score, the score it rejects at, the action it advises
    (``no action``, ``greylist``, ``add header``, ``rewrite subject``, ``soft reject``,
    ``reject``) and the symbols that hit, with their points."""

    score: float = 0.0
    required: float = 0.0
    action: str = ""
    symbols: dict[str, float] = field(default_factory=dict)

    @property
    def is_spam(self) -> bool:
        """rspamd advises more than "no action" or "greylist" (it takes it for spam)."""
        return self.scanned and self.action in ("add header", "rewrite subject", "soft reject", "reject")

    NAME: ClassVar[str] = "rspamd"

    def verdict(self) -> str:
        """Score, required score and the advised action."""
        return f"{self.score:.1f}/{self.required:.1f} {self.action}"
