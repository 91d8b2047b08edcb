"""Greylisting with exemptions: an unknown (client /24, sender, recipient) is asked to retry.

The first attempt gets "451 4.7.1 Greylisted, try again in 300 seconds (after HH:MM:SS
UTC)"; a real MTA retries and passes, and after a few correct retries its network is
never delayed again ([greylist] in defang.toml: delay, windows, prefixes, auto_allow).
Never delayed: authenticated users (submission), our own networks, the domains below
(big senders that retry from another pool), and whatever the allow lists hold (`defang
lists add allow ...`), which are checked first; a blocked sender is refused at once.
With [state] backend = "redis" every relay shares the triplets: a retry through another
MX passes.
"""

from defang import greylist, lists

OUR_NETWORKS = ["127.0.0.0/8", "::1/128", "10.0.0.0/8", "192.168.0.0/16"]
NEVER_DELAYED = ["bank.example", "bigmailer.example"]  # sender or recipient domains


def filter_sender(conn, sender):
    conn.notes["sender"] = sender  # for filter_recipient: the triplet needs it
    return None


def filter_recipient(conn, recipient):
    sender = conn.notes.get("sender", "")
    found = lists.check(conn, sender, recipient)
    if found is not None:
        if found.allow:
            return None  # allowed for this recipient: never delayed
        return found.verdict  # blocked: 550 for this recipient (or the tempfail of [state] on_error)
    return greylist.check(conn, sender, recipient, exempt_networks=OUR_NETWORKS,
                          exempt_domains=NEVER_DELAYED)  # fmt: skip
