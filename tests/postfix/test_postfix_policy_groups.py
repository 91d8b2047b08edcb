"""Policy groups at RCPT time (issue 30) through two real Postfix instances on loopback.

A sending Postfix (no milter) relays to the receiving Postfix, whose milter is defang with
tests/filters/policy_groups.py ("strict*" recipients refuse spam, the others get it
tagged); the receiving Postfix relays to the sink.  One message to a recipient of each
group: the receiving side answers the second recipient ``452 4.5.3``, the sending Postfix
sends it again in a transaction of its own, and each transaction gets its group's verdict.
The refusal becomes a bounce from the *sending* MTA (ours never accepted that copy).

Approach 2, split after accept (tests/filters/policy_split.py): the receiving side accepts
the message once, hands one copy per recipient to its own sendmail (pickup, with defang as
``non_smtpd_milters``), and each copy is decided alone: the refusal becomes a bounce from
the *receiving* MTA."""

from __future__ import annotations

import re

import pytest
from daemon import FILTERS
from mta import Stack, needs_postfix, wait_for

from defang.testbed.ports import free_port
from defang.testbed.postfix import PrivatePostfix
from defang.testbed.sink import SinkMessage
from defang.testbed.smtpclient import send

pytestmark = [pytest.mark.integration, needs_postfix]
SENDER_NAME = "sender.policy.invalid"


@pytest.fixture(scope="module")
def hops():
    with Stack(FILTERS / "policy_groups.py") as receiving:
        yield from sending_to(receiving)


@pytest.fixture(scope="module")
def split_hops(tmp_path_factory):
    # the copies go through the receiving Postfix's own sendmail (its private config: -C),
    # and the worker runs it as root (an unprivileged postdrop takes only the default config)
    sendmail = tmp_path_factory.mktemp("split") / "sendmail"
    receiving = Stack(FILTERS / "policy_split.py", {"split": {"sendmail_path": str(sendmail)}})
    receiving.postfix.extra["non_smtpd_milters"] = receiving.defang.socket_spec
    sendmail.write_text(f'#!/bin/sh\nexec /usr/sbin/sendmail -C "{receiving.postfix.config_dir}" "$@"\n')
    sendmail.chmod(0o755)
    with receiving:
        yield from sending_to(receiving)


def sending_to(receiving: Stack):
    """A sending Postfix (its own host name: no mail loop) relaying to ``receiving``."""
    sending = PrivatePostfix(receiving.dir / "sending", free_port(), receiving.postfix.smtp_port,
                             extra={"myhostname": SENDER_NAME, "mydomain": "policy.invalid"})
    with sending:
        yield sending, receiving


def submit(sending: PrivatePostfix, subject: str, rcpts: list[str]) -> None:
    data = (f"From: alice@example.org\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@example.org>\r\n\r\nHello.\r\n").encode()  # fmt: skip
    r = send("127.0.0.1", sending.smtp_port, "alice@example.org", rcpts, data)
    assert r.accepted, r


def deliveries(hops: tuple[PrivatePostfix, Stack], subject: str, rcpts: list[str], count: int
               ) -> list[SinkMessage]:  # fmt: skip
    """Submit a message to the sending Postfix; the ``count`` sink deliveries that mention
    ``subject`` (bounces quote it too), once both Postfix queues are empty (nothing left
    behind: every recipient has had its end)."""
    sending, receiving = hops
    submit(sending, subject, rcpts)
    got = wait_for(f"{count} deliveries of {subject!r}",
                   lambda: (lambda ms: ms if len(ms) >= count else None)(
                       [m for m in receiving.sink.messages() if subject.encode() in m.raw]),
                   timeout=60)  # fmt: skip
    sending.wait_queue_empty(timeout=60)
    receiving.postfix.wait_queue_empty(timeout=60)
    return got


def header(m: SinkMessage, name: bytes) -> str:
    found = re.search(rb"(?mi)^" + name + rb":[ \t]*(.*?)\r?$", m.raw.split(b"\r\n\r\n", 1)[0])
    return found.group(1).decode() if found else ""


def tagged_and_bounced(got: list[SinkMessage], reporting_mta: str) -> SinkMessage:
    """tag@'s copy, tagged, after checking that the other delivery is the bounce to alice of
    strict@'s copy, written by ``reporting_mta``: nothing lost, each with its own verdict."""
    assert len(got) == 2, [(m.mail_from, m.rcpts) for m in got]
    (tagged,) = [m for m in got if m.rcpts == ["tag@example.com"]]
    (bounce,) = [m for m in got if m.mail_from == ""]
    assert header(tagged, b"X-Policy") == "default" and header(tagged, b"X-Spam-Flag") == "YES"
    assert bounce.rcpts == ["alice@example.org"]
    assert f"Reporting-MTA: dns; {reporting_mta}".encode() in bounce.raw
    assert b"Final-Recipient: rfc822; strict@example.com" in bounce.raw
    assert b"Status: 5.7.1" in bounce.raw and b"Spam refused by this recipient's policy" in bounce.raw
    return tagged


def test_one_message_to_two_groups_arrives_as_one_transaction_per_group_each_with_its_verdict(hops):
    sending, receiving = hops
    got = deliveries(hops, "groups SPAM-TEST-MARKER one", ["tag@example.com", "strict@example.com"], 2)
    # the strict copy was refused at end of data: the *sending* MTA bounced it to alice
    tagged_and_bounced(got, SENDER_NAME)
    # The sending Postfix deferred the other group's recipient on the 452 and sent it again
    # in a later transaction (its next queue run: minimal_backoff_time), not at once.
    log = sending.log_text()
    tag_lines = [line for line in log.splitlines() if "to=<tag@example.com>" in line]
    assert len(tag_lines) == 2, tag_lines
    assert "status=deferred" in tag_lines[0] and "452 4.5.3 Too many recipients" in tag_lines[0]
    assert "status=sent" in tag_lines[1]
    # what defang said to the strict recipient in the first transaction
    assert "another policy group" in receiving.defang.log()


def test_recipients_of_one_group_share_one_transaction_and_one_delivery(hops):
    got = deliveries(hops, "groups same two", ["strict1@example.com", "strict2@example.com"], 1)
    assert len(got) == 1 and sorted(got[0].rcpts) == ["strict1@example.com", "strict2@example.com"]
    assert header(got[0], b"X-Policy") == "strict" and not header(got[0], b"X-Spam-Flag")
    # msg.rcpt_args: each recipient's RCPT TO arguments (the sending Postfix gives ORCPT)
    assert header(got[0], b"X-Rcpt-Args") == ("strict1@example.com ORCPT=rfc822;strict1@example.com; "
                                              "strict2@example.com ORCPT=rfc822;strict2@example.com")


def test_split_after_accept_each_copy_gets_its_recipient_s_verdict_and_the_bounce_is_ours(split_hops):
    sending, _ = split_hops
    got = deliveries(split_hops, "split SPAM-TEST-MARKER one", ["tag@example.com", "strict@example.com"], 2)
    # the sending MTA delivered both recipients at once (250): the *receiving* MTA bounced one
    tagged = tagged_and_bounced(got, "testbed.defang.invalid")
    assert header(tagged, b"X-Defang-Split").endswith(("1/2", "2/2"))
    log = sending.log_text()
    assert "4.5.3" not in log and log.count("status=sent") >= 2, log[-2000:]
