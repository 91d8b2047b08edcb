"""The part of ``msg`` that reaches outside the worker: the scanners and the notices.

A mixin of ``Message`` (kept apart so that the message's own concerns, headers, parts and
verdicts, stay in ``message``): ``msg.start_checks()``, ``msg.spamassassin()``,
``msg.rspamd()``, ``msg.clamav()`` and ``msg.add_spam_headers()`` (``scanning``),
``msg.notify()``, ``msg.notify_sender()`` and ``msg.notify_administrator()``
(``notify``).  The runner sets ``services`` from the config.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defang.core.config import (
    ArcSection,
    AuthSection,
    DkimSection,
    DnsSection,
    NotifySection,
    SplitSection,
)
from defang.core.options import flat_view
from defang.workers.api.notify import MAX_NOTICES, Notice, NoticeError, compose
from defang.workers.api.scanning import Envelope, Scans, ScanSettings, spam_headers
from defang.workers.checks.results import RspamdResult, SpamResult, VirusResult
from defang.workers.checks.smtpverify import VerifySettings
from defang.workers.stores.state import UNCONFIGURED, GreylistSettings, StateSettings

log = logging.getLogger("defang.filter")


#: ``[dns]``, ``[auth]``, ``[dkim]``, ``[arc]`` under their flat names (``dns_servers``), as
#: declared in defang.core.config: plain values (``defang.auth`` turns them into a resolver
#: and keys; this module must not import dnspython)
AuthSettings = flat_view("AuthSettings", DnsSection, AuthSection, DkimSection, ArcSection, module=__name__)


@dataclass(frozen=True)
class ServiceSettings:
    scans: ScanSettings = field(default_factory=ScanSettings)
    notify_from: str = NotifySection().from_
    administrator: str = NotifySection().administrator
    auth: Any = field(default_factory=AuthSettings)
    state: StateSettings = UNCONFIGURED  # defang.state and its users
    greylist: GreylistSettings = field(default_factory=GreylistSettings)
    split_max_copies: int = SplitSection().max_copies  # msg.split_by_recipient()
    verify: VerifySettings = field(default_factory=VerifySettings)  # defang.verify

    @classmethod
    def from_config(cls, cfg: Any) -> ServiceSettings:
        """The sections the message's services read, from a ``defang.core.config.Config``."""
        notify = cfg.section(NotifySection)
        return cls(ScanSettings.from_config(cfg), notify.from_, notify.administrator,
                   cfg.section(AuthSettings), cfg.section(StateSettings), cfg.section(GreylistSettings),
                   cfg.split_max_copies, cfg.section(VerifySettings))  # fmt: skip


#: this worker's settings (the runner sets them): what ``defang.auth`` and ``defang.state``
#: read, as their functions get a ``conn`` or an address, not a message
CURRENT = ServiceSettings()


