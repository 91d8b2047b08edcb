"""Spam and virus verdicts through a real Postfix, real defang, real spamd and clamd.

The filter is the two scanner examples chained (tests/filters/scanning_chain.py):
filters/examples/virus_notify.py (a virus is refused, the administrator told; an
unscanned message is tempfailed) then filters/examples/spam_score.py (GTUBE's score is
refused; the rest delivered with X-Spam-Status).  Notices go straight to the sink over
SMTP (a path without defang)."""

from __future__ import annotations

import time

import pytest
from daemon import FILTERS
from mta import Stack, needs_postfix
from scanmail import CLEAN, SPAM, VIRUS, VIRUS_FORWARDED, VIRUS_ZIP, FakeDaemon, header

from defang.testbed.ports import free_port
from defang.testbed.scanners import Clamd, Spamd, scanners_available

needs_scanners = pytest.mark.skipif(scanners_available() is not None, reason=str(scanners_available()))
pytestmark = [pytest.mark.integration, needs_postfix, needs_scanners]
FILTER = FILTERS / "scanning_chain.py"


def settings(spamd: str, clamd: str, notify_port: int, clamd_timeout: float = 10) -> dict:
    return {
        "spamassassin": {"address": spamd, "timeout": 10},
        "clamav": {"address": clamd, "timeout": clamd_timeout},
        "notify": {"method": "smtp", "smtp_port": notify_port, "administrator": "admin@example.net"},
    }


@pytest.fixture(scope="module")
def scanning():
    spamd, clamd = Spamd().start(), Clamd().start()
    port = free_port()
    stack = Stack(FILTER, settings(spamd.inet, clamd.unix, port), sink_port=port)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        spamd.stop()
        clamd.stop()


def test_gtube_is_refused_with_the_filter_s_reply(scanning):
    r = scanning.send(SPAM)
    assert r.data[0] == 550 and "Message looks like spam (score " in r.data[1], r
    # GTUBE's 1000, and ALL_TRUSTED's -1 from the hop defang wrote: the client is loopback
    assert float(r.data[1].split("(score ")[1].rstrip(")")) >= 999, r


def test_a_clean_message_arrives_with_its_spam_status(scanning):
    r = scanning.send(CLEAN)
    assert r.data[0] == 250, r
    m = scanning.arrived(b"Lunch on Thursday")
    assert header(m.raw, b"X-Spam-Status").startswith("No, score=")
    assert float(header(m.raw, b"X-Spam-Score")) < 5


@pytest.mark.parametrize("data, marker", [(VIRUS, b"Plain virus"), (VIRUS_ZIP, b"Zipped virus"),
                                          (VIRUS_FORWARDED, b"Forwarded virus")])  # fmt: skip
def test_eicar_plain_zipped_and_forwarded_is_refused_and_the_administrator_told(scanning, data, marker):
    r = scanning.send(data)
    assert r.data[0] == 554 and r.data[1] == "5.7.1 Virus found: Test.EICAR.NDB.UNOFFICIAL", r
    notice = scanning.arrived(marker)  # the refused message never arrives: this is the notice
    assert notice.rcpts == ["admin@example.net"] and notice.mail_from == ""
    assert b"Subject: Virus refused: Test.EICAR.NDB.UNOFFICIAL" in notice.raw


def test_stopped_daemons_and_a_notice_that_cannot_be_sent():
    spamd, clamd = Spamd().start(), Clamd().start()
    dead = free_port()  # nothing listens: every notice fails
    stack = Stack(FILTER, settings(spamd.inet, clamd.unix, dead))
    try:
        stack.start()
        r = stack.send(VIRUS)
        assert r.data[0] == 554, "a notice that cannot be sent does not change the verdict"
        stack.defang.wait_log("could not send the notice to admin@example.net")
        spamd.stop()  # spam fails open: delivered, and the header says why it was not scanned
        r = stack.send(CLEAN)
        assert r.data[0] == 250, r
        status = header(stack.arrived(b"Lunch on Thursday").raw, b"X-Spam-Status")
        assert status == f"No, not scanned: cannot connect to {spamd.port}@127.0.0.1: Connection refused"
        clamd.stop()  # a virus check fails closed: 451, the sender retries
        r = stack.send(CLEAN)
        assert r.data[0] == 451 and r.data[1] == "4.7.1 Virus scan unavailable, try again later", r
    finally:
        stack.stop()
        spamd.stop()
        clamd.stop()


def test_a_hung_clamd_gives_a_4xx_within_its_timeout():
    hung = FakeDaemon(None)
    stack = Stack(FILTER, settings("", hung.address, free_port(), clamd_timeout=2))
    try:
        stack.start()
        start = time.monotonic()
        r = stack.send(CLEAN)
        took = time.monotonic() - start
        assert r.data[0] == 451 and "Virus scan unavailable" in r.data[1], r
        assert took < 10, f"the 2 s clamd timeout, not a hang: {took:.1f}s"
    finally:
        stack.stop()
        hung.close()
