"""The admin's commands that need no running daemon: defang check and defang test."""

import json
import subprocess
import sys
from pathlib import Path

from paths import CORPUS, REPO


def defang(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "defang", *args], capture_output=True, text=True,
                          timeout=60, cwd=REPO)  # fmt: skip


def test_check_reports_hooks_of_the_default_filter():
    r = defang("check")
    assert r.returncode == 0, r.stderr
    assert "filters/filter.py: OK; hooks: filter_end, filter_part, filter_sender" in r.stdout


def test_check_reports_file_and_line(tmp_path: Path):
    bad = tmp_path / "filter.py"
    bad.write_text("def filter_end(msg):\n    return (\n")
    r = defang("check", "--filter", str(bad))
    assert r.returncode == 1
    assert r.stderr.startswith(f"{bad}:2: SyntaxError")


def test_test_command_shows_the_decision(tmp_path: Path):
    msg = tmp_path / "m.eml"
    msg.write_bytes(b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n")
    r = defang("test", str(msg), "--rcpt", "bob@example.org")
    assert r.returncode == 0, r.stderr
    assert "end of message  continue" in r.stdout
    assert "add_header: X-Scanned-By, defang" in r.stdout
    r = defang("test", str(msg), "--json", "--sender", "a..b@example.org")
    result = json.loads(r.stdout)
    assert result["mail"]["code"] == "553" and result["mail"]["dsn"] == "5.1.7"


def test_test_command_rejects_an_executable_from_the_corpus():
    eml = CORPUS / "constructed-scr-double-ext-rfc2047-name.eml"
    if not eml.exists():
        import pytest

        pytest.skip("corpus not found")
    r = defang("test", str(eml))
    assert "end of message  reject 554 5.7.1 Executable attachments are not accepted (scr)" in r.stdout


def test_check_prints_a_deprecated_import_with_the_filter_s_line():
    r = defang("check", "--filter", "tests/filters/old_helpers_import.py")
    assert r.returncode == 0
    assert r.stderr == (f"{REPO}/tests/filters/old_helpers_import.py:3: DeprecationWarning: "
                        "workers.helpers is deprecated and goes in the next release: import the same names "
                        "from defang (from defang import DANGEROUS_EXTENSIONS, ...)\n")  # fmt: skip


def test_the_readme_s_example_filter_loads_and_rejects_a_hidden_executable(tmp_path: Path):
    import re

    code = re.search(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    (tmp_path / "filter.py").write_text(code)
    r = defang("check", "--filter", str(tmp_path / "filter.py"))
    assert r.returncode == 0 and "hooks: filter_end, filter_part, filter_recipient, filter_sender" in r.stdout
    msg = tmp_path / "m.eml"
    msg.write_bytes(b"From: a@example.org\r\nMIME-Version: 1.0\r\n"
                    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
                    b"Content-Type: application/octet-stream; name=\"invoice.pdf.exe\"\r\n\r\nMZ\r\n"
                    b"--b--\r\n")
    r = defang("test", str(msg), "--filter", str(tmp_path / "filter.py"))
    assert "end of message  reject 550 5.7.1 No executables (invoice.pdf.exe)" in r.stdout
