"""msg.spamassassin(), msg.clamav(), part.clamav() against real spamd and clamd on loopback,
and every way a daemon can fail: down, refusing, hung, answering garbage or too little.

The daemons (Debian's, defang.testbed.scanners) start once for the module and stop by PID.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import pytest
from scanmail import CLEAN, SPAM, VIRUS, VIRUS_FORWARDED, VIRUS_ZIP, FakeDaemon, message

from defang.cli.trial import Envelope, Trial
from defang.core import config as configmod
from defang.testbed.ports import free_port
from defang.testbed.scanners import Clamd, Spamd, scanners_available
from defang.workers.api.scanning import Scanner, Scans, ScanSettings

pytestmark = pytest.mark.skipif(scanners_available() is not None, reason=str(scanners_available()))

@pytest.fixture(scope="module")
def daemons():
    spamd, clamd = Spamd(), Clamd()
    try:
        spamd.start()
        clamd.start()
        yield spamd, clamd
    finally:
        spamd.stop()
        clamd.stop()


def scans(tmp_path: Path, data: bytes, spam: str = "", clam: str = "", **kw) -> Scans:
    path = tmp_path / f"m{time.monotonic_ns()}.eml"
    path.write_bytes(data)
    spam_kw = {k[5:]: v for k, v in kw.items() if k.startswith("spam_")}
    clam_kw = {k[5:]: v for k, v in kw.items() if k.startswith("clam_")}
    settings = ScanSettings(Scanner("spamassassin", spam, **spam_kw), Scanner("clamav", clam, **clam_kw))
    return Scans(settings, str(path), len(data), "4QTEST")


# --- real verdicts -------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["inet", "unix"])
def test_spamd_finds_gtube_and_passes_ham(daemons, tmp_path, where):
    address = getattr(daemons[0], where)
    spam = scans(tmp_path, SPAM, spam=address).result("spamassassin")
    assert spam.scanned and spam.is_spam and spam.score >= 1000 and spam.rules["GTUBE"] == 1000
    assert spam.status_header().startswith("Yes, score=1000") and "GTUBE" in spam.report
    # SpamAssassin's default form, every field there (spamd does not tell the last two)
    tests = ",".join(sorted(spam.rules))
    assert spam.status_header() == (f"Yes, score={spam.score:.1f} required=5.0 tests={tests} "
                                    "autolearn=unavailable version=unknown")  # fmt: skip
    ham = scans(tmp_path, CLEAN, spam=address).result("spamassassin")
    assert ham.scanned and not ham.is_spam and ham.score < 5 and ham.required == 5.0


@pytest.mark.parametrize("where, fd_passing", [("unix", True), ("unix", False), ("inet", True)])
@pytest.mark.parametrize("data", [VIRUS, VIRUS_ZIP, VIRUS_FORWARDED], ids=["plain", "zip", "forwarded"])
def test_clamd_finds_eicar_plain_zipped_and_forwarded(daemons, tmp_path, where, fd_passing, data):
    address = getattr(daemons[1], where)
    result = scans(tmp_path, data, clam=address, clam_fd_passing=fd_passing).result("clamav")
    assert result.infected and result.viruses == ["Test.EICAR.NDB.UNOFFICIAL"], result
    clean = scans(tmp_path, CLEAN, clam=address, clam_fd_passing=fd_passing).result("clamav")
    assert clean.clean and str(clean) == "clamav: clean"


def test_a_filter_gets_both_verdicts_and_the_part_scan(daemons, tmp_path):
    spamd, clamd = daemons
    f = tmp_path / "filter.py"
    f.write_text("""
from defang import reject
def filter_begin(msg):
    msg.start_checks("spamassassin", "clamav")
def filter_part(msg, part):
    if part.filename == "docs.zip":
        msg.add_header("X-Part-Scan", str(part.clamav()))
def filter_end(msg):
    msg.add_header("X-Whole", str(msg.clamav()))
    msg.add_spam_headers(subject_tag="[SPAM] ")
