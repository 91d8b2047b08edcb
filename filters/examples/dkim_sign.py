"""DKIM signing for the relay's own domains.

Mail from our own clients (OUR_NETWORKS, or authenticated: the {auth_authen} macro) whose
From domain is ours is signed with that domain's keys from [dkim] keys, as it leaves:
each signature covers every header and body change made before it (a disclaimer added
by another hook included).  Two keys for a domain, RSA and Ed25519 (RFC 8463), give two
signatures: verifiers that know Ed25519 check that one, the others the RSA one.
Configure, e.g.:

    [dkim]
    keys = [{domain = "example.com", selector = "s2026", key = "/etc/defang/dkim/example.com.pem"},
            {domain = "example.com", selector = "ed2026", key = "/etc/defang/dkim/example.com.ed25519"}]

(the RSA key a PEM file, the Ed25519 key the base64 seed "dknewkey --ktype ed25519"
writes) and publish each public key at its selector: s2026._domainkey.example.com
(k=rsa), ed2026._domainkey.example.com (k=ed25519).  A key that cannot sign refuses
the filter's load, in one line.  Postfix: the milter must
also see submitted mail (smtpd_milters on the submission service, non_smtpd_milters for
sendmail).
"""

import ipaddress
from email.utils import getaddresses

from defang import auth

OUR_DOMAINS = {"example.com"}
OUR_NETWORKS = [ipaddress.ip_network(n) for n in ("127.0.0.0/8", "10.20.0.0/16")]


def filter_end(msg):
    ip = ipaddress.ip_address(msg.conn.ip) if msg.conn.ip else None
    ours = msg.conn.macros.get("{auth_authen}") or (ip is not None and any(ip in n for n in OUR_NETWORKS))
    froms = [addr for _, addr in getaddresses(msg.get_all_headers("From"))]
    domain = froms[0].rpartition("@")[2].lower() if len(froms) == 1 else ""
    if ours and domain in OUR_DOMAINS:
        auth.dkim_sign(msg, domain)
    return None
