"""The milter front end driven byte for byte by a fake MTA, with the real daemons.

Real Postfix proves interoperability (tests/postfix/); these show the front
end's own logic quickly: negotiation from the filter's hooks, verdicts and actions on
the wire, limits, and what happens when the multiplexor is not there.
"""

import json
import socket
import struct

import pytest
from daemon import FILTERS, Defang
from fakemta import (
    P_HDR_LEADSPC,
    P_NOBODY,
    P_NOHDRS,
    P_NR_CONN,
    P_NR_HDR,
    P_NR_HELO,
    P_NR_MAIL,
    P_NR_RCPT,
    MilterSession,
)

from defang.core import wire
from defang.core.framing import frame

MSG = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: %s\r\nX-Remove-Me: 1\r\n\r\nHello\r\n"


@pytest.fixture(scope="module")
def defang():
    d = Defang(FILTERS / "fe_actions.py", settings={
        "milter": {"max_recipients": 3, "max_message_size": 4096, "max_headers": 20},
        "multiplexor": {"min_workers": 2, "max_workers": 2, "busy_timeout": 2, "busy_grace": 1},
    }).start()  # fmt: skip
    yield d
    d.stop()
    d.cleanup()


def transaction(d, subject: bytes, rcpts=("bob@example.org",), ip="192.0.2.7", sender="a@example.org"):
    with MilterSession(d.milter_path) as s:
        s.connect(ip=ip)
        s.helo()
        s.mail(sender)
        for r in rcpts:
            s.rcpt(r)
        return s.message(MSG % subject)


def test_negotiation_follows_the_hooks(defang):
    with MilterSession(defang.milter_path) as s:
        # filter_relay, filter_sender, filter_recipient, filter_end are defined
        assert not s.protocol & P_NR_CONN and not s.protocol & P_NR_MAIL and not s.protocol & P_NR_RCPT
        assert s.protocol & P_NR_HELO  # no filter_helo: the MTA need not wait
        assert s.protocol & P_NR_HDR and s.protocol & P_HDR_LEADSPC
        assert not s.protocol & (P_NOHDRS | P_NOBODY)


def test_without_message_hooks_no_headers_or_body_are_asked_for():
    with Defang(FILTERS / "fe_envelope_only.py") as d, MilterSession(d.milter_path) as s:
        assert s.protocol & P_NOHDRS and s.protocol & P_NOBODY
        assert s.protocol & P_NR_CONN and s.protocol & P_NR_MAIL
        assert not s.protocol & P_NR_HELO
        s.connect()
        assert s.helo("bad.example").text == "550 5.7.1 Bad HELO"


def test_rewrite_actions_reach_the_mta(defang):
    r = transaction(defang, b"please rewrite", rcpts=("bob@example.org", "carol@example.org"))
    assert r.reply == "continue"
    assert ("addheader", ("X-Relay-Ip", "192.0.2.7")) in r.actions
    assert ("addheader", ("X-Rcpts-Seen", "bob@example.org,carol@example.org")) in r.actions
    assert ("chgheader", (1, "Subject", "[rewritten] please rewrite")) in r.actions
    assert ("chgheader", (1, "X-Remove-Me", "")) in r.actions  # empty value = delete
    assert ("insheader", (0, "X-First", "yes")) in r.actions
    assert ("addrcpt", ("<archive@example.org>",)) in r.actions
    assert ("delrcpt", ("<bob@example.org>",)) in r.actions
    assert ("chgfrom", ("<bounces@example.org>", "")) in r.actions


def test_hold_uses_the_mta_quarantine(defang):
    r = transaction(defang, b"hold me")
    assert ("quarantine", ("looks odd",)) in r.actions


def test_verdicts(defang):
    assert transaction(defang, b"discard").reply == "discard"
    assert transaction(defang, b"accept").reply == "accept"
    r = transaction(defang, b"multiline")
    assert r.reply == "reply"
    # libmilter requires '%' doubled and sends it doubled; the MTA undoes it (checked
    # end to end through Postfix in test_postfix_actions.py)
    assert r.text == "550-5.7.1 First line\r\n550-5.7.1 second line\r\n550 5.7.1 100%% third"


def test_connect_reject_and_per_recipient_reject(defang):
    with MilterSession(defang.milter_path) as s:
        assert s.connect(ip="192.0.2.66").text == "554 5.7.1 Go away"
    with MilterSession(defang.milter_path) as s:
        s.connect()
        s.helo()
        assert s.mail("tempfail@example.org").text == "450 4.7.1 Greylisted, come back later"
        assert s.mail("a@example.org").reply == "continue"
        assert s.rcpt("nobody@example.org").text == "550 5.1.1 No such user here"
        assert s.rcpt("bob@example.org").reply == "continue"
        r = s.message(MSG % b"hello")
        # the rejected recipient never reached the filter's message view
        assert ("addheader", ("X-Rcpts-Seen", "nobody@example.org,bob@example.org")) in r.actions


