"""Spam thresholds per recipient, read from a small file, with policy groups (issue 30).

Each recipient has the SpamAssassin score from which their mail is refused
(per_user_thresholds.txt next to this file: "address score" or "@domain score"; anyone
else: DEFAULT_REJECT_AT).  One SMTP reply after DATA cannot refuse a message for one
recipient and deliver it to another, so ``filter_recipient`` puts each recipient in the
policy group of their threshold (``conn.policy``): a transaction only takes recipients
of one threshold, the others are answered 452 4.5.3 and the sending MTA sends them again
in a transaction of their own (later: README, "Per-recipient policy").  Recipients with
the same threshold share a group, so most mail still goes in one transaction.  At end of
message ``msg.policy`` is the threshold of every recipient present:

  * score >= that threshold: refused with 550 (the sending MTA bounces it: no backscatter);
  * spam below it (SpamAssassin's own required score): delivered with "[SPAM] " before the
    subject; every scanned message gets X-Spam-Status and X-Spam-Score.

Needs [spamassassin] address in defang.toml.  The file is read when a worker starts (a
reload, ``defang reload``, reads it again); a line that is not "address score" is
skipped with a warning in the log, so that one typo does not stop the mail.
"""

import logging
from pathlib import Path

from defang import reject

DEFAULT_REJECT_AT = 10.0
THRESHOLDS = Path(__file__).with_name("per_user_thresholds.txt")
SUBJECT_TAG = "[SPAM] "
log = logging.getLogger("defang.filter")


def read_thresholds(path: Path) -> dict[str, float]:
    """address (or "@domain") -> score, lower case; {} when the file is missing."""
    table = {}
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return {}
    for number, line in enumerate(lines, 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        try:
            address, score = words
            table[address.lower()] = float(score)
        except ValueError:
            log.warning("%s:%d: not \"address score\": %r skipped", path, number, line)
    return table


TABLE = read_thresholds(THRESHOLDS)


def threshold(recipient: str) -> float:
    address = recipient.lower()
    return TABLE.get(address, TABLE.get("@" + address.rpartition("@")[2], DEFAULT_REJECT_AT))


def filter_recipient(conn, recipient):
    reject_at = threshold(recipient)
    if reject_at != DEFAULT_REJECT_AT:
        conn.policy(f"{reject_at:g}")  # the default threshold is the default group
    return None


def filter_begin(msg):
    msg.start_checks("spamassassin")


def filter_end(msg):
    reject_at = float(msg.policy) if msg.policy else DEFAULT_REJECT_AT
    spam = msg.spamassassin()
    if spam.scanned and spam.score >= reject_at:
        msg.tag("spam_reject")
        return reject(f"Message looks like spam (score {spam.score:.1f})", code="550", dsn="5.7.1")
    msg.add_spam_headers(spam, subject_tag=SUBJECT_TAG)
    return None
