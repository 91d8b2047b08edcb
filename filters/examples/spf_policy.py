"""SPF first, reputation second, before DATA:

    "If SPF passes, accept.  If SPF fails, drop.  If softfail or none, check
     reputation; any failure gets a 4xx with the reason."

At MAIL FROM, for a client not on the allow list:

  * SPF pass: accepted with no further filtering (the sender's domain vouches for it);
  * SPF fail: refused, 550 5.7.23 with SPF's explanation;
  * softfail, neutral or none: the client's address is looked up in BLOCKLISTS (side
    by side); listed: refused, 554 5.7.1 naming the list and its reason;
  * SPF temperror or permerror, or a blocklist that did not answer: 451 4.7.24 with the
    reason: the sending MTA retries (SPF's own advice for temperror; a broken record is
    the sender's to fix, and a 4xx gives them the time).

Needs [dns] (a caching resolver; public blocklists refuse public resolvers).
"""

import ipaddress

from defang import accept, auth, reject, tempfail

BLOCKLISTS = ["zen.spamhaus.org", "bl.spamcop.net", "b.barracudacentral.org"]
ALLOW_CLIENTS = [ipaddress.ip_network(n) for n in ("10.20.0.0/16",)]  # your own networks


def filter_sender(conn, sender):
    ip = ipaddress.ip_address(conn.ip) if conn.ip else None
    if ip is not None and any(ip in net for net in ALLOW_CLIENTS):
        return accept()
    spf = auth.spf(conn, sender)
    if spf.result == "pass":
        conn.tag("spf_pass")
        return accept()
    if spf.result == "fail":
        conn.tag("spf_fail")
        return reject(f"SPF check failed: {spf.explanation}", code="550", dsn="5.7.23")
    if spf.result in ("temperror", "permerror"):
        return tempfail(f"SPF {spf.result}: {spf.explanation}"[:200], code="451", dsn="4.7.24")
    listed = auth.dnsbl(conn, BLOCKLISTS)
    if listed:
        first = listed.listed[0]
        conn.tag("dnsbl")
        return reject(f"{conn.ip} is listed by {first.zone}: {first.reason or ', '.join(first.codes)}"[:300],
                      code="554", dsn="5.7.1")  # fmt: skip
    if listed.errors:
        return tempfail(f"Blocklist lookup failed ({listed.errors[0].zone}), try again later", code="451",
                        dsn="4.7.24")  # fmt: skip
    return None
