"""rspamd through a real Postfix and real defang (filters/examples/rspamd_action.py): GTUBE
refused with the filter's reply, a clean message delivered with rspamd's action, rspamd
told the client, sender and Postfix's queue ID, and rspamd stopped: delivered, saying why."""

from __future__ import annotations

import pytest
from daemon import REPO
from mta import Stack, needs_postfix
from scanmail import CLEAN, SPAM, header

from defang.testbed.scanners import Rspamd, rspamd_available

needs_rspamd = pytest.mark.skipif(rspamd_available() is not None, reason=str(rspamd_available()))
pytestmark = [pytest.mark.integration, needs_postfix, needs_rspamd]
EXAMPLE = REPO / "filters" / "examples" / "rspamd_action.py"


def test_rspamd_s_action_through_postfix(ns):
    rspamd = Rspamd(dns_server=ns.server).start()
    try:
        with Stack(EXAMPLE, {"rspamd": {"address": rspamd.inet, "timeout": 20}}) as stack:
            refused = stack.send(SPAM)
            clean = stack.send(CLEAN)
            m = stack.arrived(b"Lunch on Thursday")
            logged = rspamd.log.read_text()
            rspamd.stop()
            down = stack.send(CLEAN.replace(b"Lunch on Thursday", b"Lunch on Friday"))
            unscanned = stack.arrived(b"Lunch on Friday")
    finally:
        rspamd.stop()
    assert refused.data is not None and refused.data[0] == 550, refused
    assert refused.data[1].startswith("5.7.1 Message looks like spam (rspamd score "), refused
    assert clean.data is not None and clean.data[0] == 250 and clean.queue_id, clean
    assert header(m.raw, b"X-Rspamd-Action") in ("no action", "greylist")
    assert float(header(m.raw, b"X-Rspamd-Score").split(" / ")[1]) == 15.0
    assert f"qid: <{clean.queue_id}>, ip: 127.0.0.1, from: <alice@example.org>" in logged
    assert down.data is not None and down.data[0] == 250, down
    assert header(unscanned.raw, b"X-Rspamd-Action") == \
        f"not scanned: cannot connect to {rspamd.port}@127.0.0.1: Connection refused"  # fmt: skip
