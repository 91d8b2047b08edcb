"""Notices a filter sends: to the administrator, to a sender, to anyone (MIMEDefang's
``send_mail``, ``action_notify_administrator``, ``action_notify_sender``).

A notice is composed when the filter asks (``msg.notify(...)``) and sent by the worker
**after** its reply to the MTA (``FilterRunner.send_notices``): the SMTP client never
waits for it, and a notice that cannot be sent is logged (with the queue ID) and changes
nothing.  Notices of a message whose hooks failed (a filter error: the message comes back
with the retry) are not sent.  ``defang test`` and ``replay`` show them and send none
unless ``--send-mail`` (``defang.cli.trial``).

A notice's envelope sender is the null sender (``<>``): a notice to a forged address
cannot start a loop of bounces (RFC 3834); it says ``Auto-Submitted: auto-generated``.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import SMTP
from pathlib import Path

from defang.workers.api.headers import check_address

MAX_NOTICES = 10  # per message: a filter in a loop must not mail-bomb anyone
MAX_BODY = 1024 * 1024


class NoticeError(ValueError):
    """The filter asked for a notice that cannot be sent (no recipient, too many)."""


@dataclass(frozen=True)
class Notice:
    recipients: tuple[str, ...]
    subject: str
    data: bytes

    def __str__(self) -> str:
        return f"notice to {', '.join(self.recipients)}: {self.subject}"


def compose(sender: str, to: list[str], subject: str, body: str, *, queue_id: str | None,
            original: Path | None = None, domain: str = "localhost") -> Notice:  # fmt: skip
    """A text notice, with the original message attached (message/rfc822) if given."""
    if not to:
        raise NoticeError("a notice needs a recipient")
    rcpts = tuple(check_address(a, what="notice recipient") for a in to)
    if len(body) > MAX_BODY:
        raise NoticeError(f"a notice's body is limited to {MAX_BODY} characters")
    m = EmailMessage(policy=SMTP)
    m["From"] = sender
    m["To"] = ", ".join(rcpts)
    m["Subject"] = " ".join(subject.split())[:200]
    m["Date"] = email.utils.formatdate(localtime=True)
    m["Message-ID"] = email.utils.make_msgid("defang", domain=domain)  # no DNS lookup for the name
    m["Auto-Submitted"] = "auto-generated"
    if queue_id:
        m["X-Defang-Queue-ID"] = queue_id
    m.set_content(body)
    if original is not None:  # message/rfc822 is never base64 (RFC 2046): the parsed message, 8bit
        enclosed = BytesParser(policy=SMTP).parsebytes(original.read_bytes())
        m.add_attachment(enclosed, disposition="attachment", filename="original.eml")
    return Notice(rcpts, str(m["Subject"]), m.as_bytes())
