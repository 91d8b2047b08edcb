"""``defang test``'s trial follows the stages and short-cuts the milter would, one by one."""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from defang.cli.trial import Envelope, Trial
from defang.core import config as configmod

MESSAGE = b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n"
# Every hook says where it ran in a header (and refuses nothing), unless the filter's own
# code below it decides.
RECORDING = """
from defang import accept, reject, tempfail, discard

def _seen(conn, what):
    conn.notes.setdefault("seen", []).append(what)

def filter_relay(conn):
    _seen(conn, "connect")
    return CONNECT(conn)

def filter_helo(conn):
    _seen(conn, "helo")
    return HELO(conn)

def filter_sender(conn, sender):
    _seen(conn, "mail")
    return MAIL(conn, sender)

def filter_recipient(conn, rcpt):
    _seen(conn, "rcpt " + rcpt)
    return RCPT(conn, rcpt)

def filter_end(msg):
    msg.add_header("X-Seen", ",".join(msg.conn.notes.get("seen", [])))
    msg.add_header("X-Recipients", ",".join(msg.recipients))
    return END(msg)

CONNECT = HELO = MAIL = RCPT = END = lambda *a: None
"""


def trial(tmp_path: Path, overrides: str = "", **cfg_changes) -> Trial:
    path = tmp_path / "filter.py"
    path.write_text(RECORDING + textwrap.dedent(overrides))
    cfg = replace(configmod.load(None, filter_path=str(path)), **cfg_changes)
    t = Trial(cfg)
    return t


def run(tmp_path: Path, overrides: str = "", env: Envelope | None = None, raw: bytes = MESSAGE, **cfg):
    t = trial(tmp_path, overrides, **cfg)
    try:
        return t.run(raw, env or Envelope(recipients=["a@example.com", "b@example.com"]))
    finally:
        t.close()


def stages(result) -> list[str]:
    return [stage for stage, _ in result.stages]


def headers(result) -> dict[str, str]:
    return {a[1]: a[2] for a in result.actions if a[0] == "add_header"}


def test_without_a_decision_every_stage_is_asked_and_the_message_reaches_end_of_message(tmp_path):
    r = run(tmp_path)
    rcpts = ["rcpt a@example.com", "rcpt b@example.com"]
    assert stages(r) == ["connect", "helo", "mail", *rcpts, "end of message"]
    assert headers(r)["X-Seen"] == "connect,helo,mail,rcpt a@example.com,rcpt b@example.com"
    assert r.outcome["action"] == "continue" and r.exit_code == 0
    assert r.why == "the MTA delivers it to 2 recipients"


def test_accept_at_mail_from_ends_filtering_there(tmp_path):
    r = run(tmp_path, "MAIL = lambda conn, s: accept()\nEND = lambda msg: reject('no')\n")
    assert stages(r) == ["connect", "helo", "mail"]
    assert r.outcome["action"] == "accept" and r.ended == "mail" and r.exit_code == 0
    assert r.actions == []  # filter_end never ran: no header, no reject
    assert "accepted without further filtering at MAIL FROM" in r.why


def test_accept_at_connect_ends_filtering_for_the_connection(tmp_path):
    r = run(tmp_path, "CONNECT = lambda conn: accept()\nMAIL = lambda c, s: reject('no')\n")
    assert stages(r) == ["connect"] and r.outcome["action"] == "accept" and r.exit_code == 0


def test_a_reject_at_helo_ends_the_connection_before_mail_from(tmp_path):
    r = run(tmp_path, "HELO = lambda conn: reject('You are not us', code='550', dsn='5.7.1')\n")
    assert stages(r) == ["connect", "helo"]
    assert r.ended == "helo" and r.exit_code == 1
    assert r.outcome == {"action": "reject", "code": "550", "dsn": "5.7.1", "text": "You are not us"}


def test_a_tempfail_at_mail_from_ends_the_transaction(tmp_path):
    r = run(tmp_path, "MAIL = lambda conn, s: tempfail('later')\n")
    assert stages(r) == ["connect", "helo", "mail"] and r.exit_code == 2


def test_a_refused_recipient_is_not_in_msg_recipients(tmp_path):
    r = run(tmp_path, "RCPT = lambda c, r: reject('no user') if r.startswith('a@') else None\n")
    assert stages(r)[-1] == "end of message"
    assert headers(r)["X-Recipients"] == "b@example.com"
    assert r.recipients == ["b@example.com"] and r.exit_code == 0


