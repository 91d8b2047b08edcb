"""Benchmark filter "greylist": greylisting on every recipient, then nothing.

The bench sends every message from one sender to one recipient through loopback: after
the warm-up (``[greylist] delay = 0``: the first attempt tempfails, the next passes) the
triplet is known, so what is measured is the cost of the state lookups (a passed triplet:
two reads) on every message, on the configured back end.
"""

from defang import greylist


def filter_sender(conn, sender):
    conn.notes["sender"] = sender
    return None


def filter_recipient(conn, recipient):
    return greylist.check(conn, conn.notes.get("sender", ""), recipient, auto_allow=0)


def filter_end(msg):
    return None
