"""msg.rspamd() against Debian's rspamd on loopback (defang.testbed.scanners.Rspamd), and
the per-user checks: msg.spamassassin(user=...) (spamd's virtual users) and
msg.rspamd(user=...) (rspamd's settings, matched on the Deliver-To defang sends)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from scanmail import CLEAN, SPAM, FakeDaemon

from defang.testbed.scanners import Rspamd, Spamd, rspamd_available, scanners_available
from defang.workers.api.scanning import Envelope, Scanner, Scans, ScanSettings

pytestmark = pytest.mark.skipif((rspamd_available() or scanners_available()) is not None,
                                reason=str(rspamd_available() or scanners_available()))  # fmt: skip
# the user "strict@example.net" has its own thresholds, in both daemons
SETTINGS = """strict {
  priority = high;
  request_header = { "Deliver-To" = "^strict@example\\\\.net$"; }
  apply { actions { reject = 3.0; "add header" = 2.0; greylist = 1.0; } }
}
"""
ENVELOPE = Envelope(ip="192.0.2.10", hostname="mail.example.com", helo="mail.example.com",
                    sender="alice@example.org", recipients=("bob@example.net", "strict@example.net"),
                    queue_id="4QRSPAMD", by="mx.example.net")  # fmt: skip


@pytest.fixture(scope="module")
def rspamd(ns):
    # the test NSD: it answers at once (a closed port costs each lookup its timeout)
    daemon = Rspamd(dns_server=ns.server, local_d={"settings.conf": SETTINGS}).start()
    yield daemon
    daemon.stop()


def scans(tmp_path: Path, data: bytes, rspamd: str = "", spamd: str = "", **kw) -> Scans:
    path = tmp_path / f"m{time.monotonic_ns()}.eml"
    path.write_bytes(data)
    settings = ScanSettings(spamassassin=Scanner("spamassassin", spamd),
                            rspamd=Scanner("rspamd", rspamd, **kw))  # fmt: skip
    return Scans(settings, str(path), len(data), "4QRSPAMD", ENVELOPE)


def test_rspamd_finds_gtube_and_passes_ham_and_is_told_the_envelope(rspamd, tmp_path):
    spam = scans(tmp_path, SPAM, rspamd.inet).result("rspamd")
    assert spam.scanned and spam.action == "reject" and spam.is_spam and "GTUBE" in spam.symbols, spam
    assert str(spam) == f"rspamd: {spam.score:.1f}/{spam.required:.1f} reject"
    ham = scans(tmp_path, CLEAN, rspamd.inet).result("rspamd")
    # no spam (greylist at most: the test names resolve to nothing)
    assert ham.scanned and ham.action in ("no action", "greylist") and not ham.is_spam, ham
    assert ham.required == 15.0 and ham.score < 6, ham
    # rspamd's own log line for the task: the queue ID, client, sender and recipients it was given
    logged = [line for line in rspamd.log.read_text().splitlines() if "qid: <4QRSPAMD>" in line]
    assert logged and "ip: 192.0.2.10" in logged[-1] and "from: <alice@example.org>" in logged[-1], logged
    assert "rcpts: <bob@example.net,strict@example.net>" in logged[-1], logged[-1]


def test_per_user_settings_in_rspamd_and_spamd(rspamd, tmp_path):
    s = scans(tmp_path, CLEAN, rspamd.inet)
    default, strict = s.result("rspamd"), s.result("rspamd", user="strict@example.net")
    assert default.required == 15.0 and strict.required == 3.0, (default, strict)
    assert s.result("rspamd", user="strict@example.net") is strict  # asked once per user
    spamd = Spamd(users={"strict": "required_score 1.5\n"}).start()
    try:
        s = scans(tmp_path, CLEAN, spamd=spamd.inet)
        default, strict = s.result("spamassassin"), s.result("spamassassin", user="strict")
    finally:
        spamd.stop()
    assert default.required == 5.0 and strict.required == 1.5, (default, strict)
    with pytest.raises(ValueError, match="a user name is printable, with no space"):
        s.result("spamassassin", user="bob\r\nUser: root")


@pytest.mark.parametrize("answer, error", [
    (b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\r\noops!",
     "rspamd answered HTTP 500: oops!"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", "rspamd's answer is not its JSON: 'score'"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\n{\"score\"",
     "rspamd's answer is cut short (peer closed"),
    (b"SPAMD/1.1 0 EX_OK\r\n\r\n", "rspamd answered 'SPAMD/1.1 0 EX_OK\\r\\n\\r\\n', not HTTP"),
])  # fmt: skip
def test_rspamd_failures_are_results(tmp_path, answer, error):
    fake = FakeDaemon(answer)
    try:
        result = scans(tmp_path, CLEAN, f"inet:{fake.port}@127.0.0.1").result("rspamd")
    finally:
        fake.close()
    assert not result.scanned and result.error.startswith(error), result


def test_rspamd_down_or_over_its_size(tmp_path):
    from defang.testbed.ports import free_port

    down = scans(tmp_path, CLEAN, f"inet:{free_port()}@127.0.0.1").result("rspamd")
    assert down.error.endswith("Connection refused"), down
    big = scans(tmp_path, CLEAN, "inet:11333@127.0.0.1", max_size=100).result("rspamd")
    assert big.skipped == f"message is {len(CLEAN)} bytes, over [rspamd] max_size 100: not sent"
    assert big.oversize == len(CLEAN)
