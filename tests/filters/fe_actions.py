"""Front-end test filter: every envelope and message action, keyed on the input."""

import hashlib
import json
import time

from defang import accept, discard, reject, tempfail


def filter_relay(conn):
    conn.notes["relay_ip"] = conn.ip
    if conn.ip == "192.0.2.66":
        return reject("Go away", code="554", dsn="5.7.1")


def filter_sender(conn, sender):
    if sender == "tempfail@example.org":
        return tempfail("Greylisted, come back later", code="450", dsn="4.7.1")


def filter_recipient(conn, recipient):
    conn.notes.setdefault("rcpts", []).append(recipient)
    if recipient.startswith("nobody@"):
        return reject("No such user here", code="550", dsn="5.1.1")
    return None


def filter_end(msg):
    subject = msg.subject
    msg.add_header("X-Relay-Ip", msg.conn.notes.get("relay_ip", "?"))
    msg.add_header("X-Rcpts-Seen", ",".join(msg.conn.notes.get("rcpts", [])))
    if "raise" in subject:
        raise RuntimeError("boom in filter_end")
    if "multiline" in subject:
        return reject("First line\nsecond line\n100% third", code="550", dsn="5.7.1")
    if "discard" in subject:
        return discard()
    if "accept" in subject:
        return accept()
    if "sleep" in subject:
        time.sleep(float(subject.split()[-1]))
    if "rewrite" in subject:
        msg.change_header("Subject", "[rewritten] " + subject)
        msg.delete_header("X-Remove-Me")
        msg.insert_header(0, "X-First", "yes")
        msg.add_recipient("archive@example.org")
        msg.delete_recipient("bob@example.org")
        msg.change_sender("bounces@example.org")
    if "digest" in subject:  # what the worker finds in the spool file
        with open(msg.path, "rb") as f:
            msg.add_header("X-Spool-Digest", hashlib.sha256(f.read()).hexdigest())
    if "macros" in subject:  # what the MTA told us (tests/sendmail)
        msg.add_header("X-Macros", json.dumps(msg.conn.macros, sort_keys=True))
    if "hold" in subject:
        msg.hold("looks odd")
