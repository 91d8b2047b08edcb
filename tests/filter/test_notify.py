"""Notices (msg.notify, notify_sender, notify_administrator): composed by the hooks, sent
after the reply, and a failure to send changes nothing."""

from __future__ import annotations

import email
import email.policy
import logging
from dataclasses import replace
from pathlib import Path

import pytest
from test_mime_rewrite import crlf, inline_filter, run
from test_quarantine import fake_sendmail

from defang.cli.trial import Envelope, Trial
from defang.core import config as configmod
from defang.workers.api.notify import MAX_NOTICES
from defang.workers.loader import load_filter
from defang.workers.runner import FilterRunner

MESSAGE = crlf("""
    From: Alice <alice@example.com>
    To: bob@example.org
    Subject: Quarterly figures

    See the figures.
    """)
NOTIFYING = """
    from defang import reject
    def filter_end(msg):
        msg.notify_administrator("Refused: " + msg.subject, "id " + str(msg.queue_id), attach_original=True)
        msg.notify_sender("Your message was refused", "Sorry.")
        return reject("no", "550", "5.7.1")
    """


def runner(tmp_path: Path, code: str, sendmail: Path) -> FilterRunner:
    cfg = replace(configmod.load(None), notify_sendmail_path=sendmail,
                  notify_administrator="admin@example.net", notify_from="defang <postmaster@example.net>")
    return FilterRunner.from_config(load_filter(str(inline_filter(tmp_path, code))), cfg)


def test_notices_are_sent_after_the_reply_with_the_null_sender(tmp_path):
    r = runner(tmp_path, NOTIFYING, fake_sendmail(tmp_path))
    reply = run(r, MESSAGE, tmp_path, queue_id="4NOTE")
    assert reply["verdict"]["code"] == "550"
    assert not (tmp_path / "sendmail.argv").exists(), "not before the reply"
    assert [str(n) for n in r.outbox] == [
        "notice to admin@example.net: Refused: Quarterly figures",
        "notice to alice@example.com: Your message was refused",
    ]
    assert r.send_notices() == 2 and r.outbox == []
    # the fake sendmail keeps the last call: the notice to the sender
    argv = (tmp_path / "sendmail.argv").read_text().splitlines()
    assert argv == ["-i", "-f", "<>", "--", "alice@example.com"]
    notice = email.message_from_bytes((tmp_path / "sendmail.stdin").read_bytes(), policy=email.policy.default)
    assert notice["Auto-Submitted"] == "auto-generated" and notice["X-Defang-Queue-ID"] == "4NOTE"
    assert notice["From"] == "defang <postmaster@example.net>"
    assert notice["Subject"] == "Your message was refused"


def test_the_administrator_s_notice_carries_the_original(tmp_path):
    r = runner(tmp_path, NOTIFYING, fake_sendmail(tmp_path))
    run(r, MESSAGE, tmp_path)
    first = email.message_from_bytes(r.outbox[0].data, policy=email.policy.default)
    (attached,) = [p for p in first.iter_attachments()]
    assert attached.get_content_type() == "message/rfc822"
    assert attached.get_content()["Subject"] == "Quarterly figures"


def test_a_notice_that_cannot_be_sent_is_a_warning_and_nothing_more(tmp_path, caplog):
    r = runner(tmp_path, NOTIFYING, fake_sendmail(tmp_path, exit_code=75))
    reply = run(r, MESSAGE, tmp_path, queue_id="4FAIL")
    with caplog.at_level(logging.WARNING, "defang.worker"):
        assert r.send_notices() == 0
    assert reply["verdict"]["code"] == "550"
    assert caplog.messages[0].startswith("4FAIL: could not send the notice to admin@example.net: Refused: "
                                         "Quarterly figures: ")  # fmt: skip
    assert "exited 75: sendmail: simulated status 75" in caplog.messages[0]


def test_no_notice_to_the_null_sender_and_none_after_a_filter_error(tmp_path, caplog):
    r = runner(tmp_path, """
        def filter_end(msg):
            msg.notify_sender("re", "x")
        """, fake_sendmail(tmp_path))  # fmt: skip
    spool = tmp_path / "m.eml"
    spool.write_bytes(MESSAGE)
    from defang.core import wire

    conn = wire.ConnInfo("c1", "192.0.2.1", "h", 0, "h", {}, {})
    with caplog.at_level(logging.INFO, "defang.filter"):
        r.handle(wire.EndOfMessage(conn, str(spool), "", ["bob@example.org"], "4NULL", len(MESSAGE)))
    assert r.outbox == [] and "4NULL: no notice to the null sender (re)" in caplog.messages
    failing = runner(tmp_path, "def filter_end(msg):\n    msg.notify('a@example.org', 's', 'b')\n    1/0\n",
                     fake_sendmail(tmp_path))  # fmt: skip
    reply = run(failing, MESSAGE, tmp_path)
    assert reply["verdict"]["code"] == "451" and failing.outbox == []


def test_a_trial_shows_notices_and_sends_none(tmp_path):
    sendmail = fake_sendmail(tmp_path)
    f = inline_filter(tmp_path, NOTIFYING)
    t = Trial(replace(configmod.load(None, filter_path=str(f)), notify_sendmail_path=sendmail,
                      notify_administrator="admin@example.net"))  # fmt: skip
    try:
        result = t.run(MESSAGE, Envelope(sender="alice@example.com"))
    finally:
        t.close()
    assert result.notices == ["notice to admin@example.net: Refused: Quarterly figures",
                              "notice to alice@example.com: Your message was refused"]  # fmt: skip
    assert not (tmp_path / "sendmail.argv").exists()


def test_a_filter_cannot_send_more_than_the_cap(tmp_path):
    r = runner(tmp_path, f"""
        def filter_end(msg):
            for i in range({MAX_NOTICES + 1}):
                msg.notify("a@example.org", "n", "b")
        """, fake_sendmail(tmp_path))  # fmt: skip
    reply = run(r, MESSAGE, tmp_path)
    assert reply["verdict"]["code"] == "451"
    assert f"at most {MAX_NOTICES} notices per message" in reply["error"]


@pytest.mark.parametrize("to", ["", "<a@example.org>", "a@example.org\r\nBcc: x@example.org"])
def test_a_bad_recipient_is_the_filter_s_error(tmp_path, to):
    r = runner(tmp_path, f"def filter_end(msg):\n    msg.notify({to!r}, 's', 'b')\n", fake_sendmail(tmp_path))
    assert run(r, MESSAGE, tmp_path)["verdict"]["code"] == "451"
