"""Started as root: where the runtime dir is, who finds it, and what a local user who
got there first (a file, a directory, a link of theirs) can do about it: nothing but be
named in a one-line refusal.  The milter socket that cannot be made, and files others may
change (the filter, the config), each say so in one line."""

from __future__ import annotations

import grp
import os
import pwd
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon import FILTERS, REPO, Defang, system_runtime_dir, traversable_dir
from fakemta import MilterSession

from defang.core import privileges
from defang.testbed.access import reachable_by_others

REACHABLE = reachable_by_others(Path(sys.executable).resolve()) and reachable_by_others(REPO)
pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (it starts as root and drops it)"),
    pytest.mark.skipif(not REACHABLE, reason="the defang user cannot reach this interpreter or checkout"),
]

NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
CTL = [sys.executable, "-m", "defang.cli.ctl"]


def uid_of(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def owner(path: Path) -> str:
    return pwd.getpwuid(os.lstat(path).st_uid).pw_name


def refused(d: Defang) -> subprocess.CompletedProcess:
    """``defang run`` expected to stop at start-up."""
    try:
        return subprocess.run(d.argv(), capture_output=True, text=True, timeout=60, cwd=REPO)
    finally:
        d.cleanup()


def one_line(r: subprocess.CompletedProcess) -> str:
    """The one line the admin is told (the daemons' log records aside: a refusal after
    the multiplexor started follows its start-up lines)."""
    lines = [x for x in r.stderr.strip().splitlines() if not re.match(r"\d{4}-\d\d-\d\d \d", x)]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


# --- where, and who finds it ------------------------------------------------------------


def test_as_root_it_serves_from_run_defang_and_defangctl_finds_it_for_root_defang_and_its_group():
    defang_gid = grp.getgrnam("defang").gr_gid
    with system_runtime_dir() as run, Defang(FILTERS / "end_only.py", default_paths=True) as d:
        d.wait_log("multiplexor ready")
        line = next(x for x in d.log().splitlines() if "defang running" in x)
        assert f"milter on unix:{run}/milter.sock," in line  # the path it serves on, as logged
        assert (run / "milter.sock").is_socket() and owner(run) == "defang"
        assert not Path(f"/tmp/defang-{uid_of('defang')}").exists()
        # what must outlive a reboot is not on /run's tmpfs: the quarantine and the state
        for kept in (Path("/var/spool/defang/quarantine"), Path("/var/lib/defang")):
            assert kept.is_dir() and owner(kept) == "defang" and stat.S_IMODE(kept.stat().st_mode) == 0o700
        assert not (run / "quarantine").exists()
        # no flags, no config: the packaged default config, as each of them would type it
        for who in ([], ["setpriv", "--reuid=defang", "--regid=defang", "--init-groups"],
                    ["setpriv", "--reuid=nobody", "--regid=nogroup", f"--groups={defang_gid}"]):  # fmt: skip
            r = subprocess.run([*who, *CTL, "status"], capture_output=True, text=True, timeout=60, cwd="/")
            assert r.returncode == 0 and "filter " + str(FILTERS / "end_only.py") in r.stdout, (who, r.stderr)
        r = subprocess.run([*NOBODY, *CTL, "status"], capture_output=True, text=True, timeout=60, cwd="/")
        assert r.returncode == 3
        assert one_line(r) == (f"defangctl: {run}/control.sock: Permission denied: the control socket is for "
                               "root, defang's user and group defang")  # fmt: skip


def test_defangctl_that_cannot_connect_names_the_path_and_how_to_point_it_elsewhere(tmp_path):
    r = subprocess.run([*CTL, "--runtime-dir", str(tmp_path), "status"], capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 3
    assert one_line(r) == (
        f"defangctl: cannot reach the multiplexor at {tmp_path}/control.sock: No such file or directory: is "
        "defang running? Point defangctl at its runtime dir with --runtime-dir DIR, or at its config with "
        "--config FILE ([daemon] runtime_dir, [multiplexor] control_socket)")


# --- a local user got there first --------------------------------------------------------

EXPECTED = "expected a directory owned by root or defang, mode"


def test_a_runtime_dir_another_user_made_is_refused_in_one_line():
    d = Defang(FILTERS / "end_only.py")
    d.runtime.mkdir()
    os.chown(d.runtime, uid_of("nobody"), -1)
    r = refused(d)
    assert r.returncode == 2
    assert one_line(r) == (f"defang: {d.runtime}: owned by nobody, not by root or defang: refusing to use it "
                           f"({EXPECTED} 0711; remove it or name another in the config)")  # fmt: skip


def test_a_file_or_a_link_in_place_of_a_directory_is_refused_and_nothing_is_followed(tmp_path):
    d = Defang(FILTERS / "end_only.py")
    d.runtime.write_text("not a directory\n")
    r = refused(d)
    assert r.returncode == 2
    real = "defang's directories must be real ones: remove it"
    assert one_line(r) == f"defang: {d.runtime}: is not a directory; {real}"
    # the spool as a link to a directory of root's: refused, and the target keeps its owner and mode
    target = traversable_dir("defang-target-")
    try:
        d = Defang(FILTERS / "end_only.py")
        d.runtime.mkdir(mode=0o711)
        (d.runtime / "spool").symlink_to(target)
        r = refused(d)
        assert r.returncode == 2
        assert one_line(r) == (f"defang: {d.runtime}/spool: is a symbolic link; defang's directories must be "
                               "real ones: remove it")  # fmt: skip
        assert (owner(target), oct(os.stat(target).st_mode & 0o7777)) == ("root", "0o755")
    finally:
        target.rmdir()


def test_a_runtime_dir_others_may_write_to_is_refused():
    d = Defang(FILTERS / "end_only.py")
    d.runtime.mkdir()
    os.chown(d.runtime, uid_of("defang"), -1)
    d.runtime.chmod(0o777)
    r = refused(d)
    assert r.returncode == 2
    assert one_line(r) == (f"defang: {d.runtime}: mode 0777 lets others write to it: refusing to use it "
                           f"({EXPECTED} 0711; remove it or chmod 0711 it)")  # fmt: skip


def test_the_start_up_never_changes_what_a_link_swapped_in_during_it_points_to(monkeypatch):
    """The race: the name is made, then swapped for a link to root's directory before
    the chown.  The chown and chmod act on the descriptor of what was checked, or on
    nothing: the directory of root's keeps its owner and mode."""
    work = traversable_dir("defang-race-")
    victim = work / "victim"
    victim.mkdir(mode=0o755)
    real_mkdir = os.mkdir

    def mkdir_then_swap(name, mode=0o777, *, dir_fd=None):
        real_mkdir(name, mode, dir_fd=dir_fd)
        os.rmdir(name, dir_fd=dir_fd)
        os.symlink(victim, name, dir_fd=dir_fd)  # what the attacker does in between

    ident = privileges.lookup("defang", "defang", ())
    monkeypatch.setattr(os, "mkdir", mkdir_then_swap)
    try:
        with pytest.raises(privileges.PrivilegeError, match="is a symbolic link"):
            privileges.prepare([(work / "spool", 0o700)], ident)
        monkeypatch.undo()
        assert (owner(victim), oct(os.stat(victim).st_mode & 0o7777)) == ("root", "0o755")
    finally:
        monkeypatch.undo()
        subprocess.run(["rm", "-rf", str(work)], check=False)


def test_as_a_normal_user_a_default_runtime_dir_another_user_made_is_refused():
    """Not root: /tmp/defang-UID; made first by someone else it is refused, never used."""
    taken = Path(f"/tmp/defang-{uid_of('nobody')}")
    subprocess.run(["rm", "-rf", str(taken)], check=True)
    work = traversable_dir("defang-nobody-")
    try:
        taken.mkdir(mode=0o755)
        os.chown(taken, uid_of("defang"), -1)
        config = work / "defang.toml"
        config.write_text('[milter]\nsocket_group = ""\n')
        config.chmod(0o644)
        argv = [*NOBODY, "env", "-u", "XDG_RUNTIME_DIR", "-u", "RUNTIME_DIRECTORY", sys.executable, "-m",
                "defang", "run", "--config", str(config), "--filter", str(FILTERS / "end_only.py")]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")
        assert r.returncode == 2
        assert one_line(r) == (f"defang: {taken}: owned by defang, not by root or nobody: refusing to use it "
                               "(expected a directory owned by root or nobody, mode 0711; remove it or name "
                               "another in the config)")  # fmt: skip
    finally:
        subprocess.run(["rm", "-rf", str(taken), str(work)], check=False)


def test_a_quarantine_another_user_made_is_refused_at_start():
    work = traversable_dir("defang-q-")
    try:
        (work / "q").mkdir(mode=0o755)  # others may enter: the daemons run as defang, not root
        os.chown(work / "q", uid_of("nobody"), -1)
        r = refused(Defang(FILTERS / "end_only.py", settings={"quarantine": {"dir": str(work / "q")}}))
        assert r.returncode == 2
        assert one_line(r).startswith(f"defang: {work}/q: owned by nobody, not by root or defang: refusing")
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def test_a_quarantine_day_directory_another_user_made_is_not_used_and_the_message_is_retried():
    """A year directory of nobody's inside defang's quarantine (it got there somehow): the
    entry is not written where nobody could rename it; the message gets a 4xx."""
    work = traversable_dir("defang-qday-")
    try:
        flt = work / "filter.py"
        flt.write_text("def filter_end(msg):\n    msg.quarantine('kept aside')\n")
        flt.chmod(0o644)
        q = work / "q"
        q.mkdir(mode=0o755)  # others may enter (the daemons then make it 0700)
        os.chown(q, uid_of("defang"), grp.getgrnam("defang").gr_gid)
        this_year = time.gmtime().tm_year
        for year in (this_year - 1, this_year, this_year + 1):  # whatever the date as it arrives
            (q / str(year)).mkdir(mode=0o755)
            os.chown(q / str(year), uid_of("nobody"), -1)
        with Defang(flt, settings={"quarantine": {"dir": str(q)}}) as d:
            with MilterSession(d.milter_path) as s:
                s.connect()
                s.helo()
                s.mail("alice@example.org")
                s.rcpt("bob@example.org")
                r = s.message(b"From: alice@example.org\r\nSubject: odd\r\n\r\nhello\r\n")
            assert r.reply == "reply" and r.text.startswith("451 4.3.0 "), r
            d.wait_log("could not store or rewrite the message")
            [line] = [x for x in d.log().splitlines() if "could not store" in x]
            why = "is not a directory of the daemons' alone: refusing to use it; remove it"
            assert re.search(rf"quarantine directory {q}/\d{{4}} \(uid 65534, mode 0755\) {why}$", line), line
            assert "Traceback" not in d.log()
        assert not [p for p in q.rglob("*") if p.is_file()]  # nothing written where nobody owns
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


def test_a_state_file_root_made_with_defang_test_is_given_to_the_daemons():
    """An admin tries the greylisting example as root before starting defang: `defang test`
    makes /var/lib/defang/state.sqlite3 as root; the daemons then own it, and greylist."""
    eml = traversable_dir("defang-statefile-") / "m.eml"
    eml.write_bytes(b"From: alice@example.org\r\nSubject: hi\r\n\r\nhello\r\n")
    greylisting = REPO / "filters" / "examples" / "greylisting.py"
    state = Path("/var/lib/defang/state.sqlite3")
    try:
        with system_runtime_dir():
            r = subprocess.run([sys.executable, "-m", "defang", "test", str(eml), "--filter",
                                str(greylisting), "--sender", "alice@example.org", "--rcpt",
                                "bob@example.org", "--ip", "192.0.2.7"],
                               capture_output=True, text=True, timeout=120, cwd="/")  # fmt: skip
            assert r.returncode == 2 and "Greylisted" in r.stdout, (r.stdout, r.stderr)  # tempfail
            assert owner(state) == "root"
            with Defang(greylisting, default_paths=True) as d:
                d.wait_log("multiplexor ready")
                assert owner(state) == "defang"
                with MilterSession(d.milter_path) as s:
                    s.connect(ip="192.0.2.7")
                    s.helo()
                    s.mail("alice@example.org")
                    r = s.rcpt("bob@example.org")
                assert r.reply == "reply" and r.text.startswith("451 4.7.1 Greylisted"), r
    finally:
        subprocess.run(["rm", "-rf", str(eml.parent)], check=False)


def test_defang_lists_as_the_defang_user_edits_the_state_of_roots_defang():
    """With root's defang serving from /run/defang, `defang lists` with no flags, as the
    defang user, edits the state those daemons read (/var/lib/defang), as root does; not
    a file of its own under /tmp that no daemon reads."""
    as_defang = ["setpriv", "--reuid=defang", "--regid=defang", "--init-groups"]
    lists = [sys.executable, "-m", "defang", "lists"]

    def run(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, cwd="/")

    with system_runtime_dir(), Defang(FILTERS / "end_only.py", default_paths=True) as d:
        d.wait_log("multiplexor ready")
        try:
            r = run(*as_defang, *lists, "add", "block", "lists-test.example")
            assert r.returncode == 0, r.stderr
            assert r.stdout == "block (global): 1 added, 0 already there\n"
            r = run(*lists, "show", "block")  # root: the daemons' own state
            assert r.returncode == 0 and "block global lists-test.example" in r.stdout.splitlines(), r
        finally:
            run(*lists, "remove", "block", "lists-test.example")


# --- the milter socket that cannot be made -----------------------------------------------


def test_a_milter_socket_in_a_directory_of_roots_is_one_line_naming_socket_user_and_reason():
    work = traversable_dir("defang-sock-")
    try:
        (work / "sock").mkdir(mode=0o750)
        d = Defang(FILTERS / "end_only.py", socket=f"unix:{work}/sock/milter.sock")
        r = refused(d)
        assert r.returncode == 1
        start = "defang: cannot start the milter: milter socket"
        assert one_line(r) == (f"{start} {work}/sock/milter.sock: cannot create it as user defang: "
                               f"{work}/sock: Permission denied (owner root, group root, mode 0750)")
        assert "milter.error" not in r.stdout + r.stderr
        # what libmilter itself fails on: a directory where the socket goes, a port in use
        (work / "sock").chmod(0o755)
        os.chown(work / "sock", uid_of("defang"), -1)
        (work / "sock" / "milter.sock").mkdir()
        r = refused(Defang(FILTERS / "end_only.py", socket=f"unix:{work}/sock/milter.sock"))
        assert r.returncode == 1
        assert one_line(r) == (f"{start} unix:{work}/sock/milter.sock: cannot open it as user defang: "
                               f"{work}/sock/milter.sock exists and is not a socket")
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            r = refused(Defang(FILTERS / "end_only.py", socket=f"inet:{port}@127.0.0.1"))
        assert r.returncode == 1
        in_use = "cannot open it as user defang: Address already in use"
        assert one_line(r) == f"{start} inet:{port}@127.0.0.1: {in_use}"
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


# --- files others may change --------------------------------------------------------------


def test_check_and_run_warn_when_others_may_change_the_filter_or_the_config():
    work = traversable_dir("defang-owners-")
    try:
        rules = work / "rules"
        rules.mkdir(mode=0o755)
        os.chown(rules, uid_of("defang"), -1)  # the daemons' user may rewrite what is inside
        flt = rules / "filter.py"
        flt.write_text((FILTERS / "end_only.py").read_text())
        flt.chmod(0o644)
        d = Defang(flt)
        d.config.chmod(0o664)
        os.chown(d.config, -1, grp.getgrnam("defang").gr_gid)
        only = "only root should be able to change the"
        tail = "or a directory above it (SECURITY.md)"
        want = [f"{flt}: warning: {rules} is owned by defang: {only} filter {tail}",
                f"{d.config}: warning: {d.config} is writable by group defang: {only} config {tail}"]
        check = [sys.executable, "-m", "defang", "check", "--config", str(d.config), "--filter", str(flt)]
        r = subprocess.run(check, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stderr.strip().splitlines() == want, r.stderr
        r = subprocess.run([*check, "--strict"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 1 and r.stderr.strip().splitlines()[:2] == want, r.stderr
        with d:
            logged = [x.split(" WARNING: ", 1)[1] for x in d.log().splitlines() if " WARNING: " in x]
            assert logged == want
        # run as the daemons' user (a systemd unit with User=defang): the same words
        check_filter = [sys.executable, "-m", "defang", "check", "--filter", str(flt)]  # the packaged config
        as_defang = ["setpriv", "--reuid=defang", "--regid=defang", "--init-groups", *check_filter]
        r = subprocess.run(as_defang, capture_output=True, text=True, timeout=60, cwd="/")
        assert r.returncode == 0 and r.stderr.strip().splitlines() == want[:1], r.stderr
        # someone trying a filter of their own, as themselves: their own files are not counted
        os.chown(flt, uid_of("nobody"), -1)
        os.chown(rules, uid_of("nobody"), -1)
        r = subprocess.run([*NOBODY, *check_filter], capture_output=True, text=True, timeout=60, cwd="/")
        assert r.returncode == 0 and r.stderr == "", r.stderr
        # owned by root and writable by root alone: not a word
        os.chown(rules, 0, -1)
        os.chown(flt, 0, -1)
        r = subprocess.run(check_filter, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stderr == "", r.stderr
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
