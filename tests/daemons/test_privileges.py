"""Least privilege: started as root, no defang process keeps root; sockets and directories
are reachable by whom they are for and nobody else; reload is refused to others."""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from daemon import FILTERS, REPO, Defang, write_config

from defang.core.privileges import capabilities
from defang.testbed.access import reachable_by_others

REACHABLE = reachable_by_others(Path(sys.executable).resolve()) and reachable_by_others(REPO)
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (it starts as root and drops it)"),
    pytest.mark.skipif(not REACHABLE, reason="the defang user cannot reach this interpreter or checkout"),
]

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


def defang_ids() -> tuple[int, int]:
    pw = pwd.getpwnam("defang")  # scripts/bootstrap creates it
    return pw.pw_uid, grp.getgrnam("defang").gr_gid


def ids(pid: int) -> tuple[list[int], list[int], list[int]]:
    """(real, effective, saved, fs uids), the same for gids, and the supplementary groups."""
    lines = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return ([int(x) for x in lines["Uid"].split()], [int(x) for x in lines["Gid"].split()],
            [int(x) for x in lines["Groups"].split()])  # fmt: skip


def mode_owner(path: Path) -> tuple[str, str, str]:
    st = os.lstat(path)
    return (oct(stat.S_IMODE(st.st_mode)), pwd.getpwuid(st.st_uid).pw_name, grp.getgrgid(st.st_gid).gr_name)


def test_started_as_root_every_process_runs_as_defang_with_no_capability():
    uid, gid = defang_ids()
    with Defang(FILTERS / "end_only.py") as d:
        d.wait_log("multiplexor ready")
        pids = {"run": [d.proc.pid]}
        for title in ("defang-multiplexor", "defang-zygote", "defang-worker", "defang-milter"):
            deadline = time.monotonic() + 10
            while not d.pids(title) and time.monotonic() < deadline:
                time.sleep(0.1)
            pids[title] = d.pids(title)
        assert all(pids.values()), pids
        postfix_gid = grp.getgrnam("postfix").gr_gid
        for role, group in pids.items():
            for pid in group:
                uids, gids, groups = ids(pid)
                assert uids == [uid] * 4 and gids == [gid] * 4, (role, uids, gids)
                assert set(groups) <= {gid, postfix_gid}, (role, groups)  # the socket groups only
                assert capabilities(pid) == {"CapPrm": 0, "CapEff": 0, "CapAmb": 0}, role
        assert "running as defang (uid" in d.log()
        # what the daemons made: directories and sockets, each for whom it is for
        assert mode_owner(d.runtime) == ("0o711", "defang", "defang")
        assert mode_owner(d.runtime / "spool") == ("0o700", "defang", "defang")
        assert mode_owner(d.runtime / "quarantine") == ("0o700", "defang", "defang")
        assert mode_owner(d.runtime / "milter.sock") == ("0o660", "defang", "postfix")
        assert mode_owner(d.runtime / "control.sock") == ("0o660", "defang", "defang")
        assert mode_owner(d.runtime / "multiplexor.sock") == ("0o600", "defang", "defang")


def refused_start(settings: dict) -> subprocess.CompletedProcess:
    """``defang run`` with these settings, expected to stop before any daemon starts."""
    d = Defang(FILTERS / "end_only.py", settings=settings)
    try:
        return subprocess.run(d.argv(), capture_output=True, text=True, timeout=60, cwd=REPO)
    finally:
        d.cleanup()


def test_a_missing_user_is_refused_in_one_line():
    r = refused_start({"daemon": {"user": "no-such-user"}})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "defang: [daemon] user 'no-such-user' does not exist: create it (adduser --system --group "
        "--no-create-home no-such-user; scripts/bootstrap does) or name another user"]


def test_a_world_writable_milter_socket_is_refused():
    r = refused_start({"milter": {"socket_mode": "0666"}})
    assert r.returncode == 2 and "[milter] socket_mode 0666: others could write" in r.stderr, r.stderr


