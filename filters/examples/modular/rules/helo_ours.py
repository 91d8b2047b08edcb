"""A client that greets us with one of our own names, our domain, or an address
literal of ours is forging: real peers name themselves.  Our own networks may."""

from site_policy import OUR_DOMAINS, OUR_HOSTNAMES, is_ours

from defang import reject


def filter_helo(conn):
    if is_ours(conn.ip):
        return None
    name = conn.helo.strip().lower().rstrip(".")
    literal = name.startswith("[") and name.endswith("]") and is_ours(name[1:-1].removeprefix("ipv6:"))
    if name in OUR_HOSTNAMES or name in OUR_DOMAINS or literal:
        return reject(f"You are not {name}", code="550", dsn="5.7.1")
    return None
