"""Who "we" are, for the rules that need it (helo_ours, wildcard_address).  Edit these."""

import ipaddress

# The domains we receive mail for.
OUR_DOMAINS = frozenset({"example.com", "example.net"})
# The names our own servers greet with (a client using one of them is lying).
OUR_HOSTNAMES = frozenset({"mx.example.com", "mail.example.com"})
# Our own networks: their clients may use our names.
OUR_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "10.20.0.0/16"))


def is_ours(ip: str) -> bool:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in network for network in OUR_NETWORKS)