def test_filter_exception_is_a_tempfail_with_traceback_logged(defang):
    r = transaction(defang, b"please raise")
    assert r.reply == "reply" and r.text.startswith("451 4.3.0 ")
    log = defang.wait_log("boom in filter_end")
    assert "TESTQ1" in log and "Traceback" in log


def test_too_many_recipients(defang):
    with MilterSession(defang.milter_path) as s:
        s.connect()
        s.helo()
        s.mail("a@example.org")
        for i in range(3):
            assert s.rcpt(f"u{i}@example.org").reply == "continue"
        assert s.rcpt("u4@example.org").text == "452 4.5.3 Too many recipients"


def test_message_and_header_limits(defang):
    with MilterSession(defang.milter_path) as s:
        s.connect()
        s.helo()
        s.mail("a@example.org")
        s.rcpt("bob@example.org")
        r = s.message(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 100)
        assert r.text == "552 5.3.4 Message size exceeds limit"
        s.mail("a@example.org")
        s.rcpt("bob@example.org")
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(25))
        assert s.message(many + b"\r\nbody\r\n").text == "552 5.3.4 Message header exceeds limit"
        # the connection goes on: the next message is judged normally
        s.mail("a@example.org")
        s.rcpt("bob@example.org")
        assert s.message(MSG % b"ok").reply == "continue"


def test_spool_files_are_reused_while_mail_flows_and_removed_when_idle(defang):
    import time

    spool = defang.runtime / "spool"
    with MilterSession(defang.milter_path) as other:  # a transaction under way elsewhere
        other.connect()
        other.helo()
        other.mail("a@example.org")
        assert transaction(defang, b"first").reply == "continue"
        (kept,) = spool.iterdir()
        assert kept.stat().st_mode & 0o777 == 0o600  # kept for the next message, private
        assert transaction(defang, b"second").reply == "continue"
        assert list(spool.iterdir()) == [kept]
        # a reply with an error: a worker may still hold the file, so it is not reused
        assert transaction(defang, b"please raise").text.startswith("451 4.3.0 ")
        assert list(spool.iterdir()) == []
        assert transaction(defang, b"third").reply == "continue"
        assert len(list(spool.iterdir())) == 1
    deadline = time.monotonic() + 5
    while list(spool.iterdir()) and time.monotonic() < deadline:  # no transaction left
        time.sleep(0.05)
    assert list(spool.iterdir()) == []


def test_a_reused_spool_file_holds_exactly_the_next_message(defang):
    """A free spool file keeps its last message's bytes to be written over: a shorter
    message after a longer one must not see the longer one's tail."""
    import hashlib

    def message(subject: bytes, body_lines: int) -> bytes:
        return (b"From: a@example.org\r\nSubject: digest %s\r\n\r\n" % subject
                + b"".join(b"line %d of the body\r\n" % i for i in range(body_lines)))  # fmt: skip

    spool = defang.runtime / "spool"
    with MilterSession(defang.milter_path) as other:  # keeps the spool files in use
        other.connect()
        other.helo()
        other.mail("a@example.org")
        for subject, lines in ((b"long", 150), (b"short", 3), (b"middle", 40), (b"empty", 0)):
            raw = message(subject, lines)
            with MilterSession(defang.milter_path) as s:
                s.connect()
                s.helo()
                s.mail("a@example.org")
                s.rcpt("bob@example.org")
                r = s.message(raw)
            assert ("addheader", ("X-Spool-Digest", hashlib.sha256(raw).hexdigest())) in r.actions, subject
            assert len(list(spool.iterdir())) == 1  # one file, used for each in turn


def test_hung_worker_is_a_tempfail_within_busy_timeout_and_is_replaced(defang):
    r = transaction(defang, b"sleep 30")
    assert r.reply == "reply" and r.text.startswith("451 4.3.0")
    defang.wait_log("past busy_timeout")
    defang.wait_log("killed by signal SIGTERM")
    assert transaction(defang, b"after the hang").reply == "continue"


def test_garbage_on_the_multiplexor_socket_closes_only_that_connection(defang):
    path = str(defang.runtime / "multiplexor.sock")
    for garbage in (b"GET / HTTP/1.0\r\n\r\n", struct.pack(">I", 5) + b"\xff\xfe{[}",
                    frame(json.dumps({"v": wire.VERSION, "op": "format_disk"}).encode())):  # fmt: skip
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(garbage)
            assert sock.recv(100) == b""  # closed on us
    assert "protocol error from milter client" in defang.log()
    assert transaction(defang, b"still fine").reply == "continue"


