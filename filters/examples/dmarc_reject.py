"""DMARC honoured, with an allow list first.

At the end of the message (when there is a message to authenticate): SPF (from MAIL
FROM, or the HELO name for a bounce), every DKIM signature, ARC and DMARC for every
author domain in From; their verdicts go into an Authentication-Results header (our
authserv-id, [auth]; any that claim it are removed first).  Then:

  * a client or sender domain on the allow list (a mailing list or forwarder known to
    break signatures) is delivered whatever DMARC says;
  * DMARC fail whose disposition is reject: refused, 550 5.7.1, as the domain owner asks.
    The disposition is the policy, or the next one down for a message outside the
    record's pct= sample (RFC 7489 6.6.4: p=reject; pct=0 quarantines);
  * DMARC fail whose disposition is quarantine: delivered with "[DMARC] " before the
    subject, and tagged, for the users' rules;
  * DMARC temperror: 451 4.7.1, the sending MTA retries.

A From with several addresses (or several From fields) is checked for each author
domain, and the strictest failing policy stands (RFC 7489 6.6.1): a p=reject domain
cannot be slipped past behind a second address.
"""

import ipaddress

from defang import auth, reject, tempfail

ALLOW_CLIENTS = [ipaddress.ip_network(n) for n in ("10.20.0.0/16",)]  # e.g. your mailing list server
ALLOW_SENDER_DOMAINS = {"lists.example.org"}  # envelope sender domains of trusted forwarders


def filter_end(msg):
    results = auth.check(msg)
    auth.add_results_header(msg, results)
    ip = ipaddress.ip_address(msg.conn.ip) if msg.conn.ip else None
    if (ip is not None and any(ip in net for net in ALLOW_CLIENTS)) or \
            msg.sender.rpartition("@")[2].lower() in ALLOW_SENDER_DOMAINS:  # fmt: skip
        return None
    dmarc = results.dmarc
    if dmarc.result == "temperror":
        return tempfail("DMARC check failed temporarily, try again later", code="451", dsn="4.7.1")
    if dmarc.result == "fail" and dmarc.disposition == "reject":
        msg.tag("dmarc_reject")
        return reject(f"DMARC policy of {dmarc.from_domain} rejects this message", code="550", dsn="5.7.1")
    if dmarc.result == "fail" and dmarc.disposition == "quarantine":
        msg.tag("dmarc_quarantine")
        msg.change_header("Subject", "[DMARC] " + msg.subject)
    return None
