"""A check address: mail to email-check@<your domain> is answered, not delivered.

The reply to the sender says what this relay saw: the client's address and name, its
HELO, the time, the envelope, and the filter's view of the message (SpamAssassin's score
and rules, ClamAV's verdict, the parts).  Admins and users send a test message there to
see how their mail arrives.  The check address is taken out of the envelope; if it was
the only recipient the message is discarded after the reply is composed.

Needs [notify] (how the reply is sent); the scanners are asked if configured.  No reply
goes to the null sender (a bounce), so two check addresses cannot talk to each other.
"""

import time

from defang import discard

CHECK_LOCAL_PARTS = {"email-check"}


def _is_check(rcpt):
    return rcpt.rpartition("@")[0].lower() in CHECK_LOCAL_PARTS


def filter_begin(msg):
    if any(_is_check(r) for r in msg.recipients):
        msg.start_checks("spamassassin", "clamav")


def filter_end(msg):
    checks = [r for r in msg.recipients if _is_check(r)]
    if not checks:
        return None
    c = msg.conn
    spam, virus = msg.spamassassin(), msg.clamav()
    rules = ", ".join(f"{name} {points:g}" for name, points in sorted(spam.rules.items())) or "-"
    parts = "\n".join(f"  {p.index}: {p.content_type} {p.filename or ''} ({p.size} bytes)" for p in msg.parts)
    msg.notify_sender(
        f"Re: {msg.subject}",
        f"This is the answer of {checks[0]} to your test message.\n\n"
        f"Received:   {time.strftime('%Y-%m-%d %H:%M:%S %z')}\n"
        f"Client:     {c.hostname} [{c.ip}]\n"
        f"HELO:       {c.helo}\n"
        f"Sender:     <{msg.sender}>\n"
        f"Recipients: {', '.join(msg.recipients)}\n"
        f"Size:       {msg.size} bytes\n\n"
        f"SpamAssassin: {spam}\n  rules: {rules}\n"
        f"ClamAV:       {virus}\n\n"
        f"Parts:\n{parts}\n",
    )
    msg.tag("check_address")
    for rcpt in checks:
        msg.delete_recipient(rcpt)
    if len(checks) == len(msg.recipients):
        return discard()
    return None
