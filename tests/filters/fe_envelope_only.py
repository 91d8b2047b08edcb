"""A filter with no message hooks: the MTA must not even send headers or body."""

from defang import reject


def filter_helo(conn):
    if conn.helo == "bad.example":
        return reject("Bad HELO")
