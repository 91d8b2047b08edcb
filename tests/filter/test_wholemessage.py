"""What MIMEDefang filters use that defang added for them, through FilterRunner.handle:
``msg.rebuild()`` (action_rebuild), ``msg.remove_redundant_html_parts()``, a warning
placed first, ``delete_header`` of one occurrence, ``msg.scratch``, and the virus
categories (``VirusResult.category``, "suspicious" for clamd's heuristics)."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from paths import CORPUS
from test_mime_rewrite import (
    HIDDEN_IN_EPILOGUE,
    MIXED,
    PARSER,
    SINGLE,
    crlf,
    inline_filter,
    leaves,
    rebuilt,
    run,
    runner_for,
    spool_form,
)

from defang.workers.checks.results import VirusResult
from defang.workers.mime.walk import walk

REBUILD = """
    def filter_end(msg):
        msg.rebuild()
    """


def body(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[1]


# --- msg.rebuild() ------------------------------------------------------------------------


def test_rebuild_writes_a_part_hidden_after_a_reused_boundary_as_a_regular_part(tmp_path: Path) -> None:
    original = leaves(spool_form(HIDDEN_IN_EPILOGUE))
    new = rebuilt(run(runner_for(inline_filter(tmp_path, REBUILD)), HIDDEN_IN_EPILOGUE, tmp_path), tmp_path)
    assert new is not None, "rebuild() rebuilds a message nobody changed"
    walked = list(walk(PARSER.parsebytes(new)))
    assert not any(p.hidden for p in walked), "every reader now sees what the filter saw"
    assert [(p.filename, p.payload) for p in leaves(new)] == [(p.filename, p.payload) for p in original]
    assert "hidden.exe" in [p.filename for p in walked]
    assert new.count(b'boundary="same"') == 1, "the inner multipart got a boundary of its own"


def test_rebuild_leaves_well_formed_mail_as_it_came(tmp_path: Path) -> None:
    reply = run(runner_for(inline_filter(tmp_path, REBUILD)), MIXED, tmp_path)
    assert reply["actions"] == [], "every byte would be copied: the MTA keeps its own"
    assert not list((tmp_path / "spool").glob("*.new")), "the unneeded new body is not left behind"
    dropping = REBUILD.replace("msg.rebuild()", "msg.rebuild(); msg.parts[-1].drop()")
    f = inline_filter(tmp_path, dropping, "d.py")
    new = rebuilt(run(runner_for(f), MIXED, tmp_path), tmp_path)
    assert new is not None and b"Hello Bob." in new, "with a change, the body is rebuilt as ever"


@pytest.mark.skipif(not CORPUS.is_dir(), reason="corpus not found")
@pytest.mark.parametrize("name", ["enmime-mail-mime-signed.eml", "hunnysoft-m4001.eml"])
def test_rebuild_leaves_signed_mail_as_it_came(name: str, tmp_path: Path) -> None:
    raw = (CORPUS / name).read_bytes()
    reply = run(runner_for(inline_filter(tmp_path, REBUILD)), raw, tmp_path)
    assert reply["actions"] == [] and "error" not in reply


@pytest.mark.skipif(not CORPUS.is_dir(), reason="corpus not found")
def test_rebuild_closes_a_multipart_whose_close_delimiter_is_missing(tmp_path: Path) -> None:
    raw = (CORPUS / "flanker-missing-final-boundary.eml").read_bytes()
    spooled = spool_form(raw)
    new = rebuilt(run(runner_for(inline_filter(tmp_path, REBUILD)), raw, tmp_path), tmp_path)
    assert new is not None
    root = PARSER.parsebytes(new)
    boundary = root.get_boundary().encode()
    assert b"--" + boundary + b"--" in new and b"--" + boundary + b"--" not in spooled
    assert [p.payload for p in leaves(new)] == [p.payload for p in leaves(spooled)]
    defects = [d for p in walk(root) for d in p.defects]
    assert not any("StartBoundaryNotFound" in d or "CloseBoundary" in d for d in defects), defects


# --- remove_redundant_html_parts --------------------------------------------------------

ALTERNATIVES = crlf("""
    From: a@example.com
    MIME-Version: 1.0
    Content-Type: multipart/mixed; boundary="m"

    --m
    Content-Type: multipart/alternative; boundary="alt"

    --alt
    Content-Type: text/plain

    plain words
    --alt
    Content-Type: text/html

    <p>html words</p>
    --alt--
    --m
    Content-Type: multipart/alternative; boundary="only"

    --only
    Content-Type: text/html

    <p>html alone stays</p>
    --only--
    --m
    Content-Type: text/html; name="page.html"
    Content-Disposition: attachment; filename="page.html"

    <p>an attached page stays</p>
    --m--
    """)

REMOVE_HTML = """
    SEEN = []
    def filter_end(msg):
        SEEN[:] = [p.index for p in msg.remove_redundant_html_parts()]
    """


def test_remove_redundant_html_parts_drops_only_html_beside_plain_text(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, REMOVE_HTML)
    runner = runner_for(f)
    new = rebuilt(run(runner, ALTERNATIVES, tmp_path), tmp_path)
    assert runner.loaded.module.SEEN == [3]
    assert [(p.content_type, p.payload.strip()) for p in leaves(new)] == [
        ("text/plain", b"plain words"),
        ("text/html", b"<p>html alone stays</p>"),
        ("text/html", b"<p>an attached page stays</p>"),
    ]


def test_remove_redundant_html_parts_passes_over_signed_alternatives_and_plain_mail(tmp_path: Path) -> None:
    signed = crlf("""
        From: a@example.com
        MIME-Version: 1.0
        Content-Type: multipart/signed; protocol="application/pgp-signature"; boundary="sig"

        --sig
        Content-Type: multipart/alternative; boundary="alt"

        --alt
        Content-Type: text/plain

        plain
        --alt
        Content-Type: text/html

        <p>html</p>
        --alt--
        --sig
        Content-Type: application/pgp-signature

        sig
        --sig--
        """)
    runner = runner_for(inline_filter(tmp_path, REMOVE_HTML))
    for raw in (signed, SINGLE, MIXED):
        reply = run(runner, raw, tmp_path)
        assert runner.loaded.module.SEEN == [] and reply["actions"] == [] and "error" not in reply


def test_remove_redundant_html_parts_in_monitor_mode_only_notes(tmp_path: Path) -> None:
    runner = runner_for(inline_filter(tmp_path, REMOVE_HTML))
    runner.monitor_all = True  # [filter] mode = "monitor"
    reply = run(runner, ALTERNATIVES, tmp_path)
    assert runner.loaded.module.SEEN == [] and rebuilt(reply, tmp_path) is None
    assert reply["would"] == ["drop part 3 - (filter_end)"]


# --- the warning part first ---------------------------------------------------------------

WARN = """
    def filter_part(msg, part):
        if part.has_extension(["exe"]):
            part.drop_with_warning("invoice.pdf.exe was removed", first={first})
    """


@pytest.mark.parametrize("first", [True, False])
def test_drop_with_warning_first_puts_the_warning_before_the_first_part(first: bool, tmp_path: Path) -> None:
    runner = runner_for(inline_filter(tmp_path, WARN.format(first=first)))
    new = rebuilt(run(runner, MIXED, tmp_path), tmp_path)
    root = PARSER.parsebytes(new)
    kids = list(root.iter_parts())
    warning = kids[0] if first else kids[-1]
    assert warning.get_content().strip() == "invoice.pdf.exe was removed"
    others = kids[1:] if first else kids[:-1]
    assert [k.get_content_type() for k in others] == ["text/plain", "multipart/signed"]
    assert b"preamble here\r\n--outer\r\n" in new, "the preamble is kept, the warning after it"
    if first:
        assert b"--outer--\r\nepilogue here" in new


def test_warning_first_on_a_single_part_message_wraps_it_after_the_warning(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, """
        def filter_end(msg):
            msg.parts[0].drop_with_warning("the body was removed", first=True, force=True)
            msg.add_part("added at the end", filename="end.txt")
        """)
    new = rebuilt(run(runner_for(f), SINGLE, tmp_path), tmp_path)
    kids = list(PARSER.parsebytes(new).iter_parts())
    assert [k.get_content().strip() for k in kids] == ["the body was removed", "", "added at the end"]


# --- delete_header(name, index) -------------------------------------------------------------


def test_delete_header_of_one_occurrence(tmp_path: Path) -> None:
    raw = crlf("""
        From: a@example.com
        X-Spam-Score: 1
        X-Spam-Score: 2
        X-Spam-Score: 3

        hi
        """)
    f = inline_filter(tmp_path, """
        def filter_end(msg):
            msg.delete_header("X-Spam-Score", 3)
            msg.delete_header("x-spam-score", index=1)
        """)
    reply = run(runner_for(f), raw, tmp_path)
    assert reply["actions"] == [["delete_header", "X-Spam-Score", 3], ["delete_header", "x-spam-score", 1]]
    every = inline_filter(tmp_path, "def filter_end(msg):\n    msg.delete_header('X-Spam-Score')\n", "all.py")
    assert [a[2] for a in run(runner_for(every), raw, tmp_path)["actions"]] == [3, 2, 1]
    bad = inline_filter(tmp_path, "def filter_end(msg):\n    msg.delete_header('X-Spam-Score', 0)\n", "b.py")
    reply = run(runner_for(bad), raw, tmp_path)
    assert reply["verdict"]["action"] == "tempfail" and "header index must be >= 1" in reply["error"]


# --- msg.scratch ----------------------------------------------------------------------------


def test_scratch_carries_state_between_the_hooks_of_one_message_only(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, """
        def filter_begin(msg):
            assert msg.scratch == {}, msg.scratch
            msg.scratch["domain"] = msg.recipients[0].rpartition("@")[2]
        def filter_part(msg, part):
            msg.scratch.setdefault("types", []).append(part.content_type)
        def filter_end(msg):
            msg.add_header("X-Domain", msg.scratch["domain"])
            msg.add_header("X-Types", " ".join(msg.scratch["types"]))
        """)
    runner = runner_for(f)
    first = run(runner, SINGLE, tmp_path, recipients=("a@abc.example",))
    second = run(runner, SINGLE, tmp_path, recipients=("b@xyz.example",))
    types = ["add_header", "X-Types", "text/plain"]
    assert first["actions"] == [["add_header", "X-Domain", "abc.example"], types]
    assert second["actions"] == [["add_header", "X-Domain", "xyz.example"], types]


# --- virus categories ------------------------------------------------------------------------


def test_virus_categories() -> None:
    assert VirusResult().category == "ok"
    assert VirusResult(error="clamd is down").category == "unscanned"
    assert VirusResult(skipped="not configured").category == "unscanned"
    both = VirusResult(infected=True, viruses=["Heuristics.Encrypted.Zip", "Win.Test.EICAR_HDB-1"])
    assert (both.category, both.suspicious) == ("virus", ["Heuristics.Encrypted.Zip"])
    heur = VirusResult(infected=True, viruses=["Heuristics.Encrypted.Zip", "PUA.Win.Packer.Upx"])
    assert heur.category == "suspicious" and heur.infected and not heur.clean


def encrypted_zip() -> bytes:
    """A zip whose member says it is encrypted (general purpose flag bit 0), as a
    password-protected zip does: what clamd's AlertEncrypted flags."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("report.doc", b"x" * 200)
    data = bytearray(buf.getvalue())
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(sig)
        data[at + flag_at] |= 1
    return bytes(data)