def test_no_recipient_left_means_no_data(tmp_path):
    r = run(tmp_path, "RCPT = lambda c, r: reject('no such user', '550', '5.1.1')\nEND = lambda m: 1/0\n")
    assert "end of message" not in stages(r)
    assert r.ended == "rcpt" and r.exit_code == 1 and "refuses DATA" in r.why


def test_no_recipient_left_but_one_deferred_is_a_tempfail_as_the_sender_meets_it(tmp_path):
    # greylisting at RCPT: the MTA still refuses DATA, but the sending MTA retries (exit 2)
    r = run(tmp_path, "RCPT = lambda c, r: tempfail('Greylisted', '451', '4.7.1')\n")
    assert "end of message" not in stages(r)
    assert r.ended == "rcpt" and r.exit_code == 2 and "retries" in r.why
    outcome = (r.outcome["action"], r.outcome["code"], r.outcome["dsn"])
    assert outcome == ("tempfail", "451", "4.7.1"), r.outcome


def test_accept_at_rcpt_accepts_the_message_with_every_recipient_and_asks_nothing_more(tmp_path):
    r = run(tmp_path, "RCPT = lambda c, r: accept()\nEND = lambda m: reject('no')\n")
    assert stages(r) == ["connect", "helo", "mail", "rcpt a@example.com"]
    assert r.recipients == ["a@example.com", "b@example.com"] and r.exit_code == 0


def test_discard_at_rcpt_throws_the_message_away(tmp_path):
    r = run(tmp_path, "RCPT = lambda c, r: discard()\n")
    assert stages(r) == ["connect", "helo", "mail", "rcpt a@example.com"] and r.exit_code == 3


def test_hooks_the_filter_lacks_are_not_stages(tmp_path):
    path = tmp_path / "filter.py"
    path.write_text("def filter_end(msg):\n    msg.add_header('X-A', 'b')\n")
    t = Trial(configmod.load(None, filter_path=str(path)))
    r = t.run(MESSAGE, Envelope())
    t.close()
    assert stages(r) == ["end of message"] and r.actions == [["add_header", "X-A", "b"]]


def test_the_front_end_s_recipient_limit_refuses_the_extra_recipient(tmp_path):
    env = Envelope(recipients=["a@example.com", "b@example.com", "c@example.com"])
    r = run(tmp_path, env=env, max_recipients=2)
    assert r.recipients == ["a@example.com", "b@example.com"]
    assert ("rcpt c@example.com", {"action": "tempfail", "code": "452", "dsn": "4.5.3",
                                   "text": "Too many recipients"}) in r.stages  # fmt: skip


def test_the_front_end_s_size_limit_refuses_at_end_of_message_before_the_filter(tmp_path):
    r = run(tmp_path, "END = lambda m: 1/0\n", max_message_size=40)
    assert r.outcome["code"] == "552" and r.exit_code == 1 and r.error is None


def test_a_filter_error_is_the_configured_tempfail_and_exit_4(tmp_path):
    r = run(tmp_path, "END = lambda m: 1/0\n")
    assert r.outcome["code"] == "451" and r.exit_code == 4
    assert r.error.startswith("filter error in filter_end: ZeroDivisionError")


def test_a_filter_past_busy_timeout_gets_the_internal_error_reply(tmp_path):
    r = run(tmp_path, "import time\nEND = lambda m: time.sleep(30)\n", busy_timeout=1)
    assert r.exit_code == 4 and "busy_timeout" in r.error and r.outcome["code"] == "451"
    assert r.seconds < 10


def test_macros_client_and_esmtp_args_reach_the_filter(tmp_path):
    env = Envelope(ip="2001:db8::5", hostname="mx.example.net", helo="mx.example.net",
                   macros={"{auth_authen}": "alice", "j": "relay.local"}, mail_args=["BODY=8BITMIME"],
                   rcpt_args=["NOTIFY=NEVER"], queue_id="4AbCdE")  # fmt: skip
    r = run(tmp_path, """
        def END(msg):
            c = msg.conn
            msg.add_header("X-Env", f"{c.ip} {c.hostname} {c.helo} {c.macros['{auth_authen}']} "
                                    f"{c.macros['j']} {c.esmtp_args} {msg.queue_id}")
        def RCPT(conn, rcpt):
            conn.notes["rcpt_args"] = conn.rcpt_args
        """, env=env)  # fmt: skip
    expected = "2001:db8::5 mx.example.net mx.example.net alice relay.local ['BODY=8BITMIME'] 4AbCdE"
    assert headers(r)["X-Env"] == expected


