"""A blocklist in monitor mode: listed clients are logged and stamped, not refused.

The day a blocklist starts listing half the internet, or before trusting a new one: the
lookups run as if enforced, and a listed client's mail is delivered with an
X-Defang-Would header ("would reject 554 5.7.1 ... (filter_relay)"), logged at INFO and
counted in defangctl status (would, and the tag "dnsbl:<zone>").  To enforce, drop
monitor=True.  A lookup that fails is only logged: monitoring must not delay mail.
"""

import logging

from defang import auth, reject

BLOCKLISTS = ["zen.spamhaus.org"]
log = logging.getLogger("defang.filter")


def filter_relay(conn):
    found = auth.dnsbl(conn, BLOCKLISTS)
    for listing in found.errors:
        log.info("dnsbl: %s: %s", conn.ip, listing)
    for listing in found.listed:
        conn.tag(f"dnsbl:{listing.zone}")
        return reject(f"{conn.ip} is listed by {listing.zone}", code="554", dsn="5.7.1", monitor=True)
    return None
