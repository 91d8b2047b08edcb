"""Every verdict and action through a real Sendmail (Debian's 8.17, unpacked by
scripts/bootstrap), with the milter lines of etc/sendmail.mc.snippet: checked at the
client, at the sink and in Sendmail's queue, like tests/postfix/test_postfix_actions.py.

Sendmail-only differences these tests pin (docs/running.md, "Sendmail"):
Sendmail puts the address in front of a reply to MAIL FROM or RCPT TO
("<bob@example.org>... No such user here"); a hold is Sendmail's quarantine, which keeps
the reason; with F=T an unreachable defang is "451 4.3.2 Please try again later" at MAIL
FROM (or at end of data, when it went away during the message).
"""

import json
import os
import re
import signal
import subprocess

import pytest
from daemon import FILTERS
from mta import (
    SendmailStack,
    delivered,
    headers_of,
    hold_message,
    needs_sendmail,
    resend_until_accepted,
    wait_for,
)
from mta import fe_message as msg  # the Subject says what fe_actions.py does

pytestmark = [pytest.mark.integration, needs_sendmail]

POOL = {"multiplexor": {"min_workers": 2, "max_workers": 2, "min_spare": 0}}


@pytest.fixture(scope="module")
def stack():
    s = SendmailStack(FILTERS / "fe_actions.py",
                      settings={"multiplexor": {"min_workers": 2, "max_workers": 3}}).start()  # fmt: skip
    yield s
    s.stop()


def test_accept_with_headers_added_and_sendmails_queue_id_in_defangs_log(stack):
    r = stack.send(msg("plain one"))
    assert r.data[0] == 250 and r.queue_id, r
    m = stack.arrived(b"plain one")
    h = headers_of(m.raw)
    assert ("X-Relay-Ip", "127.0.0.1") in h
    assert ("X-Rcpts-Seen", "bob@example.org") in h  # notes carried from RCPT to end of data
    assert m.rcpts == ["bob@example.org"] and m.mail_from == "alice@example.org"
    assert [n for n, _ in h][:1] == ["Received"] and f"with ESMTP id {r.queue_id}" in h[0][1]
    # Sendmail's {i} reaches defang: its per-message line names the ID the client was given
    log = stack.defang.wait_log(f"{r.queue_id}: conn ")
    line = message_line(log, r.queue_id)
    assert f" qid={r.queue_id} " in line and " verdict=accept actions=add_header:2 " in line, line


def test_rewrite_headers_recipients_and_sender(stack):
    r = stack.send(msg("please rewrite"), rcpts=("bob@example.org", "carol@example.org"))
    assert r.data[0] == 250, r
    m = stack.arrived(b"[rewritten] please rewrite")
    h = headers_of(m.raw)
    names = [n for n, _ in h]
    assert names[:2] == ["X-First", "Received"]  # inserted at index 0: above Sendmail's own Received
    assert ("Subject", "[rewritten] please rewrite") in h
    assert "X-Remove-Me" not in names
    assert sorted(m.rcpts) == ["archive@example.org", "carol@example.org"]  # bob deleted
    assert m.mail_from == "bounces@example.org"


def test_the_snippets_macros_reach_the_filter(stack):
    r = stack.send(msg("show macros"))
    assert r.data[0] == 250, r
    m = stack.arrived(b"show macros")
    macros = json.loads(dict(headers_of(m.raw))["X-Macros"])
    assert macros["i"] == r.queue_id
    assert macros["j"] == "testbed.defang.invalid"
    assert macros["client_addr"] == "127.0.0.1" and macros["client_port"].isdigit()
    assert macros["daemon_name"] == "MTA" and macros["daemon_port"] == str(stack.sendmail.smtp_port)
    assert macros["daemon_addr"] == "127.0.0.1"
    assert "if_addr" not in macros  # Sendmail leaves it unset on the loopback net
    assert macros["_"] == "localhost [127.0.0.1]" and macros["client_name"] == "localhost"
    assert macros["mail_mailer"] == "esmtp"


def test_reject_with_multiline_text_and_percent(stack):
    r = stack.send(msg("multiline"))
    assert r.data == (550, "5.7.1 First line\n5.7.1 second line\n5.7.1 100% third")
    assert not [m for m in stack.sink.messages() if b"multiline" in m.raw]


def test_tempfail_at_mail_from_names_the_address(stack):
    r = stack.send(msg("x"), sender="tempfail@example.org")
    assert r.mail == (450, "4.7.1 <tempfail@example.org>... Greylisted, come back later")
    assert r.data is None


def test_per_recipient_reject(stack):
    r = stack.send(msg("per recipient"), rcpts=("nobody@example.org", "bob@example.org"))
    assert r.rcpts["nobody@example.org"] == (550, "5.1.1 <nobody@example.org>... No such user here")
    assert r.rcpts["bob@example.org"][0] == 250
    assert r.data[0] == 250
    m = stack.arrived(b"per recipient")
    assert m.rcpts == ["bob@example.org"]


def test_discard_is_accepted_but_never_delivered(stack):
    r = stack.send(msg("discard me"))
    assert r.data[0] == 250
    stack.send(msg("the next one"))
    stack.arrived(b"the next one")  # sent after it: the discarded one would be here by now
    assert not [m for m in stack.sink.messages() if b"discard me" in m.raw]
    assert r.queue_id not in {e["queue_id"] for e in stack.sendmail.queue()}


