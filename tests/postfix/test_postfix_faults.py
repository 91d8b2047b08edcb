"""Faults through a real Postfix, and nothing lost in any: a daemon killed mid-message, the
spool full, a client that crawls or vanishes.  Each message either reaches the sink once
or its sender holds a 4xx (and its retry is delivered once)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from daemon import FILTERS
from mta import Stack, delivered, hold_message, message, needs_postfix, resend_until_accepted, wait_for

pytestmark = [pytest.mark.integration, needs_postfix]

CONTROL = FILTERS / "pool_control.py"
SETTINGS = {"multiplexor": {"min_workers": 2, "max_workers": 2, "min_spare": 0}}


def daemon_pid(stack: Stack, title: str) -> int:
    [pid] = stack.defang.pids(title)
    return pid


def test_the_milter_killed_mid_message_gives_4xx_restarts_and_the_retry_arrives_once():
    with Stack(CONTROL, settings=SETTINGS) as stack:
        old = daemon_pid(stack, "defang-milter")
        hold, data, mid, th, out, _ = hold_message(stack, "milter-killed")
        os.kill(old, signal.SIGKILL)
        th.join(60)
        first = out["result"]
        assert first.data[0] == 451, first  # Postfix's milter_default_action = tempfail
        hold.unlink()
        log = stack.defang.wait_log("milter restarted", timeout=30)
        assert re.search(rf"milter \(pid {old}\) exited with -9; restarting in \d+s", log), log[-2000:]
        new = wait_for("a new milter", lambda: [p for p in stack.defang.pids("defang-milter") if p != old])
        assert new
        retry = resend_until_accepted(stack, data)
        assert retry.queue_id
        wait_for("the retry at the sink", lambda: delivered(stack, mid))
        stack.postfix.wait_queue_empty()
        time.sleep(0.5)
        assert len(delivered(stack, mid)) == 1


def test_the_multiplexor_killed_gives_4xx_until_it_is_back_and_its_workers_exit():
    with Stack(CONTROL, settings=SETTINGS) as stack:
        old = daemon_pid(stack, "defang-multiplexor")
        old_workers = set(stack.defang.pids("defang-worker"))
        hold, data, mid, th, out, holder = hold_message(stack, "mx-killed")
        os.kill(old, signal.SIGKILL)
        th.join(60)
        assert out["result"].data == (451, "4.3.0 Mail filter unavailable, try again later"), out["result"]
        hold.unlink()
        # orphaned: the held worker and its idle sibling exit on their own
        wait_for("the old workers gone", lambda: not any(Path(f"/proc/{p}").exists() for p in old_workers),
                 timeout=30)  # fmt: skip
        log = stack.defang.wait_log("multiplexor restarted", timeout=30)
        assert re.search(rf"multiplexor \(pid {old}\) exited with -9; restarting in \d+s", log)
        retry = resend_until_accepted(stack, data)
        assert holder not in stack.defang.pids("defang-worker") and retry.queue_id
        wait_for("the retry at the sink", lambda: delivered(stack, mid))
        stack.postfix.wait_queue_empty()
        time.sleep(0.5)
        assert len(delivered(stack, mid)) == 1


@pytest.fixture
def small_spool():
    """A 256 KiB tmpfs as the spool directory (mounted by the test, unmounted after)."""
    d = Path(tempfile.mkdtemp(prefix="defang-spool-", dir="/tmp"))
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(d)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield d
    subprocess.run(["umount", str(d)], check=False)
    os.rmdir(d)


def test_a_full_spool_tempfails_leaves_nothing_behind_and_mail_flows_again(small_spool):
    settings = {**SETTINGS, "milter": {"spool_dir": str(small_spool)}}
    with Stack(CONTROL, settings=settings) as stack:
        big, big_mid = message("too-big-for-the-spool")
        big = big.replace(b"Hello from the pool tests.", b"x" * 75 + (b"\r\n" + b"y" * 76) * 6000)  # ~470 KB
        r = stack.send(big)
        assert r.data == (451, "4.3.0 Mail filter unavailable, try again later"), r
        assert "No space left on device" in stack.defang.wait_log("No space left on device")
        wait_for("the spool empty", lambda: not list(small_spool.iterdir()))
        small, mid = message("fits")
        assert stack.send(small).data[0] == 250
        wait_for("the small message at the sink", lambda: delivered(stack, mid))
        assert not delivered(stack, big_mid)
        wait_for("the spool empty again", lambda: not list(small_spool.iterdir()))


def test_a_crawling_client_and_a_vanishing_one_hold_no_worker():
    with Stack(CONTROL, settings=SETTINGS) as stack:
        crawler = socket.create_connection(("127.0.0.1", stack.postfix.smtp_port), timeout=60)
        vanisher = socket.create_connection(("127.0.0.1", stack.postfix.smtp_port), timeout=60)
        try:
            for s in (crawler, vanisher):
                s.recv(1024)
                for line in (b"EHLO slow.example\r\n", b"MAIL FROM:<a@example.org>\r\n",
                             b"RCPT TO:<b@example.org>\r\n", b"DATA\r\n"):  # fmt: skip
                    s.sendall(line)
                    time.sleep(0.2)
                    s.recv(4096)
            vanisher.sendall(b"Subject: gone\r\n\r\nhalf a messa")
            vanisher.close()

            def crawl() -> None:
                for b in b"Subject: slow\r\n\r\none byte a second\r\n":
                    try:
                        crawler.send(bytes([b]))
                    except OSError:
                        return
                    time.sleep(1.0)

            th = threading.Thread(target=crawl, daemon=True)
            th.start()
            t0 = time.monotonic()
            for i in range(6):  # meanwhile, others pass at their usual pace
                data, mid = message(f"meanwhile-{i}")
                assert stack.send(data).data[0] == 250
            assert time.monotonic() - t0 < 10, "the others waited for the crawler"
            st = stack.defang.status()
            assert all(w["state"] != "busy" for w in st["workers"]), st["workers"]
        finally:
            crawler.close()
        wait_for("no transaction left in the spool",
                 lambda: not list((stack.defang.runtime / "spool").iterdir()), timeout=30)  # fmt: skip
