"""The walk parses a message's structure with its long bodies left in the spool file.

``defang.workers.mime.skeleton`` replaces long runs of body lines by stand-in lines before the
stdlib parser sees the message.  What a filter sees must not change: the same parse,
the same parts, the same payloads, the same rebuilt body -- for every corpus message,
with the threshold at 1 byte so that every run that may be replaced is replaced.
"""

from __future__ import annotations

import base64
import email.policy
import io
import json
import os
import random
import re
from email.message import Message as EmailMessage
from email.parser import BytesParser
from pathlib import Path
from typing import Any

import pytest
from paths import CORPUS, FILTERS, REPO
from test_mime_rewrite import DROP_ALL, rebuilt, run, runner_for

from defang.core import config
from defang.workers.api.conn import Connection
from defang.workers.api.message import Message
from defang.workers.mime import skeleton
from defang.workers.mime.limits import MimeLimitError, MimeLimits

PARSER = BytesParser(policy=email.policy.default)
EVERY_HOOK = FILTERS / "every_hook.py"


def dump(entity: EmailMessage) -> list[Any]:
    """Everything the parser built: headers, defects, preamble, epilogue, payload text."""
    out: list[Any] = []
    stack = [(entity, 0)]
    while stack:
        node, depth = stack.pop()
        out.append((depth, list(node.raw_items()), [type(d).__name__ for d in node.defects], node.preamble,
                    node.epilogue))  # fmt: skip
        if isinstance(node._payload, list):
            stack.extend((child, depth + 1) for child in reversed(node._payload))
        else:
            out.append(node._payload)
    return out


def parse_both(path: Path, min_run: int) -> tuple[EmailMessage, EmailMessage, skeleton.Spans | None]:
    with open(path, "rb") as f:
        whole = PARSER.parse(f)
    with open(path, "rb") as f:
        tree, spans = skeleton.parse(f, str(path), PARSER, min_run)
    return whole, tree, spans


def check_same(path: Path, min_run: int) -> skeleton.Spans | None:
    """Parsed with stand-ins, then read in: the same as parsed whole."""
    whole, tree, spans = parse_both(path, min_run)
    if spans is not None:
        assert dump(tree) != dump(whole), "stand-ins were made, so the parse differs until read in"
        for start, end, length in spans.runs:
            assert length == len(path.read_bytes()[start:end].replace(b"\r\n", b"\n"))
        spans.materialize(tree)
    assert dump(tree) == dump(whole)
    return spans


def _corpus() -> list[Path]:
    return sorted(CORPUS.glob("*.eml")) if CORPUS.is_dir() else []


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")
@pytest.mark.parametrize("path", _corpus(), ids=lambda p: p.name)
def test_corpus_parse_is_the_same_once_bodies_are_read_in(path: Path, monkeypatch) -> None:
    # small chunks: lines, CRLFs and stop lines cut at every place a chunk can end; a big
    # file gets fewer rounds (the stdlib takes a second to parse one)
    if path.stat().st_size < 256 * 1024:
        rounds = ((1, (1,)), (3, (1,)), (64, (1, 64)), (skeleton.CHUNK, (1, 64, 4096)))
    else:
        rounds = ((7, (1,)), (skeleton.CHUNK, (1, 4096)))
    for chunk, min_runs in rounds:
        monkeypatch.setattr(skeleton, "CHUNK", chunk)
        for min_run in min_runs:
            check_same(path, min_run)
    # blocks of equal lines taken wherever there are two such lines
    monkeypatch.setattr(skeleton, "_BLOCK_MIN", 1)
    monkeypatch.setattr(skeleton, "_REGEX_STEP", 1)
    monkeypatch.setattr(skeleton, "_FIRST_PIECE_LINES", 1)
    for chunk in {rounds[1][0], skeleton.CHUNK}:
        monkeypatch.setattr(skeleton, "CHUNK", chunk)
        check_same(path, 1)


