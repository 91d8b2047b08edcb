"""Authentication-Results for what arrives, nothing else: defang's verdicts beside a peer
milter's (tests/postfix/test_auth_peers.py)."""

from defang import auth


def filter_end(msg):
    auth.add_results_header(msg, auth.check(msg))
