"""Wildcard addresses: first.last.anything@our.domain is delivered to first.last@our.domain
(people hand out first.last.shopname@ to see who sells their address).  The envelope
recipient is rewritten, and the address as sent is kept in an X-Original-Recipient
header, one per rewritten recipient.  Other domains are left alone."""

import re

from site_policy import OUR_DOMAINS

WILDCARD = re.compile(r"(?P<first>[a-z0-9-]+)\.(?P<last>[a-z0-9-]+)\.[^@.][^@]*", re.IGNORECASE)


def filter_begin(msg):
    for rcpt in msg.recipients:
        local, _, domain = rcpt.rpartition("@")
        match = WILDCARD.fullmatch(local)
        if match is None or domain.lower() not in OUR_DOMAINS:
            continue
        msg.delete_recipient(rcpt)
        msg.add_recipient(f"{match['first']}.{match['last']}@{domain}")
        msg.add_header("X-Original-Recipient", rcpt)
