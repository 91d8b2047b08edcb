"""What is inside an attached archive, found without extracting anything to disk.

Why this shape: a filter wants the member names (``invoice.pdf.exe`` inside
``invoice.zip``), but an archive is the classic way to make a filter do unbounded
work (zip bombs, 42.zip-style nesting, a million tiny entries).  So:

* zip: the central directory is counted *before* ``zipfile`` reads it (``zipfile``
  builds one object per entry, so a huge directory would cost memory up front);
  member sizes are the declared ones, summed over every level against
  ``max_archive_expansion`` before anything is decompressed.  Only nested archives
  are decompressed (in memory, in chunks, never beyond the declared size and the
  remaining budget), and only ``max_archive_depth`` levels deep.
* tar, tar.gz/.bz2/.xz, bare .gz/.bz2/.xz: the stream is decompressed in chunks
  through a counter that stops at the remaining expansion budget.
* rar and 7z are recognised but not listed (``errors`` says so): a filter may treat
  an archive it cannot look into as suspicious.

Passing a limit raises ``MimeLimitError`` (the message gets ``[mime] on_limit``).
A damaged archive is not an exception: its listing carries ``errors``.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from defang.workers.mime.filenames import has_extension
from defang.workers.mime.limits import MimeLimitError, MimeLimits, exceeds

_CHUNK = 64 * 1024
_EOCD = struct.Struct("<4s4H2LH")  # end of central directory record
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")
_CDIR_ENTRY = struct.Struct("<4s6H3L5H2L")  # central directory file header (46 bytes)
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}


@dataclass(frozen=True, slots=True)
class ArchiveMember:
    """One entry of an archive.

    ``size`` is the uncompressed size the archive declares; ``depth`` is 1 for the
    entries of the attached archive, 2 for those of an archive inside it, and so on;
    ``container`` names the enclosing archives inside the attachment.
    """

    #: the member's name as the archive stores it (a path inside the archive)
    name: str
    #: its uncompressed size, as the archive declares it
    size: int
    #: its size inside the archive
    compressed_size: int
    #: True when its content is encrypted (it cannot be inspected)
    encrypted: bool = False
    #: True for a directory entry
    is_dir: bool = False
    #: 1 for an entry of the attached archive, 2 for one of an archive inside it, ...
    depth: int = 1
    #: the names of the archives it is inside, below the attachment (() at depth 1)
    container: tuple[str, ...] = ()

    @property
    def path(self) -> str:
        """``inner.zip/evil.exe``: the member's name below the attachment."""
        return "/".join((*self.container, self.name))


@dataclass(slots=True)
class ArchiveListing:
    """Every member of an archive and its nested archives, plus what could not be read."""

    #: the archive's format by content: "zip", "tar", "gzip", "bzip2", "xz", "rar", "7z"
    kind: str
    #: every entry, nested archives' entries included (each with its ``depth``)
    members: list[ArchiveMember] = field(default_factory=list)
    #: what could not be read (a corrupt or unsupported nested archive, ...)
    errors: list[str] = field(default_factory=list)
    #: uncompressed bytes, summed over every level
    expanded: int = 0

    def __iter__(self) -> Iterator[ArchiveMember]:
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    @property
    def encrypted(self) -> bool:
        """True when any member is encrypted (its content cannot be inspected)."""
        return any(m.encrypted for m in self.members)

    @property
    def names(self) -> list[str]:
        """Every member's ``name``, in order."""
        return [m.name for m in self.members]

    def has_extension(self, exts: Iterable[str], *, anywhere: bool = False) -> bool:
        """True when a (non-directory) member's name ends in one of ``exts``."""
        exts = list(exts)
        return any(not m.is_dir and has_extension(m.name, exts, anywhere=anywhere) for m in self.members)


class _Budget:
    """What the whole listing (all levels) may still use."""

    def __init__(self, limits: MimeLimits, label: str) -> None:
        self.limits = limits
        self.label = label
        self.members = 0
        self.expanded = 0

    def add_members(self, n: int) -> None:
        self.members += n
        if exceeds(self.members, self.limits.max_archive_members):
            raise MimeLimitError("max_archive_members", self.members, self.limits.max_archive_members,
                                 self.label)  # fmt: skip

    def expand(self, n: int) -> None:
        self.expanded += n
        if exceeds(self.expanded, self.limits.max_archive_expansion):
            raise MimeLimitError("max_archive_expansion", self.expanded,
                                 self.limits.max_archive_expansion, self.label)  # fmt: skip

    def check_depth(self, depth: int) -> None:
        if exceeds(depth, self.limits.max_archive_depth):
            raise MimeLimitError("max_archive_depth", depth, self.limits.max_archive_depth, self.label)

    @property
    def remaining(self) -> int:
        """Bytes that may still be decompressed (a large number when unlimited)."""
        if not self.limits.max_archive_expansion:
            return 1 << 62
        return max(0, self.limits.max_archive_expansion - self.expanded)


