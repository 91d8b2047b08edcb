"""A trial sends no mail unless asked, and the filter can tell a trial from live mail
(issue 25, item 7): ``defang test`` and ``replay`` list the notices; with ``--send-mail``
they hand them to a real SMTP server (Postfix's smtp-sink); ``msg.trial`` and
``conn.trial`` are True in a trial, False for the worker's live mail."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from paths import REPO
from test_mime_rewrite import inline_filter, run
from test_notify import MESSAGE

from defang.core import config as configmod
from defang.testbed.ports import free_port
from defang.testbed.postfix import postfix_available
from defang.testbed.sink import Sink
from defang.workers.loader import load_filter
from defang.workers.runner import FilterRunner

needs_sink = pytest.mark.skipif(os.geteuid() != 0 or not postfix_available(),
                                reason="smtp-sink needs root and Postfix (scripts/bootstrap)")  # fmt: skip

NOTIFYING = """
    def filter_sender(conn, sender):
        conn.notes["sender_hook_trial"] = conn.trial
    def filter_end(msg):
        msg.add_header("X-Trial", f"{msg.trial} {msg.conn.notes.get('sender_hook_trial')}")
        msg.notify_administrator("Seen: " + msg.subject, "queue id " + str(msg.queue_id))
    """


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sink]:
    with Sink(tmp_path_factory.mktemp("notices") / "sink", free_port()) as s:
        yield s


def setup(tmp_path: Path, sink: Sink) -> tuple[Path, Path]:
    f = inline_filter(tmp_path, NOTIFYING)
    cfg = tmp_path / "defang.toml"
    cfg.write_text(f'[daemon]\nfilter = "{f}"\n[notify]\nmethod = "smtp"\nsmtp_port = {sink.port}\n'
                   'administrator = "admin@example.net"\n')  # fmt: skip
    msg = tmp_path / "m.eml"
    msg.write_bytes(MESSAGE)
    return cfg, msg


def defang(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "defang", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)  # fmt: skip


def notices_at(sink: Sink) -> list[bytes]:
    return [m.raw for m in sink.messages() if b"Subject: Seen: Quarterly figures" in m.raw]


@needs_sink
def test_defang_test_lists_notices_and_sends_them_only_with_send_mail(tmp_path: Path, sink: Sink) -> None:
    sink.clear()
    cfg, msg = setup(tmp_path, sink)
    r = defang("test", str(msg), "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "add_header: X-Trial, True True" in r.stdout
    assert ("notice to admin@example.net: Seen: Quarterly figures  (not sent: a trial; --send-mail "
            "sends it)") in r.stdout  # fmt: skip
    assert notices_at(sink) == []
    r = defang("test", str(msg), "--config", str(cfg), "--send-mail", "--json")
    result = json.loads(r.stdout)
    assert result["notices"] == ["notice to admin@example.net: Seen: Quarterly figures"]
    assert result["sent"] == [f"via smtp:127.0.0.1:{sink.port}"]
    (notice,) = notices_at(sink)
    assert b"X-Defang-Queue-ID: TEST" in notice and b"Auto-Submitted: auto-generated" in notice


@needs_sink
def test_defang_replay_counts_notices_and_sends_them_only_with_send_mail(tmp_path: Path, sink: Sink) -> None:
    sink.clear()
    cfg, msg = setup(tmp_path, sink)
    for i in range(3):
        (tmp_path / f"box/{i}.eml").parent.mkdir(exist_ok=True)
        (tmp_path / f"box/{i}.eml").write_bytes(MESSAGE)
    r = defang("replay", str(tmp_path / "box"), "--config", str(cfg), "--jobs", "2")
    assert r.returncode == 0, r.stderr
    assert "notices the filter asked for: 3 (none sent: --send-mail sends them)" in r.stdout
    assert notices_at(sink) == []
    r = defang("replay", str(tmp_path / "box"), "--config", str(cfg), "--jobs", "2", "--send-mail", "--json")
    summary = json.loads(r.stdout)["summary"]
    assert summary["filters"][0]["notices"] == {"asked": 3, "sent": 3}
    assert len(notices_at(sink)) == 3


def test_live_mail_is_not_a_trial(tmp_path: Path) -> None:
    """The worker's runner (no trial): msg.trial False; its notice goes to its outbox."""
    cfg = configmod.load(None)
    runner = FilterRunner.from_config(load_filter(str(inline_filter(tmp_path, NOTIFYING))), cfg)
    reply = run(runner, MESSAGE, tmp_path)
    assert reply["actions"] == [["add_header", "X-Trial", "False None"]]
    assert [str(n) for n in runner.outbox] == ["notice to postmaster: Seen: Quarterly figures"]