def test_a_trial_quarantines_nothing_but_says_it_would(tmp_path):
    runtime = tmp_path / "run"
    r = run(tmp_path, "def END(msg):\n    msg.quarantine('looks odd')\n", runtime_dir=runtime)
    assert r.quarantine == ["looks odd"]
    assert not (runtime / "quarantine").exists()


def test_monitor_mode_stamps_would_instead_of_refusing(tmp_path):
    r = run(tmp_path, "MAIL = lambda c, s: reject('spam source')\n", filter_mode="monitor")
    assert r.outcome["action"] == "continue" and r.exit_code == 0
    assert r.would == ["reject 550 5.7.1 spam source (filter_sender)"]
    assert ["add_header", "X-Defang-Would", "reject 550 5.7.1 spam source (filter_sender)"] in r.actions


def test_a_rewritten_body_is_described_and_saved_on_request(tmp_path):
    raw = (b"From: a@example.org\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
           b"--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n--b\r\nContent-Type: application/octet-stream; "
           b"name=x.exe\r\n\r\nMZ\r\n--b--\r\n")  # fmt: skip
    out = tmp_path / "body"
    path = tmp_path / "filter.py"
    path.write_text("def filter_part(msg, part):\n    if part.filename:\n        part.drop()\n")
    t = Trial(configmod.load(None, filter_path=str(path)))
    r = t.run(raw, Envelope(), body_out=str(out))
    t.close()
    (action,) = [a for a in r.actions if a[0] == "replace_body"]
    assert action[1].startswith(f"{out.stat().st_size} bytes, sha256 ")
    assert b"x.exe" not in out.read_bytes() and b"hi" in out.read_bytes()


@pytest.mark.parametrize("ip", ["300.1.1.1", "mx.example.org", ""])
def test_an_envelope_needs_a_real_ip(ip):
    with pytest.raises(ValueError):
        Envelope(ip=ip)


POLICY = """
def filter_recipient(conn, rcpt):
    if rcpt.startswith("strict"):
        conn.policy("strict")

def filter_end(msg):
    msg.add_header("X-Policy", str(msg.policy))
    msg.add_header("X-Recipients", ",".join(msg.recipients))
"""


def test_a_recipient_of_another_policy_group_gets_452_and_the_verdict_is_for_the_first_group(tmp_path):
    env = Envelope(recipients=["tag@example.com", "strict@example.com", "tag2@example.com"])
    r = run(tmp_path, POLICY, env)
    said = [(stage, v["action"], v["code"]) for stage, v in r.stages if stage.startswith("rcpt")]
    assert said == [("rcpt tag@example.com", "continue", None), ("rcpt strict@example.com", "continue", None),
                    ("rcpt strict@example.com", "tempfail", "452"),
                    ("rcpt tag2@example.com", "continue", None)]
    assert dict(r.stages)["rcpt strict@example.com"]["dsn"] == "4.5.3"  # the last said: the MTA's answer
    assert r.recipients == ["tag@example.com", "tag2@example.com"]
    assert headers(r)["X-Policy"] == "None"
    assert headers(r)["X-Recipients"] == "tag@example.com,tag2@example.com"


def test_the_strict_group_first_gets_its_own_transaction(tmp_path):
    r = run(tmp_path, POLICY, Envelope(recipients=["strict@example.com", "tag@example.com"]))
    assert r.recipients == ["strict@example.com"] and headers(r)["X-Policy"] == "strict"


def test_conn_policy_outside_filter_recipient_is_a_filter_error(tmp_path):
    r = run(tmp_path, "def filter_sender(conn, sender):\n    conn.policy('strict')\n")
    assert r.error and "conn.policy() is for filter_recipient" in r.error and r.ended == "mail"
    r = run(tmp_path, "def filter_recipient(conn, rcpt):\n    conn.policy('')\n")
    assert r.error and "a policy key is a printable string" in r.error


def test_msg_rcpt_args_has_each_recipient_s_esmtp_arguments(tmp_path):
    code = "def filter_end(msg):\n    msg.add_header('X-Args', repr(sorted(msg.rcpt_args.items())))\n"
    env = Envelope(recipients=["a@example.com", "b@example.com"], rcpt_args=["NOTIFY=NEVER"])
    r = run(tmp_path, code, env)
    said = "[('a@example.com', ['NOTIFY=NEVER']), ('b@example.com', ['NOTIFY=NEVER'])]"
    assert headers(r)["X-Args"] == said