# --- recognising ---------------------------------------------------------------------


def archive_kind(data: bytes) -> str | None:
    """"zip", "tar", "gzip", "bzip2", "xz", "rar", "7z" by content (never by name), or None."""
    if data[:4] in (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08"):
        return "zip"
    for magic, kind in _COMPRESSED.items():
        if data.startswith(magic):
            return kind
    if data.startswith(b"Rar!\x1a\x07"):
        return "rar"
    if data.startswith(b"7z\xbc\xaf\x27\x1c"):
        return "7z"
    if data[257:262] == b"ustar":
        return "tar"
    if data[:2] == b"MZ" and _find_eocd(data) is not None:
        return "zip"  # a self-extracting zip: an executable with a zip at its end
    return None


def list_archive(data: bytes, limits: MimeLimits | None = None, *, name: str = "") -> ArchiveListing | None:
    """The listing of ``data`` if it is an archive, else None.

    ``name`` (the attachment's file name) only labels errors and log lines.
    Raises ``MimeLimitError`` past a limit.
    """
    kind = archive_kind(data)
    if kind is None:
        return None
    budget = _Budget(limits or MimeLimits(), f"archive {name!r}" if name else "archive")
    listing = ArchiveListing(kind)
    _list_into(listing, kind, data, budget, depth=1, container=())
    listing.expanded = budget.expanded
    return listing


def _list_into(listing: ArchiveListing, kind: str, data: bytes, budget: _Budget, depth: int,
               container: tuple[str, ...]) -> None:  # fmt: skip
    budget.check_depth(depth)
    where = "/".join(container) or "the attachment"
    if kind == "zip":
        _list_zip(listing, data, budget, depth, container)
    elif kind in ("tar", "gzip", "bzip2", "xz"):
        _list_stream(listing, kind, data, budget, depth, container)
    else:
        listing.errors.append(f"{where}: {kind} archives cannot be listed")


# --- zip -------------------------------------------------------------------------------


def _find_eocd(data: bytes) -> int | None:
    """Offset of the end-of-central-directory record (it may be followed by a comment)."""
    start = max(0, len(data) - (_EOCD.size + 0xFFFF))
    pos = data.rfind(b"PK\x05\x06", start)
    while pos >= 0:
        if pos + _EOCD.size <= len(data):
            comment_len = struct.unpack_from("<H", data, pos + 20)[0]
            if pos + _EOCD.size + comment_len <= len(data):
                return pos
        pos = data.rfind(b"PK\x05\x06", start, pos)
    return None


def _central_directory(data: bytes) -> tuple[int, int, int]:
    """(declared entry count, directory start, directory size); raises ValueError."""
    eocd = _find_eocd(data)
    if eocd is None:
        raise ValueError("no end of central directory (not a zip, or truncated)")
    _sig, _disk, _cd_disk, _n_disk, count, cd_size, cd_offset, _clen = _EOCD.unpack_from(data, eocd)
    end = eocd
    loc = eocd - _EOCD64_LOCATOR.size
    if loc >= 0 and data[loc : loc + 4] == b"PK\x06\x07":
        # the zip64 record sits right before its locator (its offset field may be
        # relative to a prefix, as in a self-extracting archive)
        pos = loc - _EOCD64.size
        if pos >= 0 and data[pos : pos + 4] == b"PK\x06\x06":
            fields = _EOCD64.unpack_from(data, pos)
            count, cd_size = fields[7], fields[8]
            end = pos
    start = end - cd_size
    if start < 0:
        raise ValueError("central directory size points before the start of the data")
    return count, start, cd_size


def _count_entries(data: bytes, start: int, size: int, stop_after: int) -> int:
    """Central directory entries actually present (what ``zipfile`` would build),
    counted without building anything; stops once past ``stop_after``."""
    pos, end, n = start, start + size, 0
    while pos + _CDIR_ENTRY.size <= end and data[pos : pos + 4] == b"PK\x01\x02":
        f = _CDIR_ENTRY.unpack_from(data, pos)
        pos += _CDIR_ENTRY.size + f[10] + f[11] + f[12]
        n += 1
        if stop_after and n > stop_after:
            break
    return n


def _list_zip(listing: ArchiveListing, data: bytes, budget: _Budget, depth: int,
              container: tuple[str, ...]) -> None:  # fmt: skip
    where = "/".join(container) or "the attachment"
    try:
        declared, start, size = _central_directory(data)
    except (ValueError, struct.error) as exc:
        listing.errors.append(f"{where}: unreadable zip: {exc}")
        return
    room = 0
    if budget.limits.max_archive_members:
        room = budget.limits.max_archive_members - budget.members
        if declared > room:
            budget.add_members(declared)  # raises
    present = _count_entries(data, start, size, room)
    budget.add_members(present)  # raises when the directory holds more than it declares
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, NotImplementedError, OSError, EOFError) as exc:
        listing.errors.append(f"{where}: unreadable zip: {exc}")
        return
    with zf:
        infos = zf.infolist()
        budget.expand(sum(i.file_size for i in infos))  # declared sizes: no work done yet
        nested: list[zipfile.ZipInfo] = []
        for info in infos:
            encrypted = bool(info.flag_bits & 0x1)
            listing.members.append(
                ArchiveMember(info.filename, info.file_size, info.compress_size, encrypted,
                              info.is_dir(), depth, container)  # fmt: skip
            )
            if not encrypted and not info.is_dir() and info.file_size >= 22:
                nested.append(info)
        for info in nested:
            head = _read_zip_member(zf, info, 512, listing, where)
            if head is None or archive_kind(head) is None:
                continue
            budget.check_depth(depth + 1)
            body = _read_zip_member(zf, info, info.file_size, listing, where)
            kind = archive_kind(body) if body is not None else None
            if kind is not None:
                _list_into(listing, kind, body, budget, depth + 1, (*container, info.filename))


