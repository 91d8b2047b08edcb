"""Part actions and the body rebuild (workers/mime/rebuild.py), through FilterRunner.handle.

The helpers here (``spool_form``, ``run``, ``rebuilt``) are imported by the other
tests/test_mime_*.py modules.
"""

from __future__ import annotations

import base64
import email.policy
import re
import textwrap
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from paths import CORPUS, FILTERS
from test_corpus_walk import to_spool
from wiretools import handle

from defang.core.verdicts import tempfail
from defang.core.wire import ACTIONS, verdict_to_wire
from defang.workers.loader import load_filter
from defang.workers.mime.part import Part
from defang.workers.mime.text import decode_charset
from defang.workers.mime.walk import walk
from defang.workers.runner import FilterRunner

ON_ERROR = tempfail("Filter error", "451", "4.3.0")
PARSER = BytesParser(policy=email.policy.default)
CONN = {"id": 7, "ip": "192.0.2.1", "hostname": "client.example", "port": 40000, "helo": "client.example",
        "macros": {}, "notes": {}}  # fmt: skip


# --- helpers ---------------------------------------------------------------------------


def spool_form(raw: bytes) -> bytes:
    """What the front end spools for ``raw`` relayed by Postfix: headers as the MTA
    reads them, CRLF line ends everywhere (Postfix hands the milter CRLF lines)."""
    spooled = to_spool(raw)
    cut = 2 if spooled.startswith(b"\r\n") else spooled.index(b"\r\n\r\n") + 4
    return spooled[:cut] + re.sub(rb"\r\n|\r|\n", b"\r\n", spooled[cut:])


def crlf(text: str) -> bytes:
    return textwrap.dedent(text).lstrip("\n").replace("\n", "\r\n").encode("utf-8", "surrogateescape")


def runner_for(filter_path: Path | str, **kw: Any) -> FilterRunner:
    return FilterRunner(load_filter(str(filter_path)), on_filter_error=ON_ERROR, **kw)


def inline_filter(tmp_path: Path, code: str, name: str = "inline_filter.py") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(code))
    return path


