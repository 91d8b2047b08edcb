"""The hop spamd never saw, through a real Postfix, real defang, real spamd and a real DNS
server: the ``Received:`` line defang writes for the client before the message it gives
spamd ([spamassassin] add_received).

The client is made a remote one with Postfix's XCLIENT (from the test's loopback
connection, which Postfix and its milters then take for 192.0.2.x): loopback would be
trusted by SpamAssassin whatever the header.  spamd asks the test NSD (``dns_server``) and
has one DNSBL rule of the test's own, on the test zone ``bl.test`` (192.0.2.99 listed)."""

from __future__ import annotations

import pytest
from daemon import FILTERS
from mta import Stack, needs_postfix
from scanmail import HEAD, header

from defang.testbed.scanners import Spamd, scanners_available

needs_scanners = pytest.mark.skipif(scanners_available() is not None, reason=str(scanners_available()))
pytestmark = [pytest.mark.integration, needs_postfix, needs_scanners]
RULE = """
header   RCVD_IN_TEST  eval:check_rbl('test-lastexternal', 'bl.test.')
describe RCVD_IN_TEST  The client is listed in the test zone bl.test
tflags   RCVD_IN_TEST  net
score    RCVD_IN_TEST  3.5
"""
XCLIENT = {"smtpd_authorized_xclient_hosts": "127.0.0.1", "mynetworks": "127.0.0.0/8 192.0.2.0/24"}
# the sender writes a Received: of its own, naming a trusted local relay
FORGED = (b"Received: from localhost (localhost [127.0.0.1])\r\n\tby mail.example.org (Postfix) with ESMTP "
          b"id 4AbCdEf\r\n\tfor <bob@example.org>; Thu, 03 Dec 2026 10:00:00 +0000\r\n")  # fmt: skip


def message(subject: str, forged: bool = False) -> bytes:
    head = HEAD % (subject.encode(), subject.replace(" ", "").encode())
    return (FORGED if forged else b"") + head + b"\r\nShall we meet at noon on Thursday?\r\n"


def rules_of(stack: Stack, subject: str, client: str, forged: bool = False) -> tuple[set[str], str, str]:
    """The rules spamd found, the hop headers the filter saw, the queue ID Postfix gave."""
    r = stack.send(message(subject, forged), xclient=f"ADDR={client} NAME=[UNAVAILABLE]")
    assert r.data is not None and r.data[0] == 250 and r.queue_id, r
    m = stack.arrived(subject.encode())
    return set(header(m.raw, b"X-Test-Rules").split(",")), header(m.raw, b"X-Test-Hop"), r.queue_id


@pytest.fixture(scope="module")
def spamd(ns):
    daemon = Spamd(dns_server=ns.server, rules=RULE).start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def stack(spamd):
    with Stack(FILTERS / "spam_hop.py", {"spamassassin": {"address": spamd.inet, "timeout": 20}},
               postfix_extra=XCLIENT) as s:  # fmt: skip
        yield s


def test_a_forged_localhost_received_buys_no_trust(stack):
    rules, hop, queue_id = rules_of(stack, "forged localhost", "192.0.2.10", forged=True)
    assert "ALL_TRUSTED" not in rules, rules
    assert not rules & {"NO_RECEIVED", "NO_RELAYS"}, rules
    # what the filter sees spamd is given: the client, its HELO, our name, Postfix's queue ID
    assert hop.startswith("Return-Path: <alice@example.org> "
                          "Received: from client.test (unknown [192.0.2.10]) "
                          "by testbed.defang.invalid (envelope-sender <alice@example.org>) (defang) "
                          f"with ESMTP id {queue_id} "
                          "for <bob@example.org>; "), hop  # fmt: skip


def test_without_the_hop_the_forged_header_gets_all_trusted(spamd):
    """The hole this closes (add_received = false: as before)."""
    settings = {"spamassassin": {"address": spamd.inet, "timeout": 20, "add_received": False}}
    with Stack(FILTERS / "spam_hop.py", settings, postfix_extra=XCLIENT) as off:
        rules, hop, _ = rules_of(off, "forged without hop", "192.0.2.10", forged=True)
        plain, _, _ = rules_of(off, "plain without hop", "192.0.2.10")
    assert "ALL_TRUSTED" in rules and hop == "none", (rules, hop)
    assert {"NO_RECEIVED", "NO_RELAYS"} <= plain, plain


def test_a_listed_client_fires_spamassassin_s_dnsbl_rule(stack):
    listed, _, _ = rules_of(stack, "from a listed client", "192.0.2.99")
    unlisted, _, _ = rules_of(stack, "from an unlisted client", "192.0.2.10")
    assert "RCVD_IN_TEST" in listed, listed
    assert "RCVD_IN_TEST" not in unlisted, unlisted
