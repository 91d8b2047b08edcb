"""MIMEDefang's ``examples/stream-by-domain-filter``, ported: different rules for
different recipient domains, with every message going to one domain only.

MIMEDefang's ``stream_by_domain()`` looks at the recipients at the end of the message
and, when they span several domains, re-sends the message once per domain through
Sendmail and discards the original (which needs Sendmail 8.12 submitting over SMTP, or
the copies go unfiltered).  defang does the same split without re-sending anything:
at RCPT TO, a recipient in another domain than the transaction's first one is answered
``452 4.5.3`` ("too many recipients"), which every SMTP client takes as "send the rest
in another transaction" (RFC 5321 section 4.5.3.1.10); Postfix and Sendmail do so at
once.  No copy is made, nothing goes round the filter, and a message's ``filter_begin``
sees one domain.  (Mail submitted locally, which has no RCPT stage to answer, can still
span domains: then the default rules apply.)

``$Domain`` becomes ``msg.scratch["domain"]``: state between the hooks of one message.
"""

from __future__ import annotations

from defang import DANGEROUS_EXTENSIONS, tempfail

#: per-domain rules: which attachment extensions each domain refuses (the original's
#: "Filter actions for abc.com" / "xyz.com" / "Default filter actions")
REFUSED_EXTENSIONS = {
    "abc.com": [*DANGEROUS_EXTENSIONS, "zip", "rar", "7z"],  # abc.com takes no archives either
    "xyz.com": ["exe", "scr", "pif"],
}
DEFAULT_REFUSED = DANGEROUS_EXTENSIONS


def domain_of(address):
    return address.rpartition("@")[2].lower()


def filter_sender(conn, sender):
    conn.notes["domain"] = None  # a new transaction: its first recipient picks the domain
    return None


def filter_recipient(conn, recipient):
    domain = domain_of(recipient)
    first = conn.notes.get("domain")
    if first is None:
        conn.notes["domain"] = domain
        return None
    if domain != first:
        return tempfail(f"One domain per message please: send to {domain} separately",
                        code="452", dsn="4.5.3")  # fmt: skip
    return None


def filter_begin(msg):
    domains = {domain_of(r) for r in msg.recipients}
    msg.scratch["domain"] = domains.pop() if len(domains) == 1 else None  # stream_by_domain()'s $Domain
    return None


def filter_part(msg, part):
    refused = REFUSED_EXTENSIONS.get(msg.scratch["domain"], DEFAULT_REFUSED)
    if part.has_extension(refused):
        part.drop_with_warning(f"An attachment named {part.safe_filename} was removed: "
                               f"{msg.scratch['domain'] or 'this site'} does not accept it.\n",
                               first=True)  # fmt: skip
    return None
