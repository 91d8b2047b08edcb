"""Archive listing with limits: zip bombs and nesting are a verdict, never an outage."""

from __future__ import annotations

import base64
import bz2
import gzip
import io
import logging
import resource
import struct
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from test_mime_rewrite import crlf, inline_filter, rebuilt, run, runner_for

from defang.workers.mime.archives import archive_kind, list_archive
from defang.workers.mime.limits import MimeLimitError, MimeLimits

MB = 1000 * 1000


def make_zip(members: list[tuple[str, bytes]], *, encrypt_flag: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name, data in members:
            zf.writestr(name, data)
    data = bytearray(buf.getvalue())
    if encrypt_flag:  # mark every central directory entry encrypted (flag bit 0)
        pos = data.find(b"PK\x01\x02")
        while pos >= 0:
            data[pos + 8] |= 1
            pos = data.find(b"PK\x01\x02", pos + 4)
    return bytes(data)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A 100 MB member of zeros, deflated (about 100 KB)."""
    return make_zip([("zeros.bin", bytes(100 * MB))])


def test_recognised_by_content_not_name() -> None:
    assert archive_kind(make_zip([("a", b"x")])) == "zip"
    assert archive_kind(gzip.compress(b"x")) == "gzip"
    assert archive_kind(bz2.compress(b"x")) == "bzip2"
    assert archive_kind(b"Rar!\x1a\x07\x01\x00rest") == "rar"
    assert archive_kind(b"%PDF-1.4") is None and list_archive(b"%PDF-1.4") is None


def test_nested_zip_members_are_listed_with_their_path() -> None:
    inner = make_zip([("invoice.pdf.exe", b"MZ" * 50)])
    outer = make_zip([("readme.txt", b"hello"), ("docs/inner.zip", inner)])
    listing = list_archive(outer)
    assert [m.path for m in listing] == ["readme.txt", "docs/inner.zip", "docs/inner.zip/invoice.pdf.exe"]
    assert [m.depth for m in listing] == [1, 1, 2]
    assert listing.has_extension(["exe"]) and not listing.errors
    assert listing.expanded == 5 + len(inner) + 100


def test_zip_bomb_is_a_limit_not_an_outage(bomb: bytes) -> None:
    assert len(bomb) < 200_000
    limits = MimeLimits(max_archive_expansion=10 * MB)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    with pytest.raises(MimeLimitError) as info:
        list_archive(bomb, limits, name="bomb.zip")
    assert time.monotonic() - started < 1.0, "decided from the central directory, nothing inflated"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB: no 100 MB buffer
    assert info.value.limit == "max_archive_expansion" and info.value.value == 100 * MB
    assert "archive 'bomb.zip'" in str(info.value)
    # with the defaults (100 MiB) the same zip is fine: 100 MB < 100 MiB
    assert list_archive(bomb).expanded == 100 * MB


def test_nested_bomb_counts_every_level(bomb: bytes) -> None:
    outer = make_zip([("a.zip", bomb), ("b.zip", bomb)])
    with pytest.raises(MimeLimitError, match="max_archive_expansion exceeded: 200"):
        list_archive(outer)


def test_nesting_deeper_than_max_archive_depth() -> None:
    data = make_zip([("core.txt", b"x")])
    for level in range(4):
        data = make_zip([(f"level{level}.zip", data)])
    with pytest.raises(MimeLimitError) as info:
        list_archive(data)  # default max_archive_depth 3
    assert info.value.limit == "max_archive_depth" and info.value.value == 4
    assert len(list_archive(data, MimeLimits(max_archive_depth=5))) == 5


def test_member_count_is_checked_before_zipfile_reads_the_directory() -> None:
    many = make_zip([(f"f{i}.txt", b"") for i in range(300)])
    with pytest.raises(MimeLimitError, match="max_archive_members exceeded"):
        list_archive(many, MimeLimits(max_archive_members=100))
    # a directory that holds more entries than its end record declares is counted too
    eocd = many.rfind(b"PK\x05\x06")
    lying = many[: eocd + 8] + struct.pack("<HH", 5, 5) + many[eocd + 12 :]
    with pytest.raises(MimeLimitError, match="max_archive_members exceeded: 101"):
        list_archive(lying, MimeLimits(max_archive_members=100))


def test_a_zip_that_lies_about_sizes_never_inflates_past_the_declared_size() -> None:
    big = make_zip([("inner.zip", make_zip([("x", bytes(5 * MB))]))])
    # declare the nested zip (the member) much smaller than it is
    info = zipfile.ZipFile(io.BytesIO(big)).infolist()[0]
    real = struct.pack("<L", info.file_size)
    lying = big.replace(real, struct.pack("<L", 40))
    listing = list_archive(lying)
    assert listing.errors and "unreadable" in listing.errors[0]  # CRC/size mismatch: noted, not read
    assert [m.name for m in listing] == ["inner.zip"]


def test_damaged_and_encrypted_archives_are_listings_with_errors() -> None:
    broken = list_archive(b"PK\x03\x04" + b"\0" * 100)
    assert broken.kind == "zip" and broken.members == [] and "unreadable zip" in broken.errors[0]
    enc = list_archive(make_zip([("secret.exe", b"MZ" * 100)], encrypt_flag=True))
    assert enc.encrypted and enc.names == ["secret.exe"] and enc.has_extension(["exe"])
    assert list_archive(b"Rar!\x1a\x07\x00" + b"\0" * 50).errors == [
        "the attachment: rar archives cannot be listed"]  # fmt: skip


def test_tar_gz_and_gzip_bombs() -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for name in ("a.txt", "b/run.exe"):
            ti = tarfile.TarInfo(name)
            ti.size = 3
            tf.addfile(ti, io.BytesIO(b"abc"))
    listing = list_archive(buf.getvalue())
    assert listing.kind == "gzip" and listing.names == ["a.txt", "b/run.exe"]
    assert listing.has_extension(["exe"])
    single = list_archive(gzip.compress(b"hello" * 1000), name="x.txt.gz")
    assert [(m.name, m.size) for m in single] == [("(compressed data)", 5000)]
    with pytest.raises(MimeLimitError, match="max_archive_expansion"):
        list_archive(gzip.compress(bytes(30 * MB)), MimeLimits(max_archive_expansion=10 * MB))


# --- through the filter: part.archive() and the verdict ----------------------------------------


def zip_message(data: bytes, name: str = "files.zip") -> bytes:
    return crlf(f"""
        From: a@example.com
        To: b@example.org
        Subject: archive
        Content-Type: multipart/mixed; boundary="b"

        --b
        Content-Type: text/plain

        see attached
        --b
        Content-Type: application/zip; name="{name}"
        Content-Disposition: attachment; filename="{name}"
        Content-Transfer-Encoding: base64

        """) + base64.encodebytes(data).replace(b"\n", b"\r\n") + b"--b--\r\n"


ARCHIVE_FILTER = """
    from defang import DANGEROUS_EXTENSIONS
    def filter_part(msg, part):
        listing = part.archive()
        if listing is not None and listing.has_extension(DANGEROUS_EXTENSIONS):
            part.replace(f"{part.filename} held an executable and was removed.",
                         filename=part.filename + ".txt")
    """


def test_exe_inside_a_nested_zip_is_replaced(tmp_path: Path) -> None:
    data = make_zip([("inner.zip", make_zip([("evil.exe", b"MZ")]))])
    reply = run(runner_for(inline_filter(tmp_path, ARCHIVE_FILTER)), zip_message(data), tmp_path)
    new = rebuilt(reply, tmp_path)
    assert b"files.zip held an executable and was removed." in new
    assert b"application/zip" not in new


def test_zip_bomb_gets_the_on_limit_verdict_with_the_queue_id(bomb: bytes, tmp_path: Path, caplog) -> None:
    from defang.core import config

    cfg = config.finish(config.Config(mime_max_archive_expansion=10 * MB, runtime_dir=tmp_path))
    runner = runner_for(inline_filter(tmp_path, ARCHIVE_FILTER), config=cfg)
    with caplog.at_level(logging.WARNING, logger="defang.worker"):
        reply = run(runner, zip_message(bomb), tmp_path, queue_id="4XyBomb")
    assert reply["verdict"] == {"action": "reject", "code": "554", "dsn": "5.6.0",
                                "text": "Message structure exceeds local limits"}  # fmt: skip
    assert reply["actions"] == [] and "error" not in reply
    assert "4XyBomb: conn 7: message passed a MIME limit in filter_part: max_archive_expansion exceeded: " \
        "100000000 > 10000000 (archive 'files.zip'); answering 554 5.6.0" in caplog.text  # fmt: skip
