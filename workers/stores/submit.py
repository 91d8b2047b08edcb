"""Handing a message back to the MTA: for a quarantine release and for notices.

Two ways, as MIMEDefang offers: ``sendmail`` runs ``sendmail_path -i -f SENDER -- RCPTS``
with the message on its standard input; ``smtp`` speaks SMTP to ``smtp_host:smtp_port``.
Either path must not lead through defang again (Postfix: sendmail while
``non_smtpd_milters`` does not name defang, or an smtpd listener with ``-o
smtpd_milters=``), or a released message would be filtered, and quarantined, again.

``smtplib`` is imported where it is used: it imports ``ssl`` and with it OpenSSL's
libcrypto, which every defang process would otherwise map (see ``quarantine``).
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class SubmitError(Exception):
    """The MTA did not take the message; the text says what and why."""


@dataclass(frozen=True)
class Submission:
    method: str = "sendmail"
    sendmail_path: str = "/usr/sbin/sendmail"
    smtp_host: str = "127.0.0.1"
    smtp_port: int = 25
    timeout: float = 120.0

    @classmethod
    def for_release(cls, cfg: Any) -> Submission:
        """``[quarantine]`` release_method and its settings."""
        return cls(cfg.quarantine_release_method, str(cfg.quarantine_sendmail_path), cfg.quarantine_smtp_host,
                   cfg.quarantine_smtp_port)  # fmt: skip

    @classmethod
    def for_notices(cls, cfg: Any) -> Submission:
        """``[notify]``."""
        return cls(cfg.notify_method, str(cfg.notify_sendmail_path), cfg.notify_smtp_host,
                   cfg.notify_smtp_port, cfg.notify_timeout)  # fmt: skip

    @classmethod
    def for_split(cls, cfg: Any) -> Submission:
        """``[split]``: the copies of a split message (this path leads through defang again)."""
        return cls(cfg.split_method, str(cfg.split_sendmail_path), cfg.split_smtp_host, cfg.split_smtp_port,
                   cfg.split_timeout)  # fmt: skip

    @property
    def via(self) -> str:
        return self.sendmail_path if self.method == "sendmail" else f"smtp:{self.smtp_host}:{self.smtp_port}"


def submit(how: Submission, sender: str, rcpts: list[str], message: bytes | Path) -> str:
    """Hand ``message`` (bytes, or a file) to the MTA; the way it went, or SubmitError."""
    for addr in [sender, *rcpts]:
        if any(c in addr for c in "\r\n\0") or addr.startswith("<"):
            raise SubmitError(f"refusing the address {addr!r}")
    if not rcpts:
        raise SubmitError("no recipients")
    if how.method == "sendmail":
        _sendmail(how, sender, rcpts, message)
    elif how.method == "smtp":
        _smtp(how, sender, rcpts, message.read_bytes() if isinstance(message, Path) else message)
    else:
        raise SubmitError(f"unknown method {how.method!r} (sendmail or smtp)")
    return how.via


def _sendmail(how: Submission, sender: str, rcpts: list[str], message: bytes | Path) -> None:
    argv = [how.sendmail_path, "-i", "-f", sender or "<>", "--", *rcpts]
    try:
        if isinstance(message, Path):
            with open(message, "rb") as f:
                done = subprocess.run(argv, stdin=f, capture_output=True, timeout=how.timeout)
        else:
            done = subprocess.run(argv, input=message, capture_output=True, timeout=how.timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SubmitError(f"{how.sendmail_path} failed: {exc}") from None
    if done.returncode != 0:
        err = done.stderr.decode("utf-8", "replace").strip() or done.stdout.decode("utf-8", "replace")
        raise SubmitError(f"{how.sendmail_path} exited {done.returncode}: {err.strip()[:500]}")


def _smtp(how: Submission, sender: str, rcpts: list[str], data: bytes) -> None:
    import smtplib  # here, not at the top: see the module docstring

    try:
        with smtplib.SMTP(how.smtp_host, how.smtp_port, timeout=how.timeout) as smtp:
            smtp.ehlo_or_helo_if_needed()
            options = []
            if smtp.has_extn("8bitmime") and not data.isascii():
                options.append("BODY=8BITMIME")
            if smtp.has_extn("smtputf8") and not all(a.isascii() for a in [sender, *rcpts]):
                options.append("SMTPUTF8")
            refused = smtp.sendmail(sender, rcpts, data, mail_options=options)
    except (OSError, smtplib.SMTPException) as exc:
        raise SubmitError(f"{how.smtp_host}:{how.smtp_port} failed: {exc}") from None
    if refused:
        raise SubmitError(f"recipients refused: {refused}")
