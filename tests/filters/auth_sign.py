"""Authentication-Results for what arrives, a disclaimer, then a DKIM signature by
relay.test over the message as it leaves (tests/postfix/test_postfix_auth.py)."""

from defang import auth


def filter_end(msg):
    auth.add_results_header(msg)
    msg.append_boilerplate("-- checked by defang")
    auth.dkim_sign(msg, "relay.test")
