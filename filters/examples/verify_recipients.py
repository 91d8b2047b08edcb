"""Recipient verification: unknown users of our domains are refused before DATA.

A relay in front of the mailbox server does not know the users; without this it takes
mail for anyone@our.domain, and the mailbox server bounces what it cannot deliver, to
senders that are mostly forged (backscatter).  Here each recipient of our domains is
asked of the next hop first ([verify] host, port in defang.toml; MIMEDefang's
md_check_against_smtp_server): an unknown user gets "550 5.1.1 Recipient address
rejected: User unknown" at RCPT TO, and the sending MTA bounces, not us.  Answers are
kept ([verify] positive_ttl, negative_ttl; in [state], shared by every relay on one
Redis).  When the next hop does not answer, [verify] on_error decides: "tempfail" (451
4.4.3, the sender retries) or "accept".  Recipients of other domains are not asked:
relay control decides them (the MTA's job).
"""

from defang import verify

OUR_DOMAINS = {"example.org"}  # the domains the next hop holds the users of


def filter_recipient(conn, recipient):
    domain = recipient.strip("<>").rpartition("@")[2].lower()
    if domain not in OUR_DOMAINS:
        return None
    return verify.recipient(conn, recipient).verdict
