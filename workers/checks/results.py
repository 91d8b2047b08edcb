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


@dataclass(frozen=True)
class Result:
    """What every check's result has: why there is no verdict, if there is none."""

    error: str | None = None
    skipped: str | None = None
    seconds: float = 0.0
    oversize: int = 0  # skipped for being over the check's max_size: the size, in bytes

    #: the check's name, first in ``str(result)``
    NAME: ClassVar[str] = "check"

    @property
    def scanned(self) -> bool:
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

    score: float = 0.0
    required: float = 0.0
    is_spam: bool = False
    rules: dict[str, float] = field(default_factory=dict)  # rule name -> its points
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

    infected: bool = False
    viruses: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.scanned and not self.infected

    NAME: ClassVar[str] = "clamav"

    def verdict(self) -> str:
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
        return f"{self.score:.1f}/{self.required:.1f} {self.action}"
