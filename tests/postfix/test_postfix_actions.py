"""Every verdict and action, through a real Postfix, checked at the client and the sink."""

import subprocess
import time

import pytest
from daemon import FILTERS, Defang
from mta import Stack, headers_of, needs_postfix

pytestmark = [pytest.mark.integration, needs_postfix]

MSG = (b"From: Alice <alice@example.org>\r\nTo: bob@example.org\r\nSubject: %s\r\n"
       b"Message-ID: <%s@example.org>\r\nX-Remove-Me: 1\r\n\r\nHello Bob\r\n")  # fmt: skip


def msg(subject: str) -> bytes:
    return MSG % (subject.encode(), str(time.monotonic_ns()).encode())


@pytest.fixture(scope="module")
def stack():
    s = Stack(FILTERS / "fe_actions.py",
              settings={"multiplexor": {"min_workers": 2, "max_workers": 3}}).start()  # fmt: skip
    yield s
    s.stop()


def arrived(stack, subject_part: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for m in stack.sink.messages():
            if subject_part.encode() in m.raw:
                return m
        time.sleep(0.05)
    raise AssertionError(f"no message with {subject_part!r} reached the sink")


def test_accept_with_headers_added(stack):
    r = stack.send(msg("plain one"))
    assert r.data[0] == 250, r
    m = arrived(stack, "plain one")
    h = headers_of(m.raw)
    assert ("X-Relay-Ip", "127.0.0.1") in h
    assert ("X-Rcpts-Seen", "bob@example.org") in h  # notes carried from RCPT to end of data
    assert m.rcpts == ["bob@example.org"] and m.mail_from == "alice@example.org"


def test_rewrite_headers_recipients_and_sender(stack):
    r = stack.send(msg("please rewrite"), rcpts=("bob@example.org", "carol@example.org"))
    assert r.data[0] == 250, r
    m = arrived(stack, "[rewritten] please rewrite")
    h = headers_of(m.raw)
    names = [n for n, _ in h]
    assert names[0] == "X-First"  # inserted at index 0: above Postfix's own Received
    assert ("Subject", "[rewritten] please rewrite") in h
    assert "X-Remove-Me" not in names
    assert sorted(m.rcpts) == ["archive@example.org", "carol@example.org"]  # bob deleted
    assert m.mail_from == "bounces@example.org"


def test_reject_with_multiline_text_and_percent(stack):
    r = stack.send(msg("multiline"))
    assert r.data[0] == 550
    assert r.data[1] == "5.7.1 First line\n5.7.1 second line\n5.7.1 100% third"


def test_tempfail_with_custom_code_at_mail_from(stack):
    r = stack.send(msg("x"), sender="tempfail@example.org")
    assert r.mail == (450, "4.7.1 Greylisted, come back later")
    assert r.data is None


def test_per_recipient_reject(stack):
    r = stack.send(msg("per recipient"), rcpts=("nobody@example.org", "bob@example.org"))
    assert r.rcpts["nobody@example.org"] == (550, "5.1.1 No such user here")
    assert r.rcpts["bob@example.org"][0] == 250
    assert r.data[0] == 250
    m = arrived(stack, "per recipient")
    assert m.rcpts == ["bob@example.org"]


def test_discard_is_accepted_but_never_delivered(stack):
    r = stack.send(msg("discard me"))
    assert r.data[0] == 250
    stack.send(msg("the next one"))
    arrived(stack, "the next one")  # sent after it: the discarded one would be here by now
    assert not [m for m in stack.sink.messages() if b"discard me" in m.raw]
    assert "discard" in stack.postfix.log_text()


def test_hold_puts_the_message_in_the_hold_queue(stack):
    r = stack.send(msg("hold me"))
    assert r.data[0] == 250
    deadline = time.monotonic() + 10
    while not any(e.get("queue_id") == r.queue_id for e in stack.postfix.hold_queue()):
        assert time.monotonic() < deadline, stack.postfix.queue()
        time.sleep(0.1)
    deadline = time.monotonic() + 10
    want = f"{r.queue_id}: milter-hold: END-OF-MESSAGE"  # Postfix does not log the reason
    while want not in stack.postfix.log_text():  # postlogd writes a moment later
        assert time.monotonic() < deadline, stack.postfix.log_text()[-2000:]
        time.sleep(0.1)
    stack.postfix.delete_queue("ALL")


def test_filter_exception_tempfails_and_logs_traceback_with_queue_id(stack):
    r = stack.send(msg("please raise"))
    assert r.data == (451, "4.3.0 Temporary filter error, try again later")
    log = stack.defang.wait_log("boom in filter_end")
    line = next(x for x in log.splitlines() if "filter error in filter_end" in x)
    # the client sees no queue ID on a 4xx; Postfix's log names it on its milter-reject line
    deadline = time.monotonic() + 10
    while not (pf := [x for x in stack.postfix.log_text().splitlines()
                      if "milter-reject: END-OF-MESSAGE" in x and "Temporary filter error" in x]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    queue_id = pf[-1].split("]: ", 1)[1].split(":", 1)[0]
    assert queue_id in line


def test_connect_level_reject_and_accept(stack):
    r = stack.send(msg("accept me"))
    assert r.data[0] == 250
    m = arrived(stack, "accept me")
    # accept() ends filtering: the headers filter_end added before returning stay
    assert ("X-Relay-Ip", "127.0.0.1") in headers_of(m.raw)


def test_filter_without_message_hooks_only_negotiates_envelope():
    with Stack(FILTERS / "fe_envelope_only.py") as s:
        r = s.send(msg("envelope only"), helo="bad.example")
        assert r.mail[0] == 550 and "Bad HELO" in r.mail[1]
        r = s.send(msg("envelope only"))
        assert r.data[0] == 250
        arrived(s, "envelope only")
        assert "no-headers, no-body" in s.defang.log()


@pytest.mark.parametrize("source, error", [
    ("import os\n\ndef filter_end(msg)\n    pass\n", ":3: SyntaxError"),
    ("import no_such_module_here\n", ":1: ModuleNotFoundError"),
])  # fmt: skip
def test_filter_that_does_not_import_stops_defang_run_with_file_and_line(tmp_path, source, error):
    bad = tmp_path / "filter.py"
    bad.write_text(source)
    d = Defang(bad)
    try:
        proc = subprocess.run(d.argv(), capture_output=True, text=True, timeout=60)
    finally:
        d.cleanup()
    assert proc.returncode == 1
    assert f"{bad}{error}" in proc.stderr


def test_defang_down_means_tempfail_at_the_client():
    with Stack(FILTERS / "fe_actions.py") as s:
        s.defang.stop()
        r = s.send(msg("while down"))
        assert r.mail[0] == 451 or (r.data and r.data[0] == 451), r
        assert not [m for m in s.sink.messages() if b"while down" in m.raw]


def test_inet_milter_socket_sets_nodelay_and_answers_data():
    """Over TCP the front end turns Nagle off and answers DATA (bench/profiles/inet-milter-stall.md)."""
    from defang.testbed.ports import free_port

    port = free_port()
    s = Stack(FILTERS / "fe_actions.py")
    s.defang.socket_spec = f"inet:{port}@127.0.0.1"
    s.postfix.milter = f"inet:127.0.0.1:{port}"
    with s:
        r = s.send(msg("over tcp"))
        assert r.data[0] == 250, r
        m = arrived(s, "over tcp")
        assert ("X-Relay-Ip", "127.0.0.1") in headers_of(m.raw)
        log = s.defang.log()
        assert f"TCP_NODELAY set on the milter listener inet:{port}@127.0.0.1" in log
        negotiated = next(x for x in log.splitlines() if "negotiated with the MTA" in x)
        assert "no-data" not in negotiated
