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


def test_test_exit_codes_follow_the_outcome(tmp_path: Path):
    msg = tmp_path / "m.eml"
    msg.write_bytes(b"From: a@example.org\r\nSubject: hi\r\n\r\nhello\r\n")
    assert defang("test", str(msg)).returncode == 0
    r = defang("test", str(msg), "--sender", "a..b@example.org")
    assert r.returncode == 1 and "outcome: reject 553 5.1.7" in r.stdout
    f = tmp_path / "f.py"
    for body, code in (("return tempfail('later')", 2), ("return discard()", 3), ("return 1/0", 4)):
        f.write_text(f"from defang import tempfail, discard\ndef filter_end(msg):\n    {body}\n")
        assert defang("test", str(msg), "--filter", str(f)).returncode == code, body


def test_test_says_what_is_wrong_in_one_line(tmp_path: Path):
    cases = {
        (str(tmp_path),): f"{tmp_path}: a directory: defang replay takes a directory\n",
        (str(tmp_path / "nope.eml"),): f"{tmp_path / 'nope.eml'}: No such file or directory\n",
    }
    for args, line in cases.items():
        r = defang("test", *args)
        assert (r.returncode, r.stderr, r.stdout) == (4, line, ""), args
    broken = tmp_path / "f.py"
    broken.write_text("import no_such_module_here\n")
    msg = tmp_path / "m.eml"
    msg.write_bytes(b"Subject: x\r\n\r\nx\r\n")
    r = defang("test", str(msg), "--filter", str(broken))
    line = f"{broken}:1: ModuleNotFoundError: No module named 'no_such_module_here'\n"
    assert (r.returncode, r.stderr) == (4, line)
    r = defang("test", str(msg), "--ip", "999.1.1.1")
    line = "defang test: argument --ip: '999.1.1.1' is not an IPv4 or IPv6 address\n"
    assert r.returncode == 2 and r.stderr.endswith(line)
    r = defang("test", str(msg), "--macro", "novalue")
    assert r.returncode == 2 and "a macro is NAME=VALUE" in r.stderr


def test_test_reads_standard_input(tmp_path: Path):
    message = "From: a@example.org\nSubject: hi\n\nhello\n"
    argv = [sys.executable, "-m", "defang", "test", "-", "--json"]
    r = subprocess.run(argv, capture_output=True, text=True, input=message, timeout=60, cwd=REPO)
    result = json.loads(r.stdout)
    assert r.returncode == 0 and result["file"] == "-" and result["exit"] == 0
    assert ["add_header", "X-Scanned-By", "defang"] in result["actions"]


def test_check_warns_on_a_misspelt_hook_and_fails_with_strict(tmp_path: Path):
    f = tmp_path / "f.py"
    f.write_text("def filter_recipients(conn, rcpt):\n    pass\n\ndef filter_message(msg):\n    pass\n")
    r = defang("check", "--filter", str(f))
    assert r.returncode == 0 and "hooks: none" in r.stdout
    assert r.stderr.splitlines() == [
        f"{f}:1: filter_recipients is not a hook defang calls; the closest is filter_recipient",
        f"{f}:4: filter_message is not a hook defang calls; the closest is filter_end",
    ]
    r = defang("check", "--strict", "--filter", str(f))
    assert r.returncode == 1 and r.stderr.endswith(f"{f}: 2 warning(s) and --strict\n")


MIMEDEFANG_HELPER = """\
import re
from defang import reject

BAD_EXTS = r"(ade|adp|app|asd|asf|asx|bas|bat|chm|cmd|com|cpl|crt|dll|exe|hlp|hta|inf|ins|isp|js|jse|lnk|mdb|\
mde|msc|msi|msp|mst|ocx|pcd|pif|reg|scr|sct|shb|shs|sys|url|vb|vbe|vbs|vcs|vxd|wmd|wms|wmz|wsc|wsf|wsh|\\{[^\\}]+\\})"


def filter_bad_filename(part):
    \"\"\"MIMEDefang's helper, ported: a dangerous file name (or a CLSID trick).\"\"\"
    return any(re.search(r"\\." + BAD_EXTS + r"\\.*$", n, re.I) for n in part.filenames if n)


def filter_part(msg, part):
    if filter_bad_filename(part):
        return reject("An attachment of yours has a dangerous name")
"""