def test_garbage_on_the_control_and_milter_sockets_closes_only_that_connection(defang):
    control = str(defang.runtime / "control.sock")
    for garbage in (b"\x00\x00", struct.pack(">I", 64 << 20) + b"x", struct.pack(">I", 9) + b"not json!"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(control)
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)  # a truncated frame: the peer is gone
            answer = sock.recv(65536)
            assert answer == b"" or b'"ok":false' in answer, answer  # closed, or told why
    assert "protocol error from control client" in defang.log()
    assert defang.ctl("status").returncode == 0
    milters = defang.pids("defang-milter")
    for garbage in (b"GET / HTTP/1.0\r\n\r\n", struct.pack(">I", 1 << 30) + b"O", b"\x00\x00\x00\x01"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(15)
            sock.connect(defang.milter_path)
            sock.sendall(garbage)
            sock.shutdown(socket.SHUT_WR)
            try:
                while sock.recv(65536):  # libmilter ends the session (closed or reset), nothing else
                    pass
            except ConnectionResetError:
                pass
    assert defang.pids("defang-milter") == milters
    assert transaction(defang, b"still fine").reply == "continue"


def test_multiplexor_gone_gives_tempfail_then_the_supervisor_restarts_it():
    import os
    import signal
    import time

    with Defang(FILTERS / "fe_actions.py", settings={"milter": {"request_timeout": 2}}) as d:
        for pid in d.pids("defang-multiplexor"):
            os.kill(pid, signal.SIGKILL)
        with MilterSession(d.milter_path) as s:
            r = s.connect()  # filter_relay is defined: the first decision is at connect
            assert r.reply == "reply" and r.text.startswith("451 4.3.0"), r
        assert "no decision from the multiplexor" in d.log()
        d.wait_log("multiplexor restarted")
        deadline = time.monotonic() + 20
        while transaction(d, b"hello").reply != "continue":
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.2)


def test_multiplexor_not_answering_in_time_gives_tempfail():
    import os
    import signal
    import time

    with Defang(FILTERS / "fe_actions.py", settings={"milter": {"request_timeout": 2}}) as d:
        mx = d.pids("defang-multiplexor")[0]
        os.kill(mx, signal.SIGSTOP)  # alive, connected, silent: as if wedged
        try:
            with MilterSession(d.milter_path) as s:
                start = time.monotonic()
                r = s.connect()
                waited = time.monotonic() - start
        finally:
            os.kill(mx, signal.SIGCONT)
        assert r.reply == "reply" and r.text.startswith("451 4.3.0"), r
        assert waited < 10, waited  # request_timeout 2s, not libmilter's or the MTA's
        assert "no answer in time" in d.log()


# -- what the MTA sends that is odd (issue 25, item 11): every stage answered, one log line each


def warnings_naming(d, text: str) -> list[str]:
    return [x for x in d.log().splitlines() if " WARNING: " in x and text in x]


def connect_payload(hostname: bytes, ip: str = "192.0.2.7", port: int = 40000) -> bytes:
    return hostname + b"\0" + b"4" + struct.pack(">H", port) + ip.encode() + b"\0"


def test_ten_thousand_recipients_over_the_limit_make_one_log_line(defang):
    import time

    sender = f"many-{time.monotonic_ns()}@example.org"
    with MilterSession(defang.milter_path) as s:
        s.connect()
        s.helo()
        s.mail(sender)
        replies = [s.rcpt(f"u{i}@example.org") for i in range(10_000)]
        assert [r.reply for r in replies[:3]] == ["continue"] * 3  # max_recipients 3
        assert {r.text for r in replies[3:]} == {"452 4.5.3 Too many recipients"}
        assert s.message(MSG % b"many").reply == "continue"
    defang.wait_log(f"from=<{sender}> over max_recipients")
    (line,) = [x for x in defang.log().splitlines() if "max_recipients" in x and sender in x]
    assert "9997 recipient(s) of" in line and "over max_recipients 3 refused" in line
    conn = line.split("conn ", 1)[1].split(":", 1)[0]
    assert len(warnings_naming(defang, f"conn {conn}:")) == 1


def test_macros_that_are_not_utf8_are_taken_and_logged_once(defang):
    with MilterSession(defang.milter_path) as s:
        s.macros(b"C", j="mx.test", daemon_name=b"mx-\xff-1")
        r = s.stage(b"C", connect_payload(b"client.example"))
        assert r.reply == "continue", r  # filter_relay decided: not pymilter's 451 for the connection
        s.helo()
        s.mail("a@example.org")
        s.rcpt("bob@example.org")
        r = s.message(MSG % b"odd macros", queue_id=b"Q\xfe1")
    assert r.reply == "continue" and ("addheader", ("X-Relay-Ip", "192.0.2.7")) in r.actions, r
    # asked at connect, MAIL, RCPT and end of message: logged once, with the bytes and the connection
    (line,) = warnings_naming(defang, "macro {daemon_name} is not UTF-8 (b'mx-\\xff-1')")
    assert "conn " in line and "passed on as 'mx-\\\\xff-1'" in line
    assert len(warnings_naming(defang, "macro i is not UTF-8 (b'Q\\xfe1')")) == 1
    assert "Q\\xfe1: conn " in defang.log()  # the verdict line names the queue ID, escaped