def test_started_as_a_normal_user_it_runs_as_that_user(tmp_path):
    work = Path(tempfile.mkdtemp(prefix="defang-nobody-", dir="/tmp"))
    try:
        os.chown(work, pwd.getpwnam("nobody").pw_uid, -1)
        config = write_config(work / "defang.toml", {
            "daemon": {"runtime_dir": str(work / "run")}, "milter": {"socket_group": ""},
            "multiplexor": {"min_workers": 1, "max_workers": 1}})  # fmt: skip
        os.chmod(config, 0o644)
        log = open(work / "log", "wb")
        os.chown(work / "log", pwd.getpwnam("nobody").pw_uid, -1)
        proc = subprocess.Popen([*NOBODY, sys.executable, "-m", "defang", "run", "--config", str(config),
                                 "--filter", str(FILTERS / "end_only.py")], stdout=log,
                                stderr=subprocess.STDOUT, cwd="/")  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while b"defang running" not in (work / "log").read_bytes():
                assert proc.poll() is None and time.monotonic() < deadline, (work / "log").read_text()
                time.sleep(0.1)
            assert ids(proc.pid)[0] == [65534] * 4
            assert mode_owner(work / "run")[1] == "nobody"
            assert b"running as" not in (work / "log").read_bytes()  # nothing to drop
        finally:
            proc.terminate()
            proc.wait(60)
            log.close()
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def ctl_as_nobody(d: Defang, command: str) -> subprocess.CompletedProcess:
    os.chmod(d.config, 0o644)
    return subprocess.run([*NOBODY, sys.executable, "-m", "defang.cli.ctl", "--config", str(d.config),
                           "--runtime-dir", str(d.runtime), command],
                          capture_output=True, text=True, timeout=60, cwd="/")  # fmt: skip


def test_the_control_socket_keeps_others_out_and_reload_is_for_admins():
    with Defang(FILTERS / "end_only.py") as d:
        d.wait_log("multiplexor ready")
        r = ctl_as_nobody(d, "status")
        assert r.returncode == 3, r.stderr
        assert r.stderr.endswith(": Permission denied: the control socket is for root, defang's user and "
                                 "group defang\n")
        assert len(r.stderr.strip().splitlines()) == 1
    # opened to everyone (say, for a monitoring agent): status yes, reload no
    with Defang(FILTERS / "end_only.py", settings={"multiplexor": {"control_socket_mode": "0666"}}) as d:
        d.wait_log("multiplexor ready")
        assert ctl_as_nobody(d, "status").returncode == 0
        r = ctl_as_nobody(d, "reload")
        assert r.returncode == 1
        assert "reload refused: uid 65534 (nobody) is not root, defang's user or in group defang" in r.stdout
        assert "reload refused: uid 65534 (nobody)" in d.log()
        assert d.ctl("reload").returncode == 0  # root may


def test_quarantine_commands_are_refused_to_others_in_one_line():
    work = Path(tempfile.mkdtemp(prefix="defang-q-", dir="/tmp"))
    try:
        work.chmod(0o755)
        (work / "q").mkdir(mode=0o700)
        os.chown(work / "q", *defang_ids())  # as the daemons leave it
        config = write_config(work / "defang.toml", {"quarantine": {"dir": str(work / "q")}})
        config.chmod(0o644)
        why = (": Permission denied: "
               "the quarantine is for root and the daemons' user (defang); run as one of them")
        qid = "20261207T000000Z-abcdef"
        for command in (["list"], ["delete", qid], ["release", qid]):
            argv = [*NOBODY, sys.executable, "-m", "defang", "quarantine", *command, "--config", str(config)]
            r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")
            assert r.returncode == 1, r.stderr
            [line] = r.stderr.strip().splitlines()
            assert line.startswith("defang quarantine: ") and line.endswith(why), line
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