""")
    cfg = replace(configmod.load(None, filter_path=str(f)), spamassassin_address=spamd.inet,
                  clamav_address=clamd.unix)  # fmt: skip
    t = Trial(cfg)
    try:
        virus = {a[1]: a[2] for a in t.run(VIRUS_ZIP, Envelope()).actions if a[0] == "add_header"}
        spam = t.run(SPAM, Envelope()).actions
    finally:
        t.close()
    assert virus["X-Part-Scan"] == virus["X-Whole"] == "clamav: infected: Test.EICAR.NDB.UNOFFICIAL"
    assert virus["X-Spam-Status"].startswith("No, score=")
    assert ["add_header", "X-Spam-Flag", "YES"] in spam
    assert ["change_header", "Subject", "[SPAM] Test spam", 1] in spam


# --- failures: each a result, logged once, within its timeout ------------------------------


@pytest.fixture
def fake():
    made = []

    def make(answer: bytes | None, read_first: bool = True) -> FakeDaemon:
        made.append(FakeDaemon(answer, read_first))
        return made[-1]

    yield make
    for d in made:
        d.close()


def test_a_daemon_that_is_down_or_missing(tmp_path, caplog):
    port = free_port()
    with caplog.at_level(logging.WARNING, "defang.filter"):
        s = scans(tmp_path, CLEAN, spam=f"inet:{port}@127.0.0.1", clam="unix:/nonexistent/clamd.sock")
        spam, virus = s.result("spamassassin"), s.result("clamav")
        assert s.result("spamassassin") is spam  # kept: asked once
    assert spam.error == f"cannot connect to {port}@127.0.0.1: Connection refused"
    assert virus.error == "cannot connect to /nonexistent/clamd.sock: No such file or directory"
    assert not spam.scanned and not virus.clean
    assert caplog.messages == [f"4QTEST: spamassassin: not scanned: {spam.error}",
                               f"4QTEST: clamav: not scanned: {virus.error}"]  # fmt: skip


def test_hung_daemons_are_bounded_by_their_timeouts_and_the_waits_overlap(tmp_path, fake):
    spamd, clamd = fake(None), fake(None)
    s = scans(tmp_path, CLEAN, spam=spamd.address, clam=clamd.address, spam_timeout=1.5, clam_timeout=1.5)
    start = time.monotonic()
    s.start("spamassassin", "clamav")
    spam, virus = s.result("spamassassin"), s.result("clamav")
    took = time.monotonic() - start
    assert spam.error == f"no answer from {spamd.port}@127.0.0.1 within 1.5s (waited 1.5s)"
    assert virus.error.startswith(f"no answer from {clamd.port}@127.0.0.1 within 1.5s")
    assert took < 2.5, f"the two 1.5 s waits overlap, not add up: {took:.2f}s"


@pytest.mark.parametrize("answer, error", [
    (b"HTTP/1.0 400 Bad Request\r\n\r\n", "spamd answered 'HTTP/1.0 400 Bad Request"),
    (b"SPAMD/1.0 76 Bad header line: Content-length\r\n\r\n", "spamd answered 76 Bad header line"),
    (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 500\r\nSpam: True ; 9.0 / 5.0\r\n\r\nshort",
     "spamd's answer is truncated (5 of 500 bytes)"),
    (b"SPAMD/1.1 0 EX_OK\r\nContent-length: 2\r\n\r\nhi", "spamd's answer has no Spam: header (truncated?)"),
    (b"", "spamd answered 'nothing', not SPAMD/1.x"),
])  # fmt: skip
def test_spamd_garbage_and_truncation_are_errors(tmp_path, fake, answer, error):
    result = scans(tmp_path, CLEAN, spam=fake(answer).address).result("spamassassin")
    assert result.error is not None and result.error.startswith(error), result.error


@pytest.mark.parametrize("answer, error", [
    (b"", "clamd closed the connection without an answer"),
    (b"what is this\0", "clamd answered 'what is this'"),
    (b"stream: Can't allocate memory ERROR\0", "clamd: stream: Can't allocate memory"),
    (b"stream: MAYBE\0", "clamd answered 'stream: MAYBE'"),
])  # fmt: skip
def test_clamd_garbage_is_an_error(tmp_path, fake, answer, error):
    result = scans(tmp_path, CLEAN, clam=fake(answer).address).result("clamav")
    assert result.error == error


def test_size_caps(daemons, tmp_path):
    spamd, clamd = daemons
    big = message("Big", b"x" * 3000)
    s = scans(tmp_path, big, spam=spamd.inet, clam=clamd.inet, spam_max_size=1000, clam_max_size=1000)
    spam, virus = s.result("spamassassin"), s.result("clamav")
    assert spam.error is None and spam.skipped.startswith("message is 3") and "max_size 1000" in spam.skipped
    assert spam.oversize == virus.oversize == len(big)
    # too big to stream is not an error (asking again cannot help): skipped, with the size
    assert virus.error is None and not virus.scanned
    assert virus.skipped == f"message is {len(big)} bytes, over [clamav] max_size 1000: not streamed"
    # clamd's own StreamMaxLength below ours: clamd stops reading and says why
    small = Clamd(stream_max="1K").start()
    try:
        result = scans(tmp_path, big, clam=small.inet).result("clamav")
    finally:
        small.stop()
    assert result.error == "clamd: INSTREAM size limit exceeded."


def test_not_configured_is_skipped_and_silent(tmp_path, caplog):
    with caplog.at_level(logging.INFO, "defang.filter"):
        s = scans(tmp_path, CLEAN)
        spam, virus = s.result("spamassassin"), s.result("clamav")
    assert spam.skipped == "not configured ([spamassassin] address is empty)" and virus.skipped
    assert not virus.clean and caplog.messages == []


def test_start_checks_knows_its_checks(tmp_path):
    with pytest.raises(ValueError, match="start_checks\\('spam'\\): the checks are spamassassin, clamav"):
        scans(tmp_path, CLEAN).start("spam")


def test_a_message_without_a_final_newline_is_scanned(daemons, tmp_path):
    """spamd reads the message by lines: the last one, without its newline, ends only when
    the client shuts its side of the connection (as spamc does)."""
    data = SPAM.rstrip(b"\r\n")
    assert not data.endswith(b"\n")
    spam = scans(tmp_path, data, spam=daemons[0].inet, spam_timeout=20).result("spamassassin")
    assert spam.error is None and spam.is_spam and spam.rules["GTUBE"] == 1000, spam
