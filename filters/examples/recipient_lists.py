"""Allow and block lists per recipient and global, edited without a reload.

    defang lists add block spam.example 198.51.100.0/24           # everyone's
    defang lists add allow news@partner.example --scope alice@example.org
    defang lists add block marketing.example --scope example.org  # a whole recipient domain

A sender (address, or a domain and the names under it) or client IP range on an allow
list is never refused by the later checks: allowed for every recipient, its message
skips the content checks (the "scores" below); a block entry refuses that recipient with
550 5.7.1.  Allow lists win over block lists, whichever scope.  The lists live in
[state] (SQLite here, or the Redis every relay shares): `defang lists add` applies to the
next message.
"""

from defang import lists, reject

ALLOWED = "allowed"  # conn.notes: the recipients this sender is allowed for


def filter_sender(conn, sender):
    conn.notes["sender"] = sender
    conn.notes[ALLOWED] = []
    return None


def filter_recipient(conn, recipient):
    found = lists.check(conn, conn.notes.get("sender", ""), recipient)
    if found is None:
        return None
    if found.allow:
        conn.notes[ALLOWED].append(recipient)
        return None
    return found.verdict


def filter_begin(msg):
    allowed = msg.conn.notes.get(ALLOWED, [])
    if msg.recipients and all(r in allowed for r in msg.recipients):
        msg.tag("allow_listed")
        return msg.accept()  # allow before scores: the content checks below do not run
    return None


def filter_end(msg):  # the content checks ("scores") an allow-listed sender skips
    if "viagra" in msg.subject.lower():
        return reject("Looks like spam", code="554", dsn="5.7.1")
    return None
