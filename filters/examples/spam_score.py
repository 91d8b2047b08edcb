"""Spam: tag or reject by SpamAssassin's score, with an allow list honoured first.

Needs [spamassassin] address in defang.toml (spamd).  For each message:

  * from a client or sender on the allow list: accepted as it is, not scanned;
  * score >= REJECT_AT: refused with 550 while the sender is still connected (no
    bounce to a forged address, nothing to delete later);
  * spam below that (SpamAssassin's own required score, 5 by default): delivered with
    "[SPAM] " before the subject, for the users' mail rules;
  * every scanned message gets X-Spam-Status and X-Spam-Score (X-Spam-Flag on spam).

If spamd cannot be asked (down, too slow: [spamassassin] timeout) the message is
delivered unscanned with "X-Spam-Status: No, not scanned: <why>": a spam filter fails
open, a virus filter fails closed (see virus_notify.py).  Messages over [spamassassin]
max_size are not scanned either, as spamc does.
"""

import ipaddress

from defang import accept, reject

REJECT_AT = 10.0
SUBJECT_TAG = "[SPAM] "
ALLOW_CLIENTS = [ipaddress.ip_network(n) for n in ("10.20.0.0/16",)]  # your own networks
ALLOW_SENDERS = {"alerts@partner.example"}


def filter_relay(conn):
    ip = ipaddress.ip_address(conn.ip) if conn.ip else None
    if ip is not None and any(ip in net for net in ALLOW_CLIENTS):
        return accept()
    return None


def filter_sender(conn, sender):
    if sender.lower() in ALLOW_SENDERS:
        return accept()
    return None


def filter_begin(msg):
    msg.start_checks("spamassassin")  # spamd starts while the message hooks go on


def filter_end(msg):
    spam = msg.spamassassin()
    if spam.scanned and spam.score >= REJECT_AT:
        msg.tag("spam_reject")
        return reject(f"Message looks like spam (score {spam.score:.1f})", code="550", dsn="5.7.1")
    if spam.scanned and spam.is_spam:
        msg.tag("spam_tagged")
    msg.add_spam_headers(spam, subject_tag=SUBJECT_TAG)
    return None
