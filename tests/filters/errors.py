"""Every way admin code can break the contract."""

import math


def filter_relay(conn):
    if conn.ip == "198.51.100.1":
        conn.notes["when"] = object()  # not JSON
    elif conn.ip == "198.51.100.2":
        conn.notes["big"] = "x" * 100_000
    elif conn.ip == "198.51.100.3":
        conn.notes["nan"] = math.nan
    elif conn.ip == "198.51.100.4":
        conn.notes = ["not", "a", "dict"]
    elif conn.ip == "198.51.100.5":
        conn.notes["half"] = "edited"
        raise RuntimeError("relay broke")
    return None


def filter_helo(conn):
    return True


def filter_sender(conn, sender):
    return 42


def filter_recipient(conn, recipient):
    raise SystemExit(3)


def filter_end(msg):
    msg.add_header("X-Before", "dropped")
    if msg.get_header("X-Test") == "ok":
        return None
    if msg.get_header("X-Test") == "return-string":
        return "reject"
    return 1 / 0
