"""A message too big to stream to clamd, through a real Postfix, real defang and a real
clamd over TCP: the examples refuse it for good (552 5.3.4) instead of a 451 the sender
would retry for days; a small one passes the same stack."""

from __future__ import annotations

import pytest
from daemon import FILTERS
from mta import Stack, needs_postfix
from scanmail import CLEAN, message

from defang.testbed.scanners import Clamd, scanners_available

needs_scanners = pytest.mark.skipif(scanners_available() is not None, reason=str(scanners_available()))
pytestmark = [pytest.mark.integration, needs_postfix, needs_scanners]


def test_a_message_over_clamav_max_size_is_refused_not_tempfailed():
    clamd = Clamd().start()
    settings = {"clamav": {"address": clamd.inet, "timeout": 20, "max_size": 20000},
                "notify": {"method": "smtp", "smtp_port": 9}}  # fmt: skip
    big = message("Big report", b"The figures.\r\n" * 2000)
    try:
        with Stack(FILTERS / "scanning_chain.py", settings) as stack:
            r = stack.send(big)
            small = stack.send(CLEAN)
            stack.defang.wait_log("over [clamav] max_size 20000: not streamed")
    finally:
        clamd.stop()
    assert r.data is not None and r.data[0] == 552, r
    assert r.data[1].startswith("5.3.4 Message too big to scan for viruses (") and "bytes)" in r.data[1], r
    assert small.data is not None and small.data[0] == 250, small
