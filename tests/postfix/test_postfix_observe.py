"""What an admin sees through a real Postfix: the per-message log line, the metrics (issue 28).

One message per verdict (accept, reject, tempfail, discard, a filter error) through a
private Postfix; defang logs in JSON, and each message's line must carry every field,
with the queue ID Postfix itself logged for that message.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from daemon import REPO
from mta import Stack, needs_postfix, shared_dir, wait_for
from prometheus_client.parser import text_string_to_metric_families

from defang.testbed.ports import free_port

pytestmark = [pytest.mark.integration, needs_postfix]

FILTER = REPO / "tests" / "filters" / "observe.py"
FIELDS = {"qid", "conn", "client", "client_name", "helo", "from", "rcpts", "size", "verdict", "actions",
          "tags", "checks", "worker", "queued", "filter", "total"}  # fmt: skip


def message(subject: str) -> bytes:
    return (f"From: alice@example.org\r\nTo: bob@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: <{subject.replace(' ', '.')}@observe.test>\r\n\r\nHello.\r\n").encode()  # fmt: skip


def message_lines(log: str) -> list[dict]:
    out = []
    for line in log.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("msg", "").endswith(": message") and "verdict" in record:
                out.append(record)
    return out


def test_one_line_per_message_with_every_field_and_postfixs_queue_id():
    with Stack(FILTER, settings={"log": {"format": "json"}}) as stack:
        answers = {}
        for what in ("accept", "reject", "tempfail", "discard", "error"):
            answers[what] = stack.send(message(f"please {what}"), helo="client.observe.test")
        assert answers["accept"].data[0] == 250 and answers["discard"].data[0] == 250
        assert answers["reject"].data[0] == 554 and answers["tempfail"].data[0] == 451
        assert answers["error"].data[0] == 451
        lines = wait_for("five per-message lines", lambda: len(ms := message_lines(stack.defang.log())) == 5
                         and ms)  # fmt: skip
        by_subject = {}
        # Postfix's log is written by postlogd after the reply: wait for each message's lines
        refused = ("reject", "tempfail")
        need = [f"{v['qid']}: " for v in lines]
        need += [f"{v['qid']}: milter-reject: END-OF-MESSAGE" for v in lines if v["verdict"] in refused]
        need += [f"{v['qid']}: milter-discard: END-OF-MESSAGE" for v in lines if v["verdict"] == "discard"]

        def maillog_with_all() -> str | None:
            text = stack.postfix.log_text()
            return text if all(n in text for n in need) else None

        maillog = wait_for("Postfix's log lines of the five messages", maillog_with_all, timeout=60)
        for line in lines:
            assert FIELDS <= set(line), line
            assert line["level"] == "info" and line["from"] == "<alice@example.org>" and line["rcpts"] == 1
            assert line["client"] == "127.0.0.1" and line["helo"] == "client.observe.test"
            assert line["worker"] > 0 and line["size"] > 0
            assert line["total"] >= line["filter"] >= 0 and line["queued"] >= 0
            qid = line["qid"]
            assert qid != "-" and f"{qid}: " in maillog, f"queue ID {qid} is not in Postfix's log"
            by_subject[qid] = line
        accept = next(v for v in lines if v["verdict"] == "accept")
        assert accept["qid"] == answers["accept"].queue_id  # "250 2.0.0 Ok: queued as QID"
        assert accept["actions"] == "add_header:2" and accept["tags"] == ["looked_fine"]
        reject = next(v for v in lines if v["verdict"] == "reject")
        assert (reject["code"], reject["dsn"], reject["reply"]) == ("554", "5.7.1", "Not wanted here")
        assert reject["tags"] == ["spam_block"]
        assert f"{reject['qid']}: milter-reject: END-OF-MESSAGE" in maillog
        discard = next(v for v in lines if v["verdict"] == "discard")
        assert f"{discard['qid']}: milter-discard: END-OF-MESSAGE" in maillog
        tempfails = [v for v in lines if v["verdict"] == "tempfail"]
        assert len(tempfails) == 2
        failed = next(v for v in tempfails if "error" in v)
        assert failed["error"].startswith("filter error in filter_end: RuntimeError: the filter broke")
        assert failed["code"] == "451"
        for line in tempfails:
            assert f"{line['qid']}: milter-reject: END-OF-MESSAGE" in maillog
        # one grep follows a message: the filter error's traceback line carries its queue ID too
        errors = [json.loads(x) for x in stack.defang.log().splitlines() if x.startswith("{")
                  and json.loads(x)["level"] == "error"]  # fmt: skip
        assert any(failed["qid"] in e["msg"] for e in errors), errors


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body.decode()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_scraped_during_a_run_count_every_message_by_verdict():
    port = free_port()
    plan = ["accept"] * 6 + ["reject"] * 3 + ["tempfail"] * 2 + ["discard"] * 2 + ["error"]
    with Stack(FILTER, settings={"metrics": {"listen": f"127.0.0.1:{port}"}}) as stack:
        scrapes: list[int] = []
        done = threading.Event()

        def keep_scraping() -> None:
            while not done.is_set():
                scrapes.append(scrape(port)[0])

        scraper = threading.Thread(target=keep_scraping, daemon=True)
        scraper.start()
        for i, what in enumerate(plan):
            stack.send(message(f"please {what} {i}"))
        done.set()
        scraper.join(30)
        assert scrapes and set(scrapes) == {200}, "scrapes answered while the mail went through"
        status, text = scrape(port)
        assert status == 200
        got = samples(text)
        verdicts = {v: got.get(("defang_messages_total", (("verdict", v),)), 0)
                    for v in ("accept", "reject", "tempfail", "discard")}  # fmt: skip
        assert verdicts == {"accept": 6, "reject": 3, "tempfail": 3, "discard": 2}
        assert got[("defang_tags_total", (("tag", "looked_fine"),))] == 6
        assert got[("defang_tags_total", (("tag", "spam_block"),))] == 3
        assert got[("defang_actions_total", (("action", "add_header"),))] == 12
        assert got[("defang_filter_errors_total", ())] == 1
        assert got[("defang_decision_seconds_count", (("stage", "eom"),))] == len(plan)
        assert got[("defang_workers", (("state", "idle"),))] >= 1
        assert got[("defang_queue_depth", ())] == 0
        # other paths and garbage get an answer, and the loop goes on
        assert scrape(port, "/other")[0] == 404
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"\x00\xff garbage\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 400")
        # only on its configured address: another loopback address is not listened on
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", port), timeout=10).close()
        assert stack.send(message("please accept after")).data[0] == 250


@pytest.mark.skipif(not shutil.which("tmux"), reason="needs tmux (scripts/bootstrap installs it)")
def test_defangctl_top_in_tmux_shows_the_run_and_quits_on_q():
    server = f"defang-top-{os.getpid()}"  # a private tmux server, ended at the end

    def tmux(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["tmux", "-L", server, *args], capture_output=True, text=True, timeout=30)

    def screen() -> str:
        return tmux("capture-pane", "-p", "-t", "top").stdout

    with Stack(FILTER) as stack:
        for what in ("accept", "accept", "reject"):
            stack.send(message(f"please {what} before"))
        d = stack.defang
        cmd = (f"cd {REPO} && exec {sys.executable} -m defang.cli.ctl --config {d.config} "
               f"--runtime-dir {d.runtime} top")  # fmt: skip
        try:
            assert tmux("new-session", "-d", "-s", "top", "-x", "120", "-y", "40", cmd).returncode == 0
            wait_for("the first screen", lambda: "defang top: multiplexor pid" in screen())
            for what in ("accept", "error", "reject", "accept"):
                stack.send(message(f"please {what} during"))
            want = "total       accept 4  reject 2  tempfail 1  discard 0"
            try:
                shown = wait_for("the run's totals on the screen", lambda: want in (s := screen()) and s)
            except AssertionError as exc:
                raise AssertionError(f"{exc}; the screen:\n{screen()}") from None
            lines = shown.splitlines()
            assert any(line.startswith("messages/s  accept ") for line in lines), shown
            assert any(line.startswith("latency     p50 ") for line in lines), shown
            assert any(line.startswith("queue       0/") for line in lines), shown
            assert any(line.split()[:4] == ["ID", "PID", "GEN", "STATE"] for line in lines), shown
            assert sum(" idle " in line or " busy " in line for line in lines) >= 2, shown
            error_line = next(line for line in lines if "filter error in filter_end" in line)
            assert " eom: " in error_line, shown
            assert "q quits" in shown and f"filter {FILTER}" in shown  # 120 columns: not cut
            tmux("send-keys", "-t", "top", "q")
            wait_for("top to quit on q", lambda: tmux("has-session", "-t", "top").returncode != 0)
        finally:
            tmux("kill-server")


TICKING = REPO / "tests" / "filters" / "ticking.py"


def test_filter_tick_runs_and_a_hung_or_failing_tick_never_stops_mail(monkeypatch):
    where = shared_dir("defang-tick-")
    monkeypatch.setenv("DEFANG_TICK_DIR", str(where))
    settings = {"filter": {"tick_interval": 0.3, "tick_timeout": 1.0},
                "multiplexor": {"min_workers": 2, "max_workers": 2, "busy_grace": 1.0}}  # fmt: skip
    ticks = where / "ticks"
    try:
        with Stack(TICKING, settings=settings) as stack:
            seen = wait_for("three ticks", lambda: ticks.exists() and len(ticks.read_text().split("\n")) > 3
                            and ticks.read_text())  # fmt: skip
            numbers = [int(line.split()[0]) for line in seen.splitlines()]
            assert numbers == sorted(numbers) and numbers[0] == 1, seen
            # a tick that raises: a filter error with its traceback, counted; ticks go on
            (where / "raise").touch()
            stack.defang.wait_log("filter error in filter_tick")
            assert "RuntimeError: tick" in stack.defang.log()
            (where / "raise").unlink()
            # a tick that hangs: killed at tick_timeout; mail flows all the while
            (where / "hang").touch()
            wait_for("a hung tick", (where / "hanging").exists)
            hung = int((where / "hanging").read_text())
            for i in range(3):
                data = message(f"please accept while a tick hangs {i}")
                assert stack.send(data).data[0] == 250
                assert b"X-Ticked: yes" in stack.arrived(f"hangs {i}".encode()).raw
            log = stack.defang.wait_log(f"(pid {hung}) busy")
            assert "on tick - (conn tick" in log and "past tick_timeout 1s" in log
            wait_for("the hung worker gone", lambda: not os.path.exists(f"/proc/{hung}"))
            (where / "hang").unlink()
            before = len(ticks.read_text().splitlines())
            wait_for("ticks again", lambda: len(ticks.read_text().splitlines()) > before)
            assert stack.send(message("please accept after the ticks")).data[0] == 250
            status = stack.defang.status()
            assert status["events"].get("filter error in filter_tick", 0) >= 1
            assert status["requests"]["tick"] >= 4
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_a_log_file_every_daemon_writes_follows_a_rotation():
    """Made for the daemons' user by `defang run` while still root; after a rotation (a
    rename, no signal) every process writes to the new file within a second."""
    defang_uid = pwd.getpwnam("defang").pw_uid
    where = shared_dir("defang-logfile-")
    path = where / "defang.log"
    settings = {"log": {"destination": "file", "file": str(path), "format": "kv"}}
    stack = Stack(FILTER, settings=settings)
    stderr = stack.defang.log  # the harness waits for "defang running", now in the file
    stack.defang.log = lambda: stderr() + (path.read_text() if path.exists() else "")
    try:
        with stack:
            assert stack.send(message("please error before")).data[0] == 451
            try:
                first = wait_for("its line", lambda: "verdict=tempfail" in (t := path.read_text()) and t)
            except AssertionError:
                raise AssertionError(stack.defang.log()) from None
            assert "proc=defang.worker" in first, "the worker's traceback line is in the file too"
            (where / "defang.log").rename(where / "defang.log.1")  # logrotate, with no signal
            time.sleep(1.1)  # past the once-a-second look at the name (a wait, not a result)
            assert stack.send(message("please error after")).data[0] == 451
            after = wait_for("lines in the new file", lambda: path.exists()
                             and "verdict=tempfail" in (t := path.read_text()) and t)  # fmt: skip
            qid = re.search(r" qid=(\w+) ", after).group(1)
            assert re.search(rf"proc=defang.worker .*filter error in filter_end \(queue {qid}", after), after
            assert re.search(rf"proc=defang.milter .* qid={qid} ", after), after
            assert qid not in (where / "defang.log.1").read_text()
            assert "failed" not in stderr(), "no fallback to standard error"
            assert (os.stat(where / "defang.log.1").st_uid, os.stat(path).st_uid) == (defang_uid,) * 2
    finally:
        shutil.rmtree(where, ignore_errors=True)


def test_syslog_gets_every_daemons_lines_with_the_facility(tmp_path: Path):
    """A syslog socket of the test's own (there is no syslog daemon here) in place of
    /dev/log: the milter's per-message line and the worker's lines arrive as datagrams."""
    address = shared_dir("defang-syslog-") / "log.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(address))
    address.chmod(0o666)  # the daemons run as the defang user
    server.settimeout(20)
    settings = {"log": {"destination": "syslog", "syslog_socket": str(address), "syslog_facility": "local5"}}
    stack = Stack(FILTER, settings=settings)
    # the harness waits for "defang running" in standard error; here it is a datagram
    stack.defang.log = lambda: "defang running" if Path(stack.defang.milter_path).exists() else ""
    try:
        with stack:
            assert stack.send(message("please error via syslog")).data[0] == 451
            got: list[str] = []
            while not any("verdict=tempfail" in d for d in got):
                got.append(server.recv(65536).decode())
            local5_err, local5_info = f"<{21 * 8 + 3}>", f"<{21 * 8 + 6}>"
            assert any(d.startswith(local5_err + "defang.worker[") and "filter error in filter_end" in d
                       for d in got), got  # fmt: skip
            assert any(d.startswith(local5_info + "defang.milter[") and "verdict=tempfail" in d for d in got)
    finally:
        server.close()
        shutil.rmtree(address.parent, ignore_errors=True)