SCANNERS_MISSING = __import__("defang.testbed.scanners", fromlist=["x"]).scanners_available()


@pytest.mark.skipif(SCANNERS_MISSING is not None, reason=str(SCANNERS_MISSING))
def test_clamd_heuristics_are_the_suspicious_category(tmp_path: Path) -> None:
    """A real clamd with AlertEncrypted: an encrypted zip is Heuristics.Encrypted.Zip,
    "suspicious"; EICAR is a signature, "virus"; a plain message is "ok"."""
    import base64

    from scanmail import VIRUS

    from defang.testbed.scanners import Clamd
    from defang.workers.api.scanning import Scanner, ScanSettings
    from defang.workers.api.services import ServiceSettings

    clamd = Clamd(tmp_path / "clamd", extra=("AlertEncrypted yes",)).start()
    try:
        f = inline_filter(tmp_path, """
            def filter_begin(msg):
                r = msg.clamav()
                msg.add_header("X-Category", r.category + " " + ",".join(r.viruses))
            """)
        runner = runner_for(f)
        runner.services = ServiceSettings(scans=ScanSettings(clamav=Scanner("clamav", clamd.unix)))
        zipped = base64.encodebytes(encrypted_zip()).replace(b"\n", b"\r\n")
        encrypted = crlf("""
            From: a@example.com
            MIME-Version: 1.0
            Content-Type: multipart/mixed; boundary="m"

            --m
            Content-Type: text/plain

            the report, password 1234
            --m
            Content-Type: application/zip; name="report.zip"
            Content-Transfer-Encoding: base64

            """) + zipped + b"--m--\r\n"
        got = {name: run(runner, raw, tmp_path)["actions"][0][2]
               for name, raw in (("encrypted", encrypted), ("eicar", VIRUS), ("plain", SINGLE))}
    finally:
        clamd.stop()
    assert got["encrypted"].startswith("suspicious Heuristics.Encrypted"), got
    assert got["eicar"].startswith("virus "), got
    assert got["plain"] == "ok ", got
