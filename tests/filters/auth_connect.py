"""A client on the test IP blocklist (local.bl.test lists 127.0.0.1) is refused at connect."""

from defang import auth, reject


def filter_relay(conn):
    found = auth.dnsbl(conn, ["local.bl.test"])
    if found:
        return reject(f"{conn.ip} listed: {found.listed[0].reason}", code="554", dsn="5.7.1")
    return None
