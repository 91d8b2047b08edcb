"""docs/reference.md is generated from the docstrings (scripts/apiref): it must be what
the generator writes now, and every public member it lists must be documented."""

from __future__ import annotations

import importlib.util
import subprocess

from paths import REPO

_spec = importlib.util.spec_from_file_location("apiref", REPO / "scripts" / "apiref.py")
assert _spec is not None and _spec.loader is not None
apiref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(apiref)


def test_reference_is_what_the_generator_writes_from_the_docstrings_now() -> None:
    assert (REPO / "docs" / "reference.md").read_text() == apiref.render(), (
        "docs/reference.md is out of date with the docstrings: run scripts/apiref"
    )


def test_every_public_member_has_documentation() -> None:
    assert apiref.undocumented() == []


def test_the_reference_covers_what_admins_found_only_in_examples() -> None:
    text = apiref.render()
    for wanted in ("#### `msg.conn`", "#### `msg.raw_headers`", "#### `msg.parts`", "#### `part.children`",
                   "disposition: str | None = None", "#### `listing.kind`", "#### `member.depth`",
                   "**Logging from a filter**", "#### `msg.scratch`", "#### `msg.rebuild()"):  # fmt: skip
        assert wanted in text, wanted


def test_check_mode_names_the_stale_file_in_one_line(tmp_path, monkeypatch) -> None:
    stale = tmp_path / "reference.md"
    stale.write_text("old\n")
    monkeypatch.setattr(apiref, "OUT", stale)
    monkeypatch.setattr(apiref, "REPO", tmp_path)
    assert apiref.main(["--check"]) == 1
    r = subprocess.run([str(REPO / "scripts" / "apiref"), "--check"], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr
