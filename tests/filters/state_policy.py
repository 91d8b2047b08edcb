"""The shared-state tests' filter: the lists first, then a rate limit per sender for
ratelimited@example.org (3 an hour), then greylisting with no exemption (the tests send
from loopback, which the greylisting example exempts)."""

from defang import greylist, lists, ratelimit


def filter_sender(conn, sender):
    conn.notes["sender"] = sender
    return None


def filter_recipient(conn, recipient):
    sender = conn.notes.get("sender", "")
    found = lists.check(conn, sender, recipient)
    if found is not None:
        return None if found.allow else found.verdict
    if sender == "ratelimited@example.org":
        return ratelimit.check(conn, "sender", sender=sender, limit=3, window=3600)
    return greylist.check(conn, sender, recipient)
