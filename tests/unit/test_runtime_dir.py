"""Where the runtime dir is when nothing names it, and which files others may change.

Who the process is, is what these decide on: ``os.geteuid`` is replaced for the
non-root cases (the daemons' tests run the real thing as root and as other users:
tests/daemons/test_rootdirs.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from defang.core import config, privileges


@pytest.fixture
def as_uid(monkeypatch):
    def become(uid: int) -> None:
        monkeypatch.setattr(os, "geteuid", lambda: uid)

    for name in ("XDG_RUNTIME_DIR", "RUNTIME_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    return become


def test_root_uses_run_defang_whatever_the_environment(as_uid, monkeypatch, tmp_path):
    as_uid(0)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert config.default_runtime_dir() == Path("/run/defang")


def test_others_use_systemds_then_their_session_dir_then_tmp(as_uid, monkeypatch, tmp_path):
    as_uid(1000)
    assert config.default_runtime_dir() == Path("/tmp/defang-1000")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert config.default_runtime_dir() == tmp_path / "defang"
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/defang:/run/other")
    assert config.default_runtime_dir() == Path("/run/defang")


@pytest.mark.skipif(os.geteuid() != 0, reason="gives a directory to another uid")
def test_a_client_takes_its_own_dir_only_when_it_is_its_own(as_uid, monkeypatch, tmp_path):
    mine, system = tmp_path / "mine", tmp_path / "system"
    monkeypatch.setattr(config, "SYSTEM_RUNTIME_DIR", system)
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(mine))
    as_uid(4242)
    assert config.running_runtime_dir() == mine  # nothing runs anywhere: its own default, named in the error
    system.mkdir()
    (system / "control.sock").touch()
    assert config.running_runtime_dir() == system
    mine.mkdir()
    (mine / "control.sock").touch()
    os.chown(mine, 4242, -1)
    assert config.running_runtime_dir() == mine
    os.chown(mine, 4343, -1)  # another user's directory where this one's default is: not taken
    assert config.running_runtime_dir() == system


def test_files_others_may_change_are_named_with_the_first_reason(tmp_path):
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    f = d / "filter.py"
    f.write_text("")
    f.chmod(0o644)
    assert privileges.others_may_change(f) is None
    f.chmod(0o666)
    assert privileges.others_may_change(f) == f"{f} is writable by everyone"
    f.chmod(0o644)
    d.chmod(0o1777)  # sticky: others may add names, not replace ours
    assert privileges.others_may_change(f) is None
    d.chmod(0o777)
    assert privileges.others_may_change(f) == f"{d} is writable by everyone"
    d.chmod(0o755)
    if os.geteuid() == 0:
        os.chown(f, 65534, -1)
        assert privileges.others_may_change(f) == f"{f} is owned by nobody"
    assert privileges.others_may_change(tmp_path / "missing") is None
