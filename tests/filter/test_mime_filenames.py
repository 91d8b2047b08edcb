"""Attachment names: tricks that hide an extension, and names that must not break logs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_mime_rewrite import crlf, inline_filter, run, runner_for

from defang.workers.mime.filenames import (
    extensions,
    final_extensions,
    has_extension,
    is_dangerous_filename,
    names_differ,
    normalize_filename,
    safe_filename,
    suspicious_filename,
)

RLO = "\u202e"


@pytest.mark.parametrize(
    ("name", "exts", "final"),
    [
        ("invoice.pdf.exe", ["pdf", "exe"], ["exe"]),
        ("INVOICE.PDF.EXE", ["pdf", "exe"], ["exe"]),
        (f"invoice{RLO}fdp.exe", ["exe"], ["exe"]),  # shown as "invoiceexe.pdf"
        (f"photo{RLO}gpj.scr", ["scr"], ["scr"]),
        ("report.exe.", ["exe"], ["exe"]),  # Windows drops trailing dots
        ("report.exe . .  ", ["exe"], ["exe"]),  # ... and spaces
        ("report.exe::$DATA", ["exe"], ["exe"]),  # an NTFS stream name of the same file
        ("invoice.pdf\0.exe", ["pdf", "exe"], ["pdf", "exe"]),  # C stops at the NUL, others do not
        ("../../etc/cron.d/evil.sh", ["sh"], ["sh"]),
        ("C:\\Users\\x\\run.bat", ["bat"], ["bat"]),
        ("ｅｖｉｌ．ｅｘｅ", ["exe"], ["exe"]),  # fullwidth, NFKC folds it
        ("in\u200bvoice.e\u200bxe", ["exe"], ["exe"]),  # zero-width space
        (".bashrc", [], []),
        ("noext", [], []),
        ("", [], []),
        (None, [], []),
    ],
)
def test_extensions_see_through_tricks(name, exts, final) -> None:
    assert extensions(name) == exts
    assert final_extensions(name) == final


def test_has_extension_final_or_anywhere() -> None:
    assert has_extension("invoice.pdf.exe", ["EXE"])
    assert has_extension("invoice.pdf.exe", [".exe", "scr"])
    assert not has_extension("invoice.exe.pdf", ["exe"])
    assert has_extension("invoice.exe.pdf", ["exe"], anywhere=True)
    assert has_extension("a.pdf\0.exe", ["pdf"]) and has_extension("a.pdf\0.exe", ["exe"])


def test_normalize_filename_is_what_a_desktop_saves() -> None:
    assert normalize_filename(f"invoice{RLO}fdp.exe") == "invoicefdp.exe"
    assert normalize_filename("../../x/evil.sh") == "evil.sh"
    assert normalize_filename("a.pdf\0.exe") == "a.pdf"
    assert normalize_filename("tab\there.txt ..") == "tabhere.txt"
    assert normalize_filename(None) == ""


def test_suspicious_and_dangerous() -> None:
    reasons = suspicious_filename(f"invoice{RLO}fdp.pdf.exe")
    assert any("bidirectional" in r for r in reasons)
    assert "dangerous extension .exe" in reasons and "double extension pdf.exe" in reasons
    assert is_dangerous_filename("x.scr") and is_dangerous_filename(f"a{RLO}gpj.txt")
    assert is_dangerous_filename("x.pdf\0.exe")
    assert not is_dangerous_filename("report.pdf") and suspicious_filename("report.pdf") == []
    assert "path separator in the name" in suspicious_filename("../x.txt")
    assert "trailing dots, spaces or stream suffix (ignored by Windows)" in suspicious_filename("x.exe.")
    assert names_differ("invoice.pdf", "invoice.exe") and not names_differ("A.PDF", "a.pdf")
    assert not names_differ(None, "x")


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        (None, "-"),
        ("plain.txt", "plain.txt"),
        (f"invoice{RLO}fdp.exe", "invoice\\u202efdp.exe"),
        ("a\0b\r\nc.txt", "a\\x00b\\x0d\\x0ac.txt"),
        ("\udcff\udcfe.bin", "\\udcff\\udcfe.bin"),  # lone surrogates (undecodable bytes)
        ("back\\slash", "back\\\\slash"),
        ("Grüße 日本.pdf", "Grüße 日本.pdf"),
    ],
)
def test_safe_filename_for_logs(name, shown) -> None:
    assert safe_filename(name) == shown
    safe_filename(name).encode("utf-8")  # always encodable


def test_safe_filename_shortens() -> None:
    assert safe_filename("x" * 500, limit=10) == "xxxxxxxxxx...(+490 chars)"


TRICKS = crlf("""
    From: a@example.com
    Content-Type: multipart/mixed; boundary="b"

    --b
    Content-Type: text/plain

    hi
    --b
    Content-Type: application/pdf; name="invoice.pdf"
    Content-Disposition: attachment; filename="invoice.exe"
    Content-Transfer-Encoding: base64

    TVo=
    --b
    Content-Type: application/octet-stream
    Content-Disposition: attachment; filename*=utf-8''%E2%80%AEgpj.exe

    MZ
    --b
    Content-Type: application/octet-stream
    Content-Disposition: attachment; filename="=?utf-8?B?Li4vLi4vZXZpbC5zaA==?="

    #!/bin/sh
    --b
    Content-Type: application/octet-stream; name="nul\\x00.exe"
    Content-Disposition: attachment; filename==?utf-8?Q?r=C3=A9sum=C3=A9=2Epdf=00=2Eexe?=

    MZ
    --b--
    """)


def test_filename_tricks_through_the_runner(tmp_path: Path, caplog) -> None:
    f = inline_filter(tmp_path, """
        import logging
        from defang import DANGEROUS_EXTENSIONS, suspicious_filename
        log = logging.getLogger("defang.filter")
        SEEN = []
        def filter_part(msg, part):
            if not part.filename:
                return
            log.warning("part %s %s", part.index, part.safe_filename)
            SEEN.append((part.filename, part.filenames, part.filename_mismatch, part.extensions,
                         part.has_extension(DANGEROUS_EXTENSIONS), suspicious_filename(part.filename)))
            if part.has_extension(DANGEROUS_EXTENSIONS):
                part.replace(f"removed {part.safe_filename}", filename="removed.txt")
        """)
    runner = runner_for(f)
    with caplog.at_level(logging.WARNING, logger="defang.filter"):
        reply = run(runner, TRICKS, tmp_path)
    assert "error" not in reply
    json.dumps(reply)
    seen = runner.loaded.module.SEEN
    assert seen[0][:5] == ("invoice.exe", ["invoice.exe", "invoice.pdf"], True, ["exe", "pdf"], True)
    assert seen[1][0] == f"{RLO}gpj.exe" and seen[1][4] is True
    assert any("bidirectional" in r for r in seen[1][5])
    assert seen[2][0] == "../../evil.sh" and "path separator in the name" in seen[2][5]
    assert seen[3][0] == "résumé.pdf\0.exe" and seen[3][3] == ["pdf", "exe"] and seen[3][4] is True
    # what reached the log is escaped: no raw RLO, NUL or line break
    for record in caplog.records:
        text = record.getMessage()
        assert RLO not in text and "\0" not in text and "\n" not in text
    assert "part 3 \\u202egpj.exe" in caplog.text and "résumé.pdf\\x00.exe" in caplog.text
