"""Benchmark filter "minimal": accept everything.

One message hook (so the MTA sends headers and body and defang spools them, as it must
for any real content filter), doing nothing: what is measured is defang's own cost per
message -- spool, requests, a worker round trip -- not a filter's.
"""


def filter_end(msg):
    return None