def test_strict_passes_mimedefang_s_helper_and_fails_real_misspellings(tmp_path: Path):
    f = tmp_path / "f.py"
    f.write_text(MIMEDEFANG_HELPER)
    r = defang("check", "--strict", "--filter", str(f))
    assert (r.returncode, r.stderr) == (0, "") and "hooks: filter_part" in r.stdout
    msg = tmp_path / "m.eml"
    msg.write_bytes(b"From: a@example.org\r\nMIME-Version: 1.0\r\n"
                    b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
                    b"Content-Type: application/octet-stream; name=\"invoice.pdf.exe\"\r\n\r\n"
                    b"MZ\r\n--b--\r\n")
    r = defang("test", str(msg), "--filter", str(f))
    assert r.returncode == 1 and "reject 550 5.7.1 An attachment of yours has a dangerous name" in r.stdout
    helpers = "".join(f"def filter_{n}(msg):\n    pass\n" for n in
                      ("partial", "send_notice", "sender_ok", "virus_name", "helper", "log"))  # fmt: skip
    slips = {"filter_beign": "filter_begin", "filter_mulitparts": "filter_multipart",
             "filter_Recipient": "filter_recipient", "filter_clean_up": "filter_cleanup",
             "filter_hello": "filter_helo", "filter_initialise": "filter_initialize",
             "filter_ends": "filter_end", "filter_rcpt": "filter_recipient"}  # fmt: skip
    f.write_text(MIMEDEFANG_HELPER + helpers + "".join(f"def {n}(msg):\n    pass\n" for n in slips))
    r = defang("check", "--strict", "--filter", str(f))
    said = {line.split(": ", 1)[1] for line in r.stderr.splitlines()[:-1]}
    assert said == {f"{n} is not a hook defang calls; the closest is {h}" for n, h in slips.items()}
    assert r.returncode == 1 and r.stderr.endswith(f"{f}: {len(slips)} warning(s) and --strict\n")


def test_each_command_takes_only_its_own_options():
    assert defang("check", "--socket", "unix:/x").returncode == 2
    assert defang("quarantine", "list", "--filter", "f.py").returncode == 2
    assert "--socket" in defang("run", "--help").stdout
    assert "--socket" not in defang("test", "--help").stdout
    r = defang("--version")
    assert r.returncode == 0 and r.stdout.startswith("defang 0.")
    help_text = defang("test", "--help").stdout
    assert "(default: 192.0.2.1)" in help_text and "exit status: 0 continue or accept, 1 reject" in help_text


def test_check_warns_when_the_scanner_timeouts_do_not_fit_under_busy_timeout(tmp_path: Path):
    """The old shipped pair, clamd 60 s under busy_timeout 60 s: a hung clamd got the worker
    killed (451 4.3.0 Mail filter unavailable) before the filter's own handling ran."""
    cfg = tmp_path / "defang.toml"
    cfg.write_text('[clamav]\naddress = "inet:3310@127.0.0.1"\ntimeout = 60\n'
                   '[multiplexor]\nbusy_timeout = 60\n')  # fmt: skip
    r = defang("check", "--config", str(cfg))
    assert r.returncode == 0 and ": OK; hooks:" in r.stdout
    assert r.stderr.splitlines() == [
        "config: [multiplexor] busy_timeout 60 is not above [clamav] timeout 60 + [dns] lifetime 5 "
        "= 65 s: a hung scanner gets the worker killed and the message on_internal_error before the "
        "filter can handle it; raise busy_timeout or lower those timeouts"]  # fmt: skip
    r = defang("check", "--strict", "--config", str(cfg))
    assert r.returncode == 1 and r.stderr.endswith(": 1 warning(s) and --strict\n")
    # the shipped timeouts, both scanners configured: they fit
    shipped = (REPO / "etc" / "defang.toml").read_text()
    shipped = shipped.replace('address = ""', 'address = "inet:1@127.0.0.1"')
    cfg.write_text(shipped.replace('filter = "../filters/filter.py"', f'filter = "{REPO}/filters/filter.py"'))
    r = defang("check", "--strict", "--config", str(cfg))
    assert r.returncode == 0 and r.stderr == "", r.stderr