def reference_scan(data: bytes) -> tuple[Any, ...]:
    """What ``skeleton._scan`` must find, by the plainest means: regexes over the whole file."""
    stops = [m.start() for m in re.finditer(rb"\n(?=-|\r?\n)", data)]
    if b"\n" in data:
        stops.append(data.rfind(b"\n"))
    first = data.find(b"\n")
    return (stops, [data.count(b"\r", 0, p) for p in stops], [p > 0 and data[p - 1] == 13 for p in stops],
            [m.start() for m in re.finditer(rb"\r(?!\n)", data)], first,
            data.count(b"\r", 0, first) if first >= 0 else 0, len(data))  # fmt: skip


def found(data: bytes, chunk: int) -> tuple[Any, ...]:
    s = skeleton._scan(io.BytesIO(data), chunk)
    return s.stops, s.crs, s.crlf, s.bare_crs, s.first_eol, s.first_crs, s.size


# What breaks a block of equal lines, put in at random places: each is a line a run may
# not hold, or a line end the block's checks must notice.
FLAWS = (b"\n", b"\r", b"\r\n", b"-", b"\n-", b"\r\n-", b"\r\n\r\n", b"\n\n", b"\rx", b"x\n", b"--b\r\n")


def random_body(rnd: random.Random) -> bytes:
    """Blocks of equal lines (base64-like, CRLF or LF, some one line short) with flaws."""
    out = bytearray()
    for _ in range(rnd.randint(1, 6)):
        width = rnd.choice((1, 2, 3, 5, 76, rnd.randint(1, 120)))
        eol = rnd.choice((b"\r\n", b"\n", b"\r\n", b"\r"))
        line = bytes(rnd.choice(b"ABCxyz019+/=") for _ in range(width))
        block = bytearray((line + eol) * rnd.randint(1, 400))
        for _ in range(rnd.choice((0, 0, 1, 2, 5))):
            at = rnd.randrange(len(block))
            how = rnd.choice(("insert", "overwrite", "move a CR"))
            if how == "move a CR" and b"\r" in block[at:]:  # "ab\r\n" -> "a\rb\n": same counts
                cr = block.index(b"\r", at)
                block[cr - 1 : cr + 1] = block[cr : cr + 1] + block[cr - 1 : cr] if cr else block[0:1]
            else:
                flaw = rnd.choice(FLAWS)
                block[at : at + (len(flaw) if how == "overwrite" else 0)] = flaw
        out += block
    return bytes(out)


@pytest.mark.parametrize("seed", range(100))
def test_blocks_and_regexes_find_the_same_as_a_whole_file_regex(seed: int, monkeypatch) -> None:
    rnd = random.Random(seed)
    data = random_body(rnd)
    want = reference_scan(data)
    # the shipped sizes, then tiny ones: blocks of a line or two, chunks cut anywhere
    shipped = (skeleton._BLOCK_MIN, skeleton._REGEX_STEP, skeleton._FIRST_PIECE_LINES, skeleton._PIECE_MAX)
    for block_min, step, piece, piece_max in (shipped, (1, 1, 1, 1 << 30), (8, 16, 2, 40), (64, 200, 4, 300)):
        monkeypatch.setattr(skeleton, "_BLOCK_MIN", block_min)
        monkeypatch.setattr(skeleton, "_REGEX_STEP", step)
        monkeypatch.setattr(skeleton, "_FIRST_PIECE_LINES", piece)
        monkeypatch.setattr(skeleton, "_PIECE_MAX", piece_max)
        tiny = (1, 2, 3) if len(data) < 20_000 else ()  # a chunk of a byte is slow to read
        for chunk in (*tiny, 7, 100, rnd.randint(1, 5000), 1 << 20):
            assert found(data, chunk) == want, (block_min, step, piece, piece_max, chunk)


def test_a_base64_attachment_is_read_as_blocks(monkeypatch) -> None:
    """The fast way is the one taken: nearly all of a 1 MB attachment is in blocks."""
    blob = base64.encodebytes(random.Random(1).randbytes(768 * 1024)).replace(b"\n", b"\r\n")
    data = b"Content-Type: application/pdf\r\n\r\n" + blob + b"--b1--\r\n"
    by_regex: list[int] = []
    regexes = skeleton._Scan._regexes

    def counted(self: skeleton._Scan, buf: bytes, start: int, end: int) -> None:
        by_regex.append(end - start)
        regexes(self, buf, start, end)

    monkeypatch.setattr(skeleton._Scan, "_regexes", counted)
    assert found(data, skeleton.CHUNK) == reference_scan(data)
    assert sum(by_regex) < 0.05 * len(data)


