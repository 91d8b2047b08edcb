"""The probe's guard against a sender's address: whatever passes it is one SMTP line."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from defang.workers.checks.smtpverify import MAX_ADDRESS, bare, syntax_error


@given(st.text(max_size=400) | st.text(alphabet="<>\r\n\x00 @a.\"", max_size=40))
def test_an_address_that_passes_is_one_line_of_one_address(address):
    addr = bare(address)
    if syntax_error(addr) is None:
        line = f"RCPT TO:<{addr}>\r\n".encode("utf-8", "surrogateescape")
        assert line.count(b"\n") == 1 and b"\r" not in line[:-2] and b"\x00" not in line
        assert line.count(b"<") == 1 and line.count(b">") == 1
        assert len(addr.encode("utf-8", "surrogateescape")) <= MAX_ADDRESS


def test_what_is_refused_says_why():
    assert syntax_error("a@b\r\nRSET") == "control character in the address"
    assert syntax_error("a@b>x") == "angle bracket inside the address"
    assert syntax_error("x" * 255) == "longer than 254 octets"
    assert syntax_error("") == "empty address" and syntax_error(bare("<>")) == "empty address"
    assert syntax_error('"john doe"@example.org') is None and bare(" <a@b> ") == "a@b"