def run(runner: FilterRunner, raw: bytes, tmp_path: Path, *, spooled: bool = False, queue_id: str = "Q1",
        recipients: tuple[str, ...] = ("bob@example.org",), sender: str = "alice@example.com",
        conn: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The reply to an eom request for ``raw`` spooled into ``tmp_path/spool/``."""
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir(exist_ok=True)
    path = spool_dir / "message"
    path.write_bytes(raw if spooled else spool_form(raw))
    request = {"op": "eom", "conn": conn or CONN, "sender": sender, "sender_args": [],
               "recipients": list(recipients), "queue_id": queue_id, "spool": str(path),
               "size": path.stat().st_size}  # fmt: skip
    reply = handle(runner, request)  # through the wire both ways
    for action in reply["actions"]:
        assert action[0] in ACTIONS and len(action) == ACTIONS[action[0]] + 1, action
    return reply


def apply_header_actions(head: bytes, actions: list[list[Any]]) -> bytes:
    """The header section after the MTA applied the reply's header actions."""
    lines = re.split(rb"\r\n(?![ \t])", head.rstrip(b"\r\n")) if head.strip() else []

    def positions(name: str) -> list[int]:
        wanted = name.lower().encode()
        return [i for i, line in enumerate(lines) if line.split(b":", 1)[0].strip().lower() == wanted]

    for action in actions:
        if action[0] == "add_header":
            lines.append(f"{action[1]}: {action[2]}".encode())
        elif action[0] == "change_header":
            lines[positions(action[1])[action[3] - 1]] = f"{action[1]}: {action[2]}".encode()
        elif action[0] == "delete_header":
            del lines[positions(action[1])[action[2] - 1]]
        elif action[0] == "insert_header":
            lines.insert(action[1], f"{action[2]}: {action[3]}".encode())
    return b"".join(line + b"\r\n" for line in lines)


def rebuilt(reply: dict[str, Any], tmp_path: Path) -> bytes | None:
    """The whole message the MTA would pass on (None when the body was not replaced)."""
    bodies = [a for a in reply["actions"] if a[0] == "replace_body"]
    if not bodies:
        return None
    assert len(bodies) == 1 and reply["actions"][-1] == bodies[0], "replace_body comes last, once"
    assert Path(bodies[0][1]).parent == tmp_path / "spool", "the new body lies next to the spool file"
    spool = (tmp_path / "spool" / "message").read_bytes()
    cut = 2 if spool.startswith(b"\r\n") else spool.index(b"\r\n\r\n") + 4
    return apply_header_actions(spool[:cut], reply["actions"]) + b"\r\n" + Path(bodies[0][1]).read_bytes()


def leaves(raw: bytes) -> list[Part]:
    return [p for p in walk(PARSER.parsebytes(raw)) if not p.is_multipart]


def text_of(part: Part) -> str:
    return decode_charset(part.payload, part.charset)


# --- the whole corpus: drop every attachment, append a boilerplate ----------------------------

DROP_ALL = FILTERS / "mime_drop_all.py"


@pytest.fixture(scope="module")
def drop_all() -> FilterRunner:
    return runner_for(DROP_ALL)


def _corpus() -> list[Path]:
    return sorted(CORPUS.glob("*.eml")) if CORPUS.is_dir() else []


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")
@pytest.mark.parametrize("path", _corpus(), ids=lambda p: p.name)
def test_corpus_drop_attachments_append_boilerplate(path: Path, drop_all: FilterRunner,
                                                    tmp_path: Path) -> None:  # fmt: skip
    module = drop_all.loaded.module
    reply = run(drop_all, path.read_bytes(), tmp_path)
    assert "error" not in reply, reply.get("error")
    new = rebuilt(reply, tmp_path)
    assert new is not None, "a boilerplate always changes the body"
    # walked as the filter saw it: with the files hidden in text parts (an owner finds them)
    original = list(walk(PARSER.parsebytes((tmp_path / "spool" / "message").read_bytes()), owner=object()))
    out = list(walk(PARSER.parsebytes(new)))
    dropped, bodies = set(module.SEEN["dropped"]), set(module.SEEN["bodies"])

    def payload_after(part: Part) -> bytes:
        """A carrier loses the blocks of the hidden files dropped from it; others stay."""
        spans = sorted(c._span for c in part.children if c.embedded and c.index in dropped)
        if not spans or part.embedded:
            return part.payload
        text, at = b"", 0
        for start, end in spans:
            text, at = text + part.payload[at:start], max(at, end)
        # a new text part: written with CRLF line ends, and ending in one
        lines = (text + part.payload[at:]).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        return lines if lines.endswith(b"\r\n") else lines + b"\r\n"

    def gone(part: Part | None) -> bool:
        while part is not None:
            if part.index in dropped:
                return True
            part = part.parent
        return False

    kept = [p for p in original if not p.is_multipart and not gone(p) and not p.embedded]
    expected = iter(kept)
    added = 0
    want = next(expected, None)
    for got in (p for p in out if not p.is_multipart):
        if want is not None and want.index in bodies:
            addition = module.HTML if want.content_type == "text/html" else module.TEXT
            text = text_of(got)
            assert got.content_type == want.content_type
            assert text.count(addition) == 1, f"boilerplate not exactly once in part {got.index}"
            assert re.sub(r"\s+", "", text.replace(addition, "", 1)) == re.sub(r"\s+", "", text_of(want))
            want = next(expected, None)
        elif want is not None and (got.content_type, got.payload, got.filename) == \
                (want.content_type, payload_after(want), want.filename):  # fmt: skip
            want = next(expected, None)
        else:  # only what the rebuild adds: the boilerplate part, an empty placeholder
            assert got.content_type == "text/plain", f"unexpected {got.content_type} part {got.index}"
            assert got.payload.rstrip(b"\r\n") in (b"", module.TEXT.encode()), got.payload[:80]
            added += 1
    assert want is None, f"part {want.index} ({want.content_type}) lost by the rebuild"
    if not bodies:
        assert added >= 1, "no body for the boilerplate: a part holding it is added"
    # the rebuild adds no parser defects of its own
    assert sum(len(p.email.defects) for p in out) <= sum(len(p.email.defects) for p in original)


# --- unit tests ------------------------------------------------------------------------------

MIXED = crlf("""
    From: alice@example.com
    To: bob@example.org
    Subject: test
    MIME-Version: 1.0
    Content-Type: multipart/mixed; boundary="outer"

    preamble here
    --outer
    Content-Type: text/plain; charset=us-ascii

    Hello Bob.
    --outer
    Content-Type:multipart/signed; protocol="application/pgp-signature";
    \tmicalg=pgp-sha256; boundary="sig"

    --sig
    Content-Type: text/plain

    signed text
    --sig
    Content-Type: application/pgp-signature

    -----BEGIN PGP SIGNATURE-----
    abc
    -----END PGP SIGNATURE-----
    --sig--
    --outer
    Content-Type: application/octet-stream; name="invoice.pdf.exe"
    Content-Disposition: attachment; filename="invoice.pdf.exe"
    Content-Transfer-Encoding: base64

    TVqQAAMAAAAEAAAA//8AALgAAAAAAAAAQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA
    --outer--
    epilogue here
    """)


def test_a_message_the_filter_did_not_change_is_not_rebuilt(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, """
        def filter_part(msg, part):
            part.payload, part.filenames, part.archive()
        def filter_end(msg):
            msg.add_header("X-Seen", str(len(msg.parts)))
        """)
    reply = run(runner_for(f), MIXED, tmp_path)
    assert reply["actions"] == [["add_header", "X-Seen", "6"]]
    assert not (tmp_path / "spool" / "message.new").exists()


def test_drop_copies_every_other_byte(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, """
        def filter_part(msg, part):
            if part.has_extension(["exe"]):
                part.drop()
        """)
    reply = run(runner_for(f), MIXED, tmp_path)
    new = rebuilt(reply, tmp_path)
    assert reply["actions"] == [["replace_body", str(tmp_path / "spool" / "message.new")]]
    body = MIXED.split(b"\r\n\r\n", 1)[1]
    cut = body.index(b"--outer\r\nContent-Type: application/octet-stream")
    # everything up to the dropped part is the same bytes, the close delimiter and epilogue too
    assert new.split(b"\r\n\r\n", 1)[1] == body[:cut] + b"--outer--\r\nepilogue here\r\n"
    assert [p.content_type for p in leaves(new)] == ["text/plain", "text/plain", "application/pgp-signature"]


def test_nested_signed_entity_keeps_its_bytes_when_a_sibling_changes(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, """
        def filter_part(msg, part):
            if part.filename:
                part.replace("removed", filename="removed.txt")
        def filter_end(msg):
            msg.append_boilerplate("-- boilerplate --")
        """)
    new = rebuilt(run(runner_for(f), MIXED, tmp_path), tmp_path)
    signed = MIXED[MIXED.index(b"Content-Type:multipart/signed") : MIXED.index(b"--sig--") + 7]
    assert signed in new, "the signed entity (header spacing and folding included) is copied as is"
    assert b"Hello Bob.\r\n-- boilerplate --\r\n" in new
    assert b"signed text\r\n--sig" in new  # the text inside the signature got no boilerplate


def test_drop_with_warning_collects_one_warning_part(tmp_path: Path) -> None:
    raw = crlf("""
        From: a@example.com
        Content-Type: multipart/mixed; boundary="b"

        --b
        Content-Type: text/plain

        body
        --b
        Content-Type: application/zip; name="a.zip"

        x
        --b
        Content-Type: application/x-msdownload; name="b.exe"

        y
        --b--
        """)
    f = inline_filter(tmp_path, """
        def filter_part(msg, part):
            if part.filename:
                part.drop_with_warning(f"Removed {part.filename}.")
        """)
    new = rebuilt(run(runner_for(f), raw, tmp_path), tmp_path)
    got = leaves(new)
    assert [p.content_type for p in got] == ["text/plain", "text/plain"]
    assert text_of(got[0]) == "body"
    assert text_of(got[1]).replace("\r\n", "\n") == "Removed a.zip.\n\nRemoved b.exe.\n"
    assert got[1].email["Content-Description"] == "Notice from the mail filter"


def test_replace_puts_a_notice_in_place(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, """
        def filter_part(msg, part):
            if part.has_extension(["exe"]):
                part.replace(f"The attachment {part.filename} was removed: ünsafe.",
                             filename=part.filename + ".txt")
        """)
    new = rebuilt(run(runner_for(f), MIXED, tmp_path), tmp_path)
    got = leaves(new)
    assert [p.content_type for p in got] == ["text/plain", "text/plain", "application/pgp-signature",
                                            "text/plain"]  # fmt: skip
    notice = got[-1]
    assert notice.filename == "invoice.pdf.exe.txt" and notice.disposition == "attachment"
    assert notice.charset == "utf-8" and notice.email["Content-Transfer-Encoding"] == "quoted-printable"
    assert text_of(notice) == "The attachment invoice.pdf.exe was removed: ünsafe."


def test_replace_with_bytes_and_a_non_ascii_filename(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, """
        def filter_part(msg, part):
            if part.has_extension(["exe"]):
                part.replace(b"%PDF-1.4 fake", "application/pdf", filename="Grüße.pdf")
        """)
    got = leaves(rebuilt(run(runner_for(f), MIXED, tmp_path), tmp_path))[-1]
    assert got.content_type == "application/pdf" and got.payload == b"%PDF-1.4 fake"
    assert got.filename == "Grüße.pdf"


def test_add_part_to_a_mixed_message_appends_it(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, """
        def filter_end(msg):
            msg.add_part("report", filename="report.txt")
        """)
    reply = run(runner_for(f), MIXED, tmp_path)
    assert [a[0] for a in reply["actions"]] == ["replace_body"]  # same top-level headers
    new = rebuilt(reply, tmp_path)
    got = leaves(new)
    assert got[-1].filename == "report.txt" and text_of(got[-1]) == "report"
    assert len(got) == 5 and b"--outer--\r\nepilogue here" in new


SINGLE = crlf("""
    From: a@example.com
    To: b@example.org
    Subject: plain
    Content-Type: text/plain; charset=iso-8859-1
    Content-Transfer-Encoding: quoted-printable

    Gr=FC=DFe aus Berlin
    """)


def test_add_part_to_a_single_part_message_wraps_it(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, """
        def filter_end(msg):
            msg.add_part(b"\\x00\\x01", "application/octet-stream", filename="data.bin")
        """)
    reply = run(runner_for(f), SINGLE, tmp_path)
    names = [tuple(a[:2]) if a[0] != "insert_header" else (a[0], a[2]) for a in reply["actions"][:-1]]
    assert names == [("change_header", "Content-Type"), ("delete_header", "Content-Transfer-Encoding"),
                     ("insert_header", "MIME-Version")]  # fmt: skip
    assert reply["actions"][0][2].startswith('multipart/mixed; boundary="defang-')
    new = rebuilt(reply, tmp_path)
    msg = PARSER.parsebytes(new)
    assert msg.get_content_type() == "multipart/mixed" and msg["MIME-Version"] == "1.0"
    first, second = leaves(new)
    assert first.charset == "iso-8859-1" and text_of(first) == "Grüße aus Berlin\r\n"
    assert first.email["Content-Transfer-Encoding"] == "quoted-printable"
    assert second.payload == b"\x00\x01" and second.filename == "data.bin"


ALTERNATIVE = crlf("""
    From: a@example.com
    MIME-Version: 1.0
    Content-Type: multipart/mixed; boundary="m"

    --m
    Content-Type: multipart/alternative; boundary="alt"

    --alt
    Content-Type: text/plain; charset=utf-8
    Content-Transfer-Encoding: base64

    SGVsbG8gd29ybGQK
    --alt
    Content-Type: text/html; charset=iso-8859-1
    Content-Transfer-Encoding: quoted-printable

    <html><body><p>Hello world</p></BODY></html>
    --alt--
    --m
    Content-Type: message/rfc822

    Subject: forwarded
    Content-Type: text/plain

    forwarded body
    --m
    Content-Type: text/plain
    Content-Disposition: attachment; filename="notes.txt"

    notes
    --m--
    """)


def test_boilerplate_goes_into_both_alternatives_once(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, """
        CHOSEN = []
        def filter_end(msg):
            CHOSEN[:] = [p.index for p in msg.append_boilerplate("Geprüft – scanned", "<p>Geprüft – ok</p>")]
        """)
    runner = runner_for(f)
    new = rebuilt(run(runner, ALTERNATIVE, tmp_path), tmp_path)
    assert runner.loaded.module.CHOSEN == [2, 3]
    plain, html, forwarded, notes = leaves(new)
    assert plain.email["Content-Transfer-Encoding"] == "base64" and plain.charset == "utf-8"
    assert text_of(plain) == "Hello world\nGeprüft – scanned\n"
    # iso-8859-1 kept: what does not fit becomes a character reference, before </BODY>
    assert html.charset == "iso-8859-1" and html.email["Content-Transfer-Encoding"] == "quoted-printable"
    assert text_of(html) == "<html><body><p>Hello world</p><p>Geprüft &#8211; ok</p>\r\n</BODY></html>"
    assert text_of(forwarded) == "forwarded body" and text_of(notes) == "notes"


def test_boilerplate_that_does_not_fit_the_charset_converts_plain_text_to_utf8(tmp_path: Path) -> None:
    raw = crlf("""
        From: a@example.com
        Subject: ascii

        Just ASCII.
        """)
    f = inline_filter(tmp_path, """
        def filter_end(msg):
            msg.append_boilerplate("Grüße")
        """)
    reply = run(runner_for(f), raw, tmp_path)
    # new MIME headers go on top, in this order, so that every reader sees them
    assert reply["actions"][:-1] == [
        ["insert_header", 0, "Content-Transfer-Encoding", "quoted-printable"],
        ["insert_header", 0, "Content-Type", 'text/plain; charset="utf-8"'],
        ["insert_header", 0, "MIME-Version", "1.0"]]  # fmt: skip
    new = rebuilt(reply, tmp_path)
    (part,) = leaves(new)
    assert part.charset == "utf-8" and part.email["Content-Transfer-Encoding"] == "quoted-printable"
    assert text_of(part) == "Just ASCII.\r\nGrüße\r\n"


def test_boilerplate_keeps_the_charset_when_it_fits(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, """
        def filter_end(msg):
            msg.append_boilerplate("Überprüft")
        """)
    reply = run(runner_for(f), SINGLE, tmp_path)
    assert [a[0] for a in reply["actions"]] == ["replace_body"]  # same charset and encoding
    (part,) = leaves(rebuilt(reply, tmp_path))
    assert text_of(part) == "Grüße aus Berlin\r\nÜberprüft\r\n"


def test_boilerplate_on_html_without_body_tag_and_on_an_attachment_only_message(tmp_path: Path) -> None:
    html = crlf("""
        From: a@example.com
        Content-Type: text/html

        <p>hi</p>""")
    f = inline_filter(tmp_path, """
        def filter_end(msg):
            msg.append_boilerplate("a < b")
        """)
    (part,) = leaves(rebuilt(run(runner_for(f), html, tmp_path), tmp_path))
    assert text_of(part) == "<p>hi</p>\r\n<p>a &lt; b</p>\r\n"
    only = crlf("""
        From: a@example.com
        Content-Type: application/pdf; name="x.pdf"
        Content-Disposition: attachment; filename="x.pdf"
        Content-Transfer-Encoding: base64

        JVBERi0xLjQK
        """)
    new = rebuilt(run(runner_for(f), only, tmp_path), tmp_path)
    pdf, text = leaves(new)
    assert pdf.payload == b"%PDF-1.4\n" and pdf.filename == "x.pdf"
    assert text_of(text) == "a < b"


def test_dropping_the_only_part_leaves_an_empty_text_body(tmp_path: Path) -> None:
    only = crlf("""
        From: a@example.com
        Content-Type: application/x-msdownload; name="x.exe"
        Content-Disposition: attachment; filename="x.exe"
        Content-Transfer-Encoding: base64

        TVqQAA==
        """)
    f = inline_filter(tmp_path, """
        def filter_part(msg, part):
            part.drop()
        """)
    reply = run(runner_for(f), only, tmp_path)
    assert [a[:2] for a in reply["actions"][:-1]] == [
        ["change_header", "Content-Type"], ["change_header", "Content-Transfer-Encoding"],
        ["delete_header", "Content-Disposition"], ["insert_header", 0]]  # fmt: skip
    (part,) = leaves(rebuilt(reply, tmp_path))
    assert part.content_type == "text/plain" and part.payload == b"" and part.disposition is None


def test_dropping_every_part_of_a_nested_multipart_drops_it(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, """
        def filter_part(msg, part):
            if part.parent and part.parent.content_type == "multipart/signed":
                part.drop(force=True)
        """)
    new = rebuilt(run(runner_for(f), MIXED, tmp_path), tmp_path)
    assert [p.content_type for p in walk(PARSER.parsebytes(new))] == [
        "multipart/mixed", "text/plain", "application/octet-stream"]  # fmt: skip


# The inner multipart reuses the outer boundary: the stdlib ends it early and the
# last attachment lands in the epilogue; the walk finds it there.
HIDDEN_IN_EPILOGUE = crlf("""
    From: a@example.com
    Content-Type: multipart/mixed; boundary="same"

    --same
    Content-Type: multipart/alternative; boundary="same"

    --same
    Content-Type: text/plain

    text
    --same--
    --same
    Content-Type: application/x-msdownload; name="hidden.exe"

    MZ
    --same
    Content-Type: text/plain; name="kept.txt"

    kept
    --same--
    """)


def test_a_part_hidden_in_an_epilogue_becomes_a_regular_part(tmp_path: Path) -> None:
    raw = HIDDEN_IN_EPILOGUE
    f = inline_filter(tmp_path, """
        def filter_part(msg, part):
            if part.has_extension(["exe"]):
                part.drop()
        """)
    runner = runner_for(f)
    original = [p.filename for p in leaves(spool_form(raw))]
    assert "hidden.exe" in original
    new = rebuilt(run(runner, raw, tmp_path), tmp_path)
    got = leaves(new)
    assert [p.filename for p in got] == [n for n in original if n != "hidden.exe"]
    assert "kept.txt" in [p.filename for p in got]
    assert not any(p.hidden for p in walk(PARSER.parsebytes(new))), "nothing hidden any more"


def test_a_base64_encoded_enclosed_message_is_rebuilt_and_encoded_again(tmp_path: Path) -> None:
    inner = crlf("""
        Subject: inner
        Content-Type: multipart/mixed; boundary="in"

        --in
        Content-Type: text/plain

        inner text
        --in
        Content-Type: application/x-msdownload; name="evil.exe"

        MZ
        --in--
        """)
    raw = crlf("""
        From: a@example.com
        Content-Type: multipart/mixed; boundary="out"

        --out
        Content-Type: text/plain

        outer
        --out
        Content-Type: message/rfc822
        Content-Transfer-Encoding: base64

        """) + base64.encodebytes(inner).replace(b"\n", b"\r\n") + b"--out--\r\n"
    f = inline_filter(tmp_path, """
        def filter_part(msg, part):
            if part.has_extension(["exe"]):
                part.drop()
        """)
    new = rebuilt(run(runner_for(f), raw, tmp_path), tmp_path)
    container = [p for p in walk(PARSER.parsebytes(new)) if p.content_type == "message/rfc822"][0]
    assert container.email["Content-Transfer-Encoding"] == "base64"
    got = [(p.content_type, p.filename) for p in walk(PARSER.parsebytes(new)) if not p.is_multipart]
    assert got == [("text/plain", None), ("text/plain", None)]
    assert [text_of(p) for p in leaves(new)] == ["outer", "inner text"]


def test_dropping_the_last_part_of_a_multipart_without_close_delimiter(tmp_path: Path) -> None:
    raw = crlf("""
        From: a@example.com
        Content-Type: multipart/mixed; boundary="b"

        --b
        Content-Type: text/plain

        first
        --b
        Content-Type: application/zip; name="z.zip"

        PK
        """)
    f = inline_filter(tmp_path, """
        def filter_part(msg, part):
            if part.filename:
                part.drop()
        """)
    got = leaves(rebuilt(run(runner_for(f), raw, tmp_path), tmp_path))
    assert [(p.content_type, text_of(p)) for p in got] == [("text/plain", "first")]


# --- signed messages ------------------------------------------------------------------------

SIGNED = crlf("""
    From: a@example.com
    MIME-Version: 1.0
    Content-Type: multipart/signed; protocol="application/pkcs7-signature"; micalg=sha-256;
     boundary="s"

    --s
    Content-Type: multipart/mixed; boundary="m"

    --m
    Content-Type: text/plain

    signed body
    --m
    Content-Type: application/zip; name="a.zip"
    Content-Transfer-Encoding: base64

    UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA==
    --m--
    --s
    Content-Type: application/pkcs7-signature; name="smime.p7s"
    Content-Transfer-Encoding: base64

    MIAGCSqGSIb3DQEHAqCAMIACAQExDzANBglghkgBZQMEAgEFADCABgkqhkiG9w0BBwEAAKCAMIIB
    --s--
    """)


@pytest.mark.parametrize("action", [
    "part.drop()", "part.drop_with_warning('w')", "part.replace('x')", "msg.add_part('x')",
    "msg.append_boilerplate('x')",
])  # fmt: skip
def test_body_changes_to_a_signed_message_are_refused(action: str, tmp_path: Path, caplog) -> None:
    f = inline_filter(tmp_path, f"""
        def filter_part(msg, part):
            if part.content_type == "application/zip":
                msg.add_header("X-Header-Changes", "are fine")
                {action}
        """)
    reply = run(runner_for(f), SIGNED, tmp_path)
    assert reply["verdict"] == verdict_to_wire(ON_ERROR) and reply["actions"] == []
    assert "SignedMessageError: the message is multipart/signed" in reply["error"]
    assert "pass force=True" in reply["error"]


def test_force_changes_a_signed_message_and_header_changes_need_none(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, """
        from defang import SignedMessageError
        def filter_part(msg, part):
            if part.content_type == "application/zip":
                msg.add_header("X-Signed", str(msg.is_signed))
                try:
                    part.drop()
                except SignedMessageError:
                    part.drop(force=True)
        """)
    reply = run(runner_for(f), SIGNED, tmp_path)
    assert reply["actions"][0] == ["add_header", "X-Signed", "True"]
    got = leaves(rebuilt(reply, tmp_path))
    assert [p.content_type for p in got] == ["text/plain", "application/pkcs7-signature"]


def test_a_part_inside_a_nested_signed_entity_is_protected_but_its_neighbours_are_not(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, """
        from defang import SignedMessageError
        REFUSED = []
        def filter_part(msg, part):
            if part.content_type == "application/pgp-signature":
                try:
                    part.drop()
                except SignedMessageError as exc:
                    REFUSED.append(str(exc))
            elif part.filename:
                part.drop()
        """)
    runner = runner_for(f)
    new = rebuilt(run(runner, MIXED, tmp_path), tmp_path)
    assert runner.loaded.module.REFUSED == [
        "part 4 (application/pgp-signature) is inside a multipart/signed entity: changing it would break "
        "the signature; pass force=True to change it anyway"]  # fmt: skip
    assert [p.content_type for p in leaves(new)] == ["text/plain", "text/plain", "application/pgp-signature"]


def test_boilerplate_passes_over_a_body_inside_a_signed_entity(tmp_path: Path) -> None:
    raw = crlf("""
        From: a@example.com
        Content-Type: multipart/mixed; boundary="m"

        --m
        Content-Type: multipart/signed; protocol="application/pgp-signature"; boundary="s"

        --s
        Content-Type: text/plain

        signed text
        --s
        Content-Type: application/pgp-signature

        sig
        --s--
        --m--
        """)
    f = inline_filter(tmp_path, """
        def filter_end(msg):
            assert msg.append_boilerplate("-- boilerplate --") == []
        """)
    new = rebuilt(run(runner_for(f), raw, tmp_path), tmp_path)
    signed = raw[raw.index(b"Content-Type: multipart/signed") : raw.index(b"--s--") + 5]
    assert signed in new
    assert [text_of(p) for p in leaves(new)] == ["signed text", "sig", "-- boilerplate --"]


def test_pkcs7_mime_message_is_signed_too(tmp_path: Path) -> None:
    raw = crlf("""
        From: a@example.com
        Content-Type: application/pkcs7-mime; smime-type=signed-data; name="smime.p7m"
        Content-Transfer-Encoding: base64

        MIAGCSqGSIb3DQEHAqCAMIACAQE=
        """)
    f = inline_filter(tmp_path, """
        def filter_end(msg):
            msg.add_header("X-Signed", str(msg.is_signed))
            msg.append_boilerplate("x")
        """)
    reply = run(runner_for(f), raw, tmp_path)
    assert "SignedMessageError" in reply["error"]


# --- errors ----------------------------------------------------------------------------------


def test_bad_arguments_raise_in_the_filters_call(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, """
        def filter_end(msg):
            msg.add_part("x", "multipart/mixed")
        """)
    reply = run(runner_for(f), SINGLE, tmp_path)
    assert "ValueError: a new part must be a leaf, not multipart/mixed" in reply["error"]
    from defang.workers.mime.limits import PartActionError

    part = next(walk(PARSER.parsebytes(SINGLE)))
    with pytest.raises(PartActionError):
        part.drop()


def test_a_failing_rebuild_is_a_tempfail_not_a_lost_message(tmp_path: Path, monkeypatch, caplog) -> None:
    from defang.workers.mime import rebuild

    def broken(msg, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rebuild, "rebuild", broken)
    f = inline_filter(tmp_path, """
        def filter_end(msg):
            msg.add_header("X-A", "1")
            msg.append_boilerplate("x")
        """)
    reply = run(runner_for(f), SINGLE, tmp_path, queue_id="QFULL")
    assert reply["verdict"]["action"] == "tempfail" and reply["verdict"]["code"] == "451"
    assert reply["actions"] == [] and "No space left on device" in reply["error"]
    assert "QFULL: conn 7: could not store or rewrite the message" in caplog.text


def test_no_rebuild_when_the_verdict_is_not_to_deliver(tmp_path: Path) -> None:
    f = inline_filter(tmp_path, """
        def filter_end(msg):
            msg.append_boilerplate("x")
            msg.discard()
        """)
    reply = run(runner_for(f), SINGLE, tmp_path)
    assert reply["verdict"]["action"] == "discard" and reply["actions"] == []
