"""The Authentication-Results reader and writer (workers/checks/arheader.py) against
hostile text: whatever a sender puts in MAIL FROM or HELO stays one value of one result,
lines stay under 78 characters, and a claim to our authserv-id is recognised however it is
written (RFC 8601's grammar), and only then."""

from __future__ import annotations

import authres
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from defang.workers.checks import arheader

OURS = "mx.relay.test"


@pytest.mark.parametrize("value", [
    "mx.relay.test; dkim=pass", "MX.RELAY.TEST; none", "mx.relay.test 1; dkim=pass",
    "mx.relay.test (a comment); dkim=pass", "(before) mx.relay.test; spf=pass",
    "((nested) comment) mx.relay.test ; spf=pass", '"mx.relay.test"; dkim=pass',
    '"mx.relay\\.test"; dkim=pass', '  "MX.relay.test" 1; dkim=pass', "mx.relay.test;\r\n\tdkim=pass",
    '"mx.relay.test";', "mx.relay.test",
])  # fmt: skip
def test_a_claim_to_our_id_is_recognised_however_written(value):
    assert arheader.claims(value, OURS), value


@pytest.mark.parametrize("value", [
    "other.example; mx.relay.test=pass", "mx.relay.test.evil; dkim=pass", '"mx.relay.test x"; dkim=pass',
    "(mx.relay.test) other.example; spf=pass", "mx.relay; dkim=pass", '"mx.relay.test', "", "(unclosed",
    "relay.test; dkim=pass (mx.relay.test)",
])  # fmt: skip
def test_other_services_and_broken_text_are_not_ours(value):
    assert not arheader.claims(value, OURS), value


ADDRESS = st.text(st.characters(min_codepoint=0, max_codepoint=0x2FF), max_size=80)


@settings(max_examples=300, deadline=None)
@given(ADDRESS, ADDRESS, st.text(max_size=300))
def test_whatever_the_sender_writes_is_one_value_of_one_result(mailfrom, helo, comment):
    results = [arheader.spf_result("pass", "mailfrom", mailfrom, comment),
               arheader.spf_result("fail", "helo", f"postmaster@{helo}", comment),
               arheader.dkim_result("fail", "example.test", "sel", comment),
               arheader.dmarc_result("fail", "example.test", "reject", comment)]  # fmt: skip
    value = arheader.header_value(OURS, results)
    lines = f"{arheader.NAME}: {value}".split("\n")
    assert all(len(line) <= 78 or " " not in line.strip() for line in lines), lines
    parsed = authres.AuthenticationResultsHeader.parse_value(value.replace("\n", ""))
    assert parsed.authserv_id == OURS
    assert [r.method for r in parsed.results] == ["spf", "spf", "dkim", "dmarc"], value
    assert [r.result for r in parsed.results] == ["pass", "fail", "fail", "fail"], value
    assert arheader.claims(value, OURS)


def test_a_local_part_that_is_not_a_dot_atom_is_quoted():
    assert arheader.address_pvalue("x;dkim=pass@evil.test") == '"x;dkim=pass"@evil.test'
    assert arheader.address_pvalue("alice.b+tag@example.test") == "alice.b+tag@example.test"
    assert arheader.address_pvalue("a@not a domain") == '"a@not a domain"'
    assert arheader.address_pvalue('q"uote\\@x.test') == '"q\\"uote\\\\"@x.test'