def _filter_view(runner_path: Path, raw: bytes, tmp_path: Path, monkeypatch, min_run: int) -> tuple[Any, ...]:
    monkeypatch.setattr(skeleton, "MIN_RUN", min_run)  # new boundaries come from the message's digest
    runner = runner_for(runner_path)
    out = tmp_path / str(min_run)
    out.mkdir(parents=True)
    reply = run(runner, raw, out)
    module = runner.loaded.module
    seen = json.loads(json.dumps(module.SEEN, default=repr))
    actions = [a for a in reply["actions"] if a[0] != "replace_body"]
    return reply["verdict"], actions, seen, rebuilt(reply, out)


@pytest.mark.skipif(not CORPUS.is_dir(), reason=f"corpus not found at {CORPUS}")
@pytest.mark.parametrize("path", _corpus(), ids=lambda p: p.name)
def test_corpus_filters_see_and_rebuild_the_same(path: Path, tmp_path: Path, monkeypatch) -> None:
    raw = path.read_bytes()
    for filter_path in (EVERY_HOOK, DROP_ALL):
        whole = _filter_view(filter_path, raw, tmp_path / filter_path.stem, monkeypatch, 1 << 40)
        stood_in = _filter_view(filter_path, raw, tmp_path / filter_path.stem, monkeypatch, 1)
        assert stood_in == whole


# --- a big attachment: parsed without its body, read when asked for --------------------


def big_message(tmp_path: Path, attachment: bytes, name: str = "report.pdf") -> Message:
    b64 = base64.encodebytes(attachment).replace(b"\n", b"\r\n")
    raw = (b"From: a@example.org\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
           b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\npreamble\r\n'
           b"--b1\r\nContent-Type: text/plain\r\n\r\nHello.\r\n"
           b"--b1\r\nContent-Type: application/pdf\r\nContent-Disposition: attachment; "
           b'filename="' + name.encode() + b'"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
           + b64 + b"--b1--\r\n")  # fmt: skip
    path = tmp_path / "big.eml"
    path.write_bytes(raw)
    return Message(Connection(), sender="a@example.org", recipients=["b@example.org"], queue_id="Q",
                   path=str(path))  # fmt: skip


def test_a_big_attachment_is_not_parsed_until_read(tmp_path: Path) -> None:
    blob = os.urandom(3 * 1024 * 1024)
    msg = big_message(tmp_path, blob)
    parts = msg.parts
    assert [p.content_type for p in parts] == ["multipart/mixed", "text/plain", "application/pdf"]
    assert parts[2].filename == "report.pdf" and parts[2].is_attachment
    assert msg._spans is not None and len(msg._spans) == 1
    stand_in = parts[2].head.get_payload()
    assert len(stand_in) < 100, "the parser got a stand-in, not 4 MB of base64"
    assert parts[2].payload == blob
    assert parts[2].email.get_payload(decode=True) == blob
    assert msg.email is parts[0].email
    assert msg.email.get_payload()[0].get_content() == "Hello."


def test_a_big_message_is_scanned_without_fresh_pages_per_chunk(tmp_path: Path) -> None:
    """With the workers' malloc settings (a fixed mmap threshold), scanning a 7 MB
    message reuses the heap's pages: a chunk size at the threshold made every chunk a
    new mapping, ~3,500 page faults per scan and twice the CPU."""
    import subprocess
    import sys

    big_message(tmp_path, os.urandom(5 * 1024 * 1024))
    script = """if True:
        import resource, sys
        from defang.core import malloc
        from defang.workers.mime import skeleton
        malloc.fix_mmap_threshold()  # as the zygote does
        def scan():
            with open(sys.argv[1], "rb") as f:
                assert skeleton.reduce(f, sys.argv[1]) is not None
        scan()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            scan()
        print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 3)
    """
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.eml")], check=True,
                         capture_output=True, text=True, cwd=REPO)  # fmt: skip
    faults = int(out.stdout)
    assert faults < 500, f"{faults} page faults per scan of a 7 MB message"


