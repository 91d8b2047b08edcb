"""Benchmark filter "auth" for defang: three IP blocklists at connect (side by side), SPF at
MAIL FROM, DKIM and DMARC at the end of the message, an Authentication-Results header.
The DNS server is NSD on loopback (scripts/bench_auth.py); each worker caches its
answers for their TTL, as in production."""

from defang import auth, reject

BLOCKLISTS = ["bl1.bench.test", "bl2.bench.test", "bl3.bench.test"]


def filter_relay(conn):
    if auth.dnsbl(conn, BLOCKLISTS):
        return reject("listed", code="554", dsn="5.7.1")
    return None


def filter_sender(conn, sender):
    if auth.spf(conn, sender).result == "fail":
        return reject("SPF fail", code="550", dsn="5.7.23")
    return None


def filter_end(msg):
    auth.add_results_header(msg)