def test_a_header_name_that_is_not_utf8_is_logged_and_end_of_message_answered():
    """pymilter cannot hand such a name to Python; the message is judged without that field
    (its digest below), and end of message gets its answer, never the MTA's timeout."""
    import hashlib

    with Defang(FILTERS / "fe_actions.py") as d:  # P_NR_HDR: the MTA waits for no header reply
        with MilterSession(d.milter_path) as s:
            assert s.protocol & P_NR_HDR
            s.connect()
            s.helo()
            s.mail("a@example.org")
            s.rcpt("bob@example.org")
            r = s.message(b"From: a@example.org\r\nX-\xe9t\xe9: v\r\nSubject: digest\r\n\r\nHello\r\n")
            assert r.reply == "continue", r
            seen = b"From: a@example.org\r\nSubject: digest\r\n\r\nHello\r\n"
            assert ("addheader", ("X-Spool-Digest", hashlib.sha256(seen).hexdigest())) in r.actions
            assert s.mail("a@example.org").reply == "continue"  # the connection goes on
        (line,) = warnings_naming(d, "header name that is not UTF-8 (b'X-\\xe9t\\xe9')")
        assert "conn " in line and "without that header" in line
        assert "Traceback" not in d.log()


def test_a_helo_and_host_name_not_utf8_are_kept_and_the_connect_decision_still_asked(defang):
    with MilterSession(defang.milter_path) as s:
        # 192.0.2.66: filter_relay rejects.  The host name never reached filter_relay at
        # connect (pymilter's C code cannot make it a str); it is asked at RCPT TO instead
        s.macros(b"C", j="mx.test", client_addr="192.0.2.66")
        assert s.stage(b"C", connect_payload(b"host-\xe9.example", ip="192.0.2.66")).reply == "continue"
        s.stage(b"H", b"helo-\xe9.example\0")
        s.mail("a@example.org")
        assert s.rcpt("bob@example.org").text == "554 5.7.1 Go away"
        assert s.rcpt("carol@example.org").text == "554 5.7.1 Go away"  # the refusal stands
    assert len(warnings_naming(defang, "client host name that is not UTF-8 (b'host-\\xe9.example')")) == 1
    assert len(warnings_naming(defang, "HELO name that is not UTF-8 (b'helo-\\xe9.example')")) == 1
    with MilterSession(defang.milter_path) as s:  # the same for a client filter_relay lets in
        s.macros(b"C", j="mx.test", client_addr="192.0.2.8")
        s.stage(b"C", connect_payload(b"host-\xe9.example", ip="192.0.2.8"))
        s.helo()
        s.mail("a@example.org")
        assert s.rcpt("bob@example.org").reply == "continue"
        r = s.message(MSG % b"after an odd host name")
        assert r.reply == "continue" and ("addheader", ("X-Relay-Ip", "192.0.2.8")) in r.actions


def test_the_next_smtp_session_on_a_reused_milter_connection_is_judged_byte_for_byte(defang):
    """QUIT_NC ("K") after end of message: the MTA keeps its milter connection for the next
    SMTP session, with no new negotiation, and pymilter starts that session afresh at
    connect.  The header bytes must still be written as negotiated (leading space)."""
    import hashlib

    from fakemta import encode_command

    raw = b"From: a@example.org\r\nSubject: digest reused\r\n\r\nHello\r\n"
    with MilterSession(defang.milter_path) as s:
        assert s.protocol & P_HDR_LEADSPC
        s.connect()
        s.helo()
        s.mail("a@example.org")
        s.rcpt("bob@example.org")
        assert s.message(MSG % b"first session").reply == "continue"
        s.sock.sendall(encode_command(b"K"))
        assert s.connect(ip="192.0.2.9").reply == "continue"
        s.helo()
        assert s.mail("a@example.org").reply == "continue"
        assert s.rcpt("bob@example.org").reply == "continue"
        r = s.message(raw)
    assert ("addheader", ("X-Relay-Ip", "192.0.2.9")) in r.actions, r
    assert ("addheader", ("X-Spool-Digest", hashlib.sha256(raw).hexdigest())) in r.actions, r
    assert "AttributeError" not in defang.log()