def _read_zip_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, cap: int, listing: ArchiveListing,
                     where: str) -> bytes | None:  # fmt: skip
    """At most ``cap`` bytes of a member, read in chunks; None (and an error) if unreadable.

    ``zipfile`` never returns more than the declared size, and the declared sizes
    were charged to the budget before this is called, so memory stays bounded even
    when the archive lies about its sizes.
    """
    out = bytearray()
    try:
        with zf.open(info) as f:
            while len(out) < cap:
                chunk = f.read(min(_CHUNK, cap - len(out)))
                if not chunk:
                    break
                out += chunk
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError, OSError, EOFError,
            zlib.error) as exc:  # fmt: skip
        listing.errors.append(f"{where}: member {info.filename!r} unreadable: {exc}")
        return None
    return bytes(out)


# --- tar and compressed streams --------------------------------------------------------


class _CappedReader(io.RawIOBase):
    """A decompressing file object that raises once the budget is used up."""

    def __init__(self, inner: io.BufferedIOBase, budget: _Budget) -> None:
        self.inner = inner
        self.budget = budget
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:  # type: ignore[override]
        want = min(len(buf), _CHUNK)
        data = self.inner.read(want)
        n = len(data)
        buf[:n] = data
        self.count += n
        self.budget.expand(n)
        return n


def _open_stream(kind: str, data: bytes) -> io.BufferedIOBase:
    raw = io.BytesIO(data)
    if kind == "gzip":
        return gzip.GzipFile(fileobj=raw)
    if kind == "bzip2":
        return bz2.BZ2File(raw)
    if kind == "xz":
        return lzma.LZMAFile(raw)
    return raw


def _list_stream(listing: ArchiveListing, kind: str, data: bytes, budget: _Budget, depth: int,
                 container: tuple[str, ...]) -> None:  # fmt: skip
    where = "/".join(container) or "the attachment"
    if kind == "tar":
        _list_tar(listing, io.BytesIO(data), budget, depth, container, where)
        return
    # compressed: a tar inside, or a single compressed file
    reader = _CappedReader(_open_stream(kind, data), budget)
    stream = io.BufferedReader(reader, _CHUNK)
    try:
        head = stream.peek(512)[:512]
    except (OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        listing.errors.append(f"{where}: unreadable {kind} data: {exc}")
        return
    if head[257:262] == b"ustar":
        _list_tar(listing, stream, budget, depth, container, where)
        return
    budget.add_members(1)
    try:
        while stream.read(_CHUNK):
            pass
    except (OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        listing.errors.append(f"{where}: damaged {kind} data: {exc}")
    name = container[-1] if container else ""
    for suffix in (".gz", ".bz2", ".xz", ".tgz"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    listing.members.append(ArchiveMember(name or "(compressed data)", reader.count, len(data), False, False,
                                         depth, container))  # fmt: skip


def _list_tar(listing: ArchiveListing, fileobj, budget: _Budget, depth: int, container: tuple[str, ...],
              where: str) -> None:  # fmt: skip
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tf:
            for ti in tf:
                budget.add_members(1)
                listing.members.append(
                    ArchiveMember(ti.name, ti.size, ti.size, False, ti.isdir(), depth, container)
                )
                tf.members = []  # stream mode keeps every TarInfo otherwise
    except MimeLimitError:
        raise
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError, ValueError) as exc:
        listing.errors.append(f"{where}: damaged tar: {exc}")
