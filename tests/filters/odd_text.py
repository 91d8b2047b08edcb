"""Copies text from the message into tags, headers and a monitored reply, as filters do
(tests/postfix/test_postfix_odd_text.py): none of it may tempfail the message."""

from defang import reject


def filter_end(msg):
    msg.tag(msg.get_header("X-Kind") or "none")  # message/partial: a '/' in a tag
    msg.add_header("X-Original-Subject", msg.subject)  # decoded: CR LF inside
    msg.change_header("Subject", "[scanned] " + msg.subject)
    msg.add_header("X-Virus Name", "none found")  # a space in a header name
    msg.quarantine("subject " + msg.subject)
    return reject("two\nlines: " + msg.subject, monitor=True)
