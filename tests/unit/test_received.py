"""The Return-Path/Received lines defang gives spamd before the message (checks.received)."""

from __future__ import annotations

from defang.workers.checks.received import hop_headers

WHEN = 1796637600.0  # 2026-12-07 10:00:00 UTC


def hop(**kw) -> str:
    args = {"ip": "192.0.2.10", "hostname": "[192.0.2.10]", "helo": "client.test", "by": "mx.example.net",
            "queue_id": "4AbCd", "sender": "alice@example.org", "recipients": ["bob@example.net"],
            "when": WHEN} | kw  # fmt: skip
    return hop_headers(**args).decode("ascii")


def test_postfix_s_form_one_recipient_unknown_name():
    lines = hop().split("\r\n")
    assert lines[:3] == ["Return-Path: <alice@example.org>",
                         "Received: from client.test (unknown [192.0.2.10])",
                         "\tby mx.example.net (envelope-sender <alice@example.org>) (defang) with ESMTP "
                         "id 4AbCd"]  # fmt: skip
    assert lines[3].startswith("\tfor <bob@example.net>; Mon, 07 Dec 2026 ") and lines[4] == ""


def test_a_verified_name_ipv6_tls_auth_several_recipients_the_null_sender():
    text = hop(ip="2001:db8::5", hostname="mail.example.org", sender="", recipients=["a@x.test", "b@x.test"],
               tls=True, auth=True)  # fmt: skip
    assert text.startswith("Return-Path: <>\r\n"
                           "Received: from client.test (mail.example.org [IPv6:2001:db8::5])\r\n"
                           "\tby mx.example.net (envelope-sender <>) (defang) with ESMTPSA id 4AbCd; "
                           "Mon, 07 Dec 2026 ")
    assert "for <" not in text


def test_what_the_client_says_cannot_write_an_address_of_its_own():
    text = hop(helo="x(localhost\t[127.0.0.1])\r\nReceived:", hostname=None)
    assert text.count("\r\n") == 4 and text.count("[") == 2, text
    assert "Received: from x?localhost?[127.0.0.1]???Received: (unknown [192.0.2.10])" in text


def test_no_helo_is_the_client_s_name():
    assert "Received: from unknown (unknown [192.0.2.10])" in hop(helo=None)
