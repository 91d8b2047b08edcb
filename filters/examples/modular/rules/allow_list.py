"""Allow list, honoured first: mail from a listed client (IP or network) or envelope
sender (address or @domain) is accepted with no further filtering.

accept() at connect or MAIL FROM tells the MTA to stop asking defang about this
connection or message: no later rule runs, nothing is added or rewritten.  The list is
allow_list.txt beside filter.py, read once per worker (defangctl reload re-reads it).
"""

import ipaddress
from pathlib import Path

from defang import accept

LIST = Path(__file__).resolve().parent.parent / "allow_list.txt"
networks: list = []
senders: set[str] = set()
domains: set[str] = set()


def filter_initialize():
    networks.clear(), senders.clear(), domains.clear()
    for line in LIST.read_text().splitlines():
        entry = line.split("#", 1)[0].strip().lower()
        if not entry:
            continue
        if entry.startswith("@"):
            domains.add(entry[1:])
        elif "@" in entry:
            senders.add(entry)
        else:
            # a bad entry is a ValueError: the worker does not boot, and its log says why
            networks.append(ipaddress.ip_network(entry, strict=False))


def filter_relay(conn):
    try:
        ip = ipaddress.ip_address(conn.ip)
    except ValueError:
        return None
    if any(ip in network for network in networks):
        return accept()
    return None


def filter_sender(conn, sender):
    sender = sender.lower()
    if sender in senders or sender.rpartition("@")[2] in domains:
        return accept()
    return None
