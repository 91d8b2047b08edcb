"""Envelope hooks: verdicts chosen by the connection data, notes carried along."""

from defang import accept, discard, reject, tempfail


def filter_relay(conn):
    conn.notes["relay"] = [conn.ip, conn.hostname, conn.port]
    if conn.ip == "192.0.2.66":
        return reject("No mail from you", "554", "5.7.1")
    return None


def filter_helo(conn):
    conn.notes["helo"] = conn.helo
    if conn.helo == "bad.example":
        return tempfail("Slow down")
    return None


def filter_sender(conn, sender):
    conn.notes["sender"] = sender
    conn.notes["esmtp"] = conn.esmtp_args
    conn.notes["auth"] = conn.macros.get("{auth_authen}")
    if sender == "spammer@example.com":
        return reject("Go away")
    if sender == "friend@example.com":
        return accept()
    return None


def filter_recipient(conn, recipient):
    conn.notes.setdefault("rcpts", []).append(recipient)
    conn.notes["rcpt_args"] = conn.rcpt_args
    if recipient == "nobody@example.org":
        return reject("No such user", "550", "5.1.1")
    if recipient == "trash@example.org":
        return discard()
    return None
