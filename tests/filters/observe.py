"""One verdict per Subject: the per-message log line and the metrics (test_postfix_observe.py)."""

from defang import discard, reject, tempfail


def filter_end(msg):
    subject = msg.subject
    if "accept" in subject:
        msg.tag("looked_fine")
        msg.add_header("X-Observed", "yes")
        msg.add_header("X-Observed-Too", "yes")
        return None
    if "reject" in subject:
        msg.tag("spam_block")
        return reject("Not wanted here", "554", "5.7.1")
    if "tempfail" in subject:
        return tempfail("Come back later", "451", "4.7.1")
    if "discard" in subject:
        msg.tag("dropped")
        return discard()
    if "error" in subject:
        raise RuntimeError("the filter broke on purpose")
    return None
