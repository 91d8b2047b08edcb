#!/usr/bin/env python3
"""The cost of policy groups (issue 30): a mailing-list-like load through two Postfix.

    .venv/bin/python scripts/bench_policy.py [MESSAGES [none|groups|split ...]]   (root; 60, all)

A sending Postfix relays to a receiving Postfix whose milter is defang with
tests/filters/policy_groups.py; MESSAGES messages, each to 50 recipients, once all in the
default group and once in two groups of 25 ("strict*" and the rest).  It prints the
messages per second until each group's copies reached the sink, and, from the sending
Postfix's log, the delay of one recipient of the group the 452 sent back.  Then the same
load split after accept (tests/filters/policy_split.py: 50 copies per message, re-injected
through the receiving Postfix's sendmail and filtered again).
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "tests" / "support")]
from daemon import FILTERS  # noqa: E402
from mta import Stack  # noqa: E402

from defang.testbed.ports import free_port  # noqa: E402
from defang.testbed.postfix import PrivatePostfix  # noqa: E402
from defang.testbed.smtpclient import send  # noqa: E402


def receiving(mode: str) -> Stack:
    if mode != "split":
        return Stack(FILTERS / "policy_groups.py")
    sendmail = Path(tempfile.mkdtemp(prefix="defang-bench-policy-")) / "sendmail"  # 0700: root runs it
    rx = Stack(FILTERS / "policy_split.py", {"split": {"sendmail_path": str(sendmail)}})
    rx.postfix.extra["non_smtpd_milters"] = rx.defang.socket_spec
    sendmail.write_text(f'#!/bin/sh\nexec /usr/sbin/sendmail -C "{rx.postfix.config_dir}" "$@"\n')
    sendmail.chmod(0o755)
    return rx


def run(messages: int, mode: str) -> str:
    groups = mode == "groups"
    with receiving(mode) as rx:
        tx = PrivatePostfix(rx.dir / "sending", free_port(), rx.postfix.smtp_port,
                            extra={"myhostname": "sender.policy.invalid", "mydomain": "policy.invalid"})
        with tx:
            # "strict*" sorts first: Postfix sends that group first, "user*" gets the 452
            rcpts = [f"{'strict' if groups and i % 2 else 'user'}{i}@example.com" for i in range(50)]
            want = messages * {"groups": 2, "split": 50}.get(mode, 1)
            start = time.monotonic()
            for n in range(messages):
                data = f"From: a@example.org\r\nSubject: list {n}\r\n\r\nHello list.\r\n".encode()
                r = send("127.0.0.1", tx.smtp_port, "alice@example.org", rcpts, data)
                if not r.accepted:
                    raise SystemExit(f"bench_policy: the sending Postfix refused message {n}: {r.data}")
            first = None
            while rx.sink.count() < want:
                if first is None and rx.sink.count() >= messages:
                    first = time.monotonic() - start
                time.sleep(0.05)
            total = time.monotonic() - start
            tx.wait_queue_empty(60)
            if mode == "split":
                return (f"split after accept: {messages} messages x 50 recipients, {want} deliveries; "
                        f"{messages / total:.1f} msg/s ({want / total:.0f} copies/s), all in {total:.1f} s")
            delays = sorted(float(d) for d in
                            re.findall(r"to=<user0@.*?delay=([\d.]+).*status=sent", tx.log_text()))
            median = delays[len(delays) // 2] if delays else float("nan")
            return (f"{'2 groups' if groups else 'no groups'}: {messages} messages x 50 recipients, "
                    f"{want} deliveries; first group {messages / (first or total):.1f} msg/s, "
                    f"all {messages / total:.1f} msg/s; user0's delay median {median:g} s, "
                    f"max {max(delays, default=float('nan')):g} s")


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    for how in sys.argv[2:] or ("none", "groups", "split"):
        print(run(count, how), flush=True)