def test_hold_is_sendmails_quarantine_with_the_reason(stack):
    r = stack.send(msg("hold me"))
    assert r.data[0] == 250, r
    (held,) = wait_for("the held message",
                       lambda: [e for e in stack.sendmail.held() if e["queue_id"] == r.queue_id])  # fmt: skip
    assert held["reason"] == "looks odd"  # Postfix's hold queue keeps no reason; Sendmail's does
    assert held["sender"] == "alice@example.org" and held["recipients"] == ["bob@example.org"]
    assert not [m for m in stack.sink.messages() if b"hold me" in m.raw]
    # released as docs/running.md says; the next queue run (-q5s) delivers it
    subprocess.run(stack.sendmail.command("-qQ", f"-qI{r.queue_id}", "-Q"), check=True, timeout=60)
    assert not stack.sendmail.held()
    stack.arrived(b"hold me", timeout=30)


def test_accept_ends_filtering_and_keeps_the_headers_added_before(stack):
    r = stack.send(msg("accept me"))
    assert r.data[0] == 250
    m = stack.arrived(b"accept me")
    assert ("X-Relay-Ip", "127.0.0.1") in headers_of(m.raw)


def test_filter_exception_tempfails_and_logs_the_queue_id(stack):
    r = stack.send(msg("please raise"))
    assert r.data == (451, "4.3.0 Temporary filter error, try again later")
    log = stack.defang.wait_log("boom in filter_end")
    line = next(x for x in log.splitlines() if "filter error in filter_end" in x)
    qid = line.split("(queue ", 1)[1].split(",", 1)[0]
    assert len(qid) == 14  # Sendmail's ID: not "-", it came with MAIL FROM's macros
    line = message_line(stack.defang.wait_log(f"{qid}: conn "), qid)
    assert " verdict=tempfail code=451 dsn=4.3.0 " in line, line


def message_line(log: str, qid: str) -> str:
    """defang's one line for the message (docs/observing.md), as the milter logs it."""
    return next(x for x in log.splitlines() if re.search(rf"{qid}: conn \S+: message ", x))


def wait_back(stack) -> None:
    """After ``defang.start()`` again: until the new instance says it runs."""
    wait_for("defang running again", lambda: stack.defang.log().count("defang running") == 2, timeout=30)


def test_F_T_defang_down_is_a_tempfail_and_nothing_is_lost():
    with SendmailStack(FILTERS / "fe_actions.py") as s:
        s.defang.stop()
        data = msg("while down")
        r = s.send(data)
        assert r.mail == (451, "4.3.2 Please try again later") and r.data is None
        assert s.sendmail.queue() == [] and s.sink.count() == 0
        s.defang.start()
        wait_back(s)
        r = s.send(data)  # the client's retry
        assert r.data[0] == 250, r
        m = s.arrived(b"while down")
        assert ("X-Relay-Ip", "127.0.0.1") in headers_of(m.raw)  # filtered this time
        assert s.sink.count() == 1


def test_F_T_milter_killed_mid_message_is_a_tempfail_and_the_retry_arrives_once():
    with SendmailStack(FILTERS / "pool_control.py", settings=POOL) as s:
        (old,) = s.defang.pids("defang-milter")
        hold, data, mid, th, out, _ = hold_message(s, "milter-killed")
        os.kill(old, signal.SIGKILL)
        th.join(60)
        assert out["result"].data == (451, "4.3.2 Please try again later"), out
        hold.unlink()
        assert s.sendmail.queue() == [] and not delivered(s, mid)
        wait_for("a new milter", lambda: [p for p in s.defang.pids("defang-milter") if p != old], timeout=30)
        retry = resend_until_accepted(s, data)
        wait_for("the retry at the sink", lambda: delivered(s, mid))
        s.sendmail.wait_queue_empty()
        assert len(delivered(s, mid)) == 1 and retry.queue_id in s.defang.log()


def test_without_F_T_sendmail_delivers_unfiltered_mail_when_defang_is_down():
    """Why the snippet says F=T: Sendmail's default for an unreachable milter is to go on."""
    with SendmailStack(FILTERS / "fe_actions.py", milter_flags="") as s:
        s.defang.stop()
        r = s.send(msg("unfiltered"))
        assert r.data[0] == 250, r
        m = s.arrived(b"unfiltered")
        assert "X-Relay-Ip" not in dict(headers_of(m.raw))


def test_an_eight_bit_header_name_through_sendmail(stack):
    """Sendmail itself ends the header section at such a line, so defang sees it as body
    (the fake MTA's tests in tests/daemons/test_frontend.py send it as a header)."""
    data = msg("eight-bit name").replace(b"X-Remove-Me: 1", b"X-\xe9t\xe9: 1")
    r = stack.send(data)
    assert r.data[0] == 250, r
    m = stack.arrived(b"eight-bit name")
    head, body = m.raw.split(b"\r\n\r\n", 1)
    assert b"\xe9" not in head and b"X-Relay-Ip: 127.0.0.1" in head
    assert body == b"X-\xe9t\xe9: 1\r\n\r\nHello Bob\r\n"
    assert "not UTF-8" not in stack.defang.log()
