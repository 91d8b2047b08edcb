"""scripts/dashboard's filter: a verdict, tags and some work time chosen by the message.

No scanner: the Subject names what the filter does (scripts/dashboard sends a mix that
changes over the run), and ``X-Work-Ms`` how long it works (a sleep), so the latency
panels have something to show.
"""

import time

from defang import discard, reject, tempfail


def filter_end(msg):
    work = msg.get_header("X-Work-Ms")
    if work:
        time.sleep(min(int(work), 2000) / 1000)
    subject = msg.subject
    if "newsletter" in subject:
        msg.tag("bulk")
        msg.add_header("X-Bulk", "yes")
    if "invoice" in subject:
        msg.tag("attachment_checked")
    if "spam" in subject:
        msg.tag("spam_block")
        return reject("Not wanted here", "554", "5.7.1")
    if "phish" in subject:
        msg.tag("phishing")
        return reject("Looks like phishing", "554", "5.7.1")
    if "later" in subject:
        msg.tag("upstream_down")
        return tempfail("Come back later", "451", "4.7.1")
    if "drop" in subject:
        msg.tag("dropped")
        return discard()
    msg.add_header("X-Scanned", "dashboard")
    return None
