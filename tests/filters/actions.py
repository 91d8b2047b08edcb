"""Message hooks driven by an X-Test header, so one filter covers every action."""

from defang import reject

SEEN = []


def filter_begin(msg):
    SEEN.append(("begin", msg.queue_id))


def filter_end(msg):
    what = msg.get_header("X-Test", "")
    if what == "headers":
        msg.add_header("X-Added", "yes")
        msg.insert_header(0, "X-First", "top")
        msg.change_header("Subject", "[tagged] " + msg.subject, 1)
        msg.delete_header("Received")
        msg.add_header("X-Utf8", "Grüße")
        msg.add_header("X-Folded", "one\r\n\ttwo")
    elif what == "envelope":
        msg.add_recipient("archive@example.org")
        msg.add_recipient("bcc@example.org", "NOTIFY=NEVER")
        msg.delete_recipient(msg.recipients[0])
        msg.change_sender("bounces@example.com")
        msg.hold("needs a look")
    elif what == "null-sender":
        msg.change_sender("")
    elif what == "reject-method":
        msg.reject("No thanks", "554", "5.7.0")
    elif what == "tempfail-method":
        msg.tempfail("Later")
    elif what == "discard-method":
        msg.discard()
    elif what == "first-stands":
        msg.reject("first")
        msg.accept()
    elif what == "return-verdict":
        msg.add_header("X-Kept", "1")
        return reject("Returned")
    elif what == "notes":
        msg.add_header("X-Notes", str(msg.conn.notes.get("from_relay")))
        msg.conn.notes["from_end"] = True
    elif what == "bad-header-name":
        msg.add_header("Bad Name", "x")
    elif what == "bad-header-value":
        msg.add_header("X-Bad", "a\nb")
    elif what == "bracket-address":
        msg.add_recipient("<x@example.org>")
    elif what == "bad-index":
        msg.change_header("Subject", "x", 0)
    elif what == "info":
        msg.add_header("X-Info", f"{msg.sender}|{','.join(msg.recipients)}|{msg.size}")
        msg.add_header("X-Esmtp", " ".join(msg.conn.esmtp_args))
        msg.add_header("X-Count", str(len(msg.get_all_headers("received"))))
    return None