class Services:
    """Scanners and notices for one message (mixed into ``Message``)."""

    #: where the scanners are and who gets notices (the runner sets it from the config)
    services: ServiceSettings = ServiceSettings()
    _scans: Scans | None = None
    _notices: list[Notice] | None = None
    #: what runs on the message as it will leave, after the rebuild (DKIM signing, ARC
    #: sealing): callables (message, actions so far) -> more actions
    _last_steps: list[Any] | None = None
    _auth: Any = None  # defang.auth.check(msg)'s results, kept

    # provided by Message
    path: str
    recipients: list[str]
    queue_id: str | None
    sender: str
    conn: Any
    actions: list[list[Any]]
    size: int
    subject: str
    raw_headers: list[tuple[str, bytes]]

    # --- scanners

    @property
    def scans(self) -> Scans:
        """This message's checks (started, kept): what ``spamassassin()``, ``clamav()``
        and ``part.clamav()`` use; a filter calls those instead."""
        if self._scans is None:
            c, macros = self.conn, self.conn.macros
            envelope = Envelope(c.ip, c.hostname, c.helo, self.sender, tuple(self.recipients),
                                self.queue_id or macros.get("i", ""), macros.get("j") or socket.gethostname(),
                                bool(macros.get("tls_version")), macros.get("auth_authen", ""))  # fmt: skip
            self._scans = Scans(self.services.scans, self.path, self.size, self.queue_id or "", envelope)
        return self._scans

    @property
    def spamassassin_headers(self) -> str:
        """What spamd is given before the message: the ``Return-Path:`` and ``Received:``
        lines of the hop being received (``[spamassassin] add_received``; "" when off)."""
        return self.scans.hop().decode("ascii")

    def start_checks(self, *names: str, user: str | None = None) -> None:
        """Ask the scanners now (``"spamassassin"``, ``"rspamd"``, ``"clamav"``), read the
        results later: the waits overlap.  A check already started or done is not asked
        again.  ``user``: as for ``spamassassin()``."""
        self.scans.start(*names, user=user)

    def spamassassin(self, user: str | None = None) -> SpamResult:
        """spamd's verdict on the message (asked once per user, kept); never raises: see
        ``error``.  ``user`` (a recipient, a policy group): spamd applies that user's
        settings (its ``User`` header); None: ``[spamassassin] user``."""
        return self.scans.result("spamassassin", user)

    def rspamd(self, user: str | None = None) -> RspamdResult:
        """rspamd's verdict (asked once per user, kept); never raises.  ``user``: the
        recipient whose settings apply (rspamd's ``Deliver-To``)."""
        return self.scans.result("rspamd", user)

    def clamav(self) -> VirusResult:
        """clamd's verdict on the whole message (asked once, kept); never raises."""
        return self.scans.result("clamav")

    def add_spam_headers(self, result: SpamResult | None = None, *, subject_tag: str | None = None) -> None:
        """Add ``X-Spam-Status``, ``X-Spam-Score`` (and ``X-Spam-Flag: YES`` on spam); with
        ``subject_tag``, prefix the subject of spam with it (``"[SPAM] "``)."""
        result = result if result is not None else self.spamassassin()
        for name, value in spam_headers(result):
            self.add_header(name, value)  # type: ignore[attr-defined]
        if subject_tag and result.scanned and result.is_spam:
            raw = next((v for n, v in self.raw_headers if n.lower() == "subject"), None)
            if raw is None:
                self.add_header("Subject", subject_tag.strip())  # type: ignore[attr-defined]
            else:
                text = raw.decode("ascii") if raw.isascii() else self.subject
                self.change_header("Subject", subject_tag + " ".join(text.split()))  # type: ignore[attr-defined]

    # --- notices

    def notify(self, to: str | list[str], subject: str, body: str, *, attach_original: bool = False) -> None:
        """Send a notice after the reply to the MTA (see ``defang.workers.api.notify``)."""
        if self._notices is None:
            self._notices = []
        if len(self._notices) >= MAX_NOTICES:
            raise NoticeError(f"at most {MAX_NOTICES} notices per message")
        domain = self.conn.macros.get("j") or "localhost"
        self._notices.append(compose(self.services.notify_from, [to] if isinstance(to, str) else list(to),
                                     subject, body, queue_id=self.queue_id, domain=domain,
                                     original=Path(self.path) if attach_original else None))  # fmt: skip

    def notify_administrator(self, subject: str, body: str, *, attach_original: bool = False) -> None:
        """A notice to ``[notify] administrator``."""
        self.notify(self.services.administrator, subject, body, attach_original=attach_original)

    def notify_sender(self, subject: str, body: str) -> None:
        """A notice to the envelope sender; none to the null sender (a bounce), with an INFO line."""
        if not self.sender:
            log.info("%s: no notice to the null sender (%s)", self.queue_id or "-", subject)
            return
        self.notify(self.sender, subject, body)

    @property
    def notices(self) -> list[Notice]:
        """What this message will send once the MTA has its reply."""
        return list(self._notices or [])