def test_the_size_limit_counts_bodies_still_in_the_file(tmp_path: Path) -> None:
    msg = big_message(tmp_path, os.urandom(300 * 1024))
    msg.limits = MimeLimits(max_decoded_size=200 * 1024)
    with pytest.raises(MimeLimitError) as caught:
        _ = msg.parts
    assert caught.value.limit == "max_decoded_size"


def test_bare_cr_in_a_body_keeps_its_lines_from_being_stood_in(tmp_path: Path) -> None:
    # a bare CR is a line end to the parser: the "--b1" after it is a delimiter
    body = b"x" * 70 + b"\r\n"
    raw = (b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n--b1\r\n\r\n' + body * 2000
           + b"hidden\r--b1\r\nContent-Type: application/x-msdownload; name=\"a.exe\"\r\n\r\nMZ\r\n"
           + body * 2000 + b"--b1--\r\n")  # fmt: skip
    path = tmp_path / "cr.eml"
    path.write_bytes(raw)
    whole, tree, spans = parse_both(path, 1024)
    if spans is not None:
        spans.materialize(tree)
    assert dump(tree) == dump(whole)
    assert [p.get_content_type() for p in whole.walk()][-1] == "application/x-msdownload"


def test_a_run_that_starts_a_header_section_ends_it_as_the_original_does(tmp_path: Path) -> None:
    # message/rfc822 and message/delivery-status: what follows the blank line is parsed as headers
    lines = b"".join(b"line %d of a body without any header in it\r\n" % i for i in range(3000))
    raw = (b'Content-Type: multipart/report; boundary="r"\r\n\r\n'
           b"--r\r\nContent-Type: message/rfc822\r\n\r\n" + lines
           + b"--r\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n" + lines
           + b"\r\nFinal-Recipient: rfc822; b@example.org\r\n" + lines
           + b"--r\r\nContent-Type: text/plain\r\n\r\nSubject: a header-looking first line\r\n" + lines
           + b"--r--\r\n")  # fmt: skip
    path = tmp_path / "report.eml"
    path.write_bytes(raw)
    whole, tree, spans = parse_both(path, 1024)
    assert spans is not None and len(spans) >= 4
    spans.materialize(tree)
    assert dump(tree) == dump(whole)


def test_a_token_written_in_a_message_is_only_text(tmp_path: Path) -> None:
    # on a line a run does not start with (it looks like a header field): the parser
    # sees the forged token beside the real one
    forged = b"Forged: \x7fdefang-span-0123456789ab.0\x7f"
    raw = b"Subject: x\r\n\r\n" + forged + b"\r\n" + (b"y" * 70 + b"\r\n") * 1000
    path = tmp_path / "forged.eml"
    path.write_bytes(raw)
    whole, tree, spans = parse_both(path, 1)
    assert spans is not None and len(spans) == 1
    stood_in = tree.get_payload()
    assert stood_in.count("\x7fdefang-span-") == 2
    assert spans.length(stood_in) == len(whole.get_payload())
    spans.materialize(tree)
    assert dump(tree) == dump(whole)
    assert tree.get_payload().startswith(forged.decode("ascii"))


def test_on_limit_applies_to_a_big_message_through_the_runner(tmp_path: Path) -> None:
    """The limit counts the attachment still in the file: on_limit, not an accept."""
    on_limit = config.ReplySpec("552", "5.3.4", "Too big decoded")
    cfg = config.finish(config.Config(runtime_dir=tmp_path, mime_on_limit=on_limit,
                                      mime_max_decoded_size=200 * 1024))  # fmt: skip
    runner = runner_for(EVERY_HOOK, config=cfg)
    msg = big_message(tmp_path, os.urandom(300 * 1024))
    reply = run(runner, Path(msg.path).read_bytes(), tmp_path, spooled=True)
    assert reply["verdict"] == {"action": "reject", "code": "552", "dsn": "5.3.4", "text": "Too big decoded"}
