"""defang's quarantine: messages (and parts) kept aside, with what is known about them.

Layout (documented in the README; the CLI and the workers share it)::

    <dir>/YYYY/MM/DD/<id>/
        message.eml   the message as received (header section as the MTA passed it,
                      CRLF line ends, then the body): what "release" sends
        meta.json     id, time, queue_id, sender, recipients, conn (ip, hostname,
                      port, helo), reasons, subject, headers, whether the whole
                      message was asked for, the parts, sizes and SHA-256 sums,
                      and one record per release
        part-N.bin    the decoded body of part N (N = the part's index in the walk),
                      one per part quarantined with part.quarantine()

One entry is capped (``[quarantine] max_files``, ``max_bytes``): part files that would
pass either are left out, and meta.json says which (``left_out``: their count, the
limit, their indexes).  message.eml is always written whole, whatever the caps: it is
what a release sends, and no mail may be lost.  Without the cap one message of 4,900
quarantined parts made an entry of 4,902 files (22 MB on disk, 4,902 fsyncs).

An ID is ``YYYYMMDDTHHMMSSZ-xxxxxx``: the UTC time (IDs sort by time, and the ID alone
finds the directory) and 24 random bits.  One message has at most one entry: every
``quarantine()`` call of its hooks adds a reason (and a part) to the same entry.

Writes are atomic (no mail is lost): the entry is written into ``.tmp-<id>`` in the day
directory, every file fsync'ed, the directory fsync'ed, renamed to ``<id>``, and the
day directory fsync'ed.  A crash leaves either nothing or a ``.tmp-`` directory that
listing ignores, never half an entry.  Entries are readable by their owner only (the
daemons' user; admins use root or that user): they hold mail.

``hashlib`` is imported where it is used, not at the top (as ``smtplib`` in ``submit``):
this module is imported by ``defang run`` before it forks the daemons, and either one
loads OpenSSL's libcrypto (``smtplib`` through ``ssl``), whose pages a process touching them pays for
alone (measured: 3.1 MB of PSS in the ``defang run`` process, with no use there).  IDs
take their random bits from ``os.urandom`` (what ``secrets.token_hex`` does), as
``secrets`` imports ``hmac`` and with it libcrypto too.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from defang.workers.stores.submit import Submission, SubmitError, submit

ID_RE = re.compile(r"^(\d{4})(\d{2})(\d{2})T\d{6}Z-[0-9a-f]{6}$")
DIR_MODE = 0o700
FILE_MODE = 0o600
META = "meta.json"
MESSAGE = "message.eml"
_COPY = 1 << 20


class QuarantineError(Exception):
    """A quarantine entry cannot be found, written, read or released; the text says why."""


def new_id(now: float | None = None) -> str:
    """A fresh, time-sortable entry ID (no I/O)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{os.urandom(3).hex()}"


def quarantine_dir(cfg: Any) -> Path:
    """``[quarantine] dir`` of a Config; empty means ``<runtime_dir>/quarantine``.

    Deterministic on purpose: the daemons and ``defang quarantine`` must agree on
    the directory whichever user runs them.  Production configs set a persistent
    path (``/var/spool/defang/quarantine``); runtime dirs are often a tmpfs.
    """
    value = getattr(cfg, "quarantine_dir", None)
    if value is None or str(value) in ("", "."):
        return Path(cfg.runtime_dir) / "quarantine"
    return Path(value)


@dataclass
class Pending:
    """What the hooks of one message asked to quarantine (written after the hooks)."""

    id: str
    reasons: list[str] = field(default_factory=list)
    whole: bool = False
    parts: list[tuple[Any, str]] = field(default_factory=list)  # (Part, reason)
    _indexes: set[int] = field(default_factory=set, repr=False)
    #: the indexes of the parts whose files the entry's caps left out (set by ``write``)
    left_out: list[int] = field(default_factory=list)

    def add_part(self, part: Any, reason: str) -> None:
        """Keep ``part`` once, however often it is quarantined (a set: the scan of the
        list this replaced made a message of 4,900 quarantined parts cost 12 million steps)."""
        if part.index not in self._indexes:
            self._indexes.add(part.index)
            self.parts.append((part, reason))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs(path: Path) -> None:
    """Create ``path`` and missing parents, each made durable in its parent.

    ``path`` is a day directory, ``<root>/YYYY/MM/DD``: the root and each level below it
    must be ours (the daemons' user's, or root's for the root) and writable by us alone,
    checked before anything is made inside, else the write is refused (QuarantineError:
    the message gets a 4xx).  One that another local user made would stay theirs, and
    with it the power to rename or read entries.
    """
    missing: list[Path] = []
    p = path
    while not os.path.lexists(p):
        missing.append(p)
        p = p.parent
    levels = (path.parents[2], path.parents[1], path.parents[0], path)
    for level, d in enumerate(levels):
        if d in missing:
            try:
                os.mkdir(d, DIR_MODE)
            except FileExistsError:
                pass
            else:
                _fsync_dir(d.parent)
        st = os.lstat(d)
        owners = (os.geteuid(), 0) if level == 0 else (os.geteuid(),)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid not in owners or st.st_mode & 0o022:
            mode = stat.S_IMODE(st.st_mode)
            why = f"(uid {st.st_uid}, mode {mode:04o}) is not a directory of the daemons' alone"
            raise QuarantineError(f"quarantine directory {d} {why}: refusing to use it; remove it")


def _write_file(path: Path, chunks: Any) -> tuple[int, str]:
    """Write, fsync; return (size, sha256)."""
    import hashlib  # here, not at the top: see the module docstring

    digest = hashlib.sha256()
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        for chunk in chunks:
            f.write(chunk)
            digest.update(chunk)
            size += len(chunk)
        f.flush()
        os.fsync(f.fileno())
    return size, digest.hexdigest()


def _file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while chunk := f.read(_COPY):
            yield chunk


def _left_out(indexes: list[int], max_files: int, max_bytes: int) -> dict[str, Any] | None:
    """meta.json's record of the part files an entry's caps left out (None: none was)."""
    if not indexes:
        return None
    return {"parts": len(indexes), "max_files": max_files, "max_bytes": max_bytes, "indexes": indexes,
            "note": "not stored: past [quarantine] max_files or max_bytes; message.eml holds them all"}


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8", "surrogatepass")


class QuarantineStore:
    """The quarantine directory: write entries (workers), list/read/delete them (CLI)."""

    def __init__(self, root: str | os.PathLike[str], *, max_files: int = 0, max_bytes: int = 0) -> None:
        self.root = Path(root)
        self.max_files = max_files  # per entry, message.eml and meta.json included; 0: no cap
        self.max_bytes = max_bytes  # per entry: message.eml and the part files; 0: no cap

    def __repr__(self) -> str:
        return f"<QuarantineStore {self.root}>"

    # --- paths

    def entry_dir(self, qid: str) -> Path:
        """The directory of entry ``qid``; ValueError for a malformed ID (never a path
        outside the store)."""
        m = ID_RE.match(qid or "")
        if not m:
            raise QuarantineError(f"{qid!r} is not a quarantine ID (YYYYMMDDTHHMMSSZ-xxxxxx)")
        return self.root / m.group(1) / m.group(2) / m.group(3) / qid

    def message_path(self, qid: str) -> Path:
        return self.entry_dir(qid) / MESSAGE

    # --- writing

    def write(self, msg: Any, pending: Pending, now: float | None = None) -> Path:
        """Store ``msg`` (a ``defang.workers.api.message.Message``) and the pending parts atomically."""
        final = self.entry_dir(pending.id)
        day = final.parent
        _makedirs(day)
        tmp = day / f".tmp-{pending.id}"
        os.mkdir(tmp, DIR_MODE)
        try:
            size, digest = _write_file(tmp / MESSAGE, _file_chunks(msg.path))
            parts_meta: list[dict[str, Any]] = []
            left_out = pending.left_out
            left_out.clear()
            room_files = self.max_files - 2 if self.max_files else len(pending.parts)
            room_bytes = self.max_bytes - size if self.max_bytes else None
            for part, reason in pending.parts:
                payload = part.payload
                if len(parts_meta) >= room_files or (room_bytes is not None and len(payload) > room_bytes):
                    left_out.append(part.index)
                    continue
                if room_bytes is not None:
                    room_bytes -= len(payload)
                name = f"part-{part.index}.bin"
                psize, pdigest = _write_file(tmp / name, [payload])
                parts_meta.append({
                    "index": part.index, "file": name, "content_type": part.content_type,
                    "filename": part.filename, "size": psize, "sha256": pdigest, "reason": reason,
                })  # fmt: skip
            conn = msg.conn
            stamp = time.time() if now is None else now
            meta = {
                "version": 1,
                "id": pending.id,
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp)),
                "queue_id": msg.queue_id,
                "sender": msg.sender,
                "recipients": list(msg.recipients),
                "conn": {"id": conn.id, "ip": conn.ip, "hostname": conn.hostname, "port": conn.port,
                         "helo": conn.helo},  # fmt: skip
                "reasons": list(pending.reasons),
                "whole_message": pending.whole,
                "subject": msg.subject,
                "message": {"file": MESSAGE, "size": size, "sha256": digest},
                "parts": parts_meta,
                "left_out": _left_out(left_out, self.max_files, self.max_bytes),
                "headers": [[k, v] for k, v in msg.headers],
                "releases": [],
            }
            _write_file(tmp / META, [_json_bytes(meta)])
            _fsync_dir(tmp)
            if final.exists():
                raise QuarantineError(f"quarantine entry {pending.id} exists already")
            os.rename(tmp, final)
            _fsync_dir(day)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    # --- reading

    def get(self, qid: str) -> dict[str, Any]:
        """The metadata of entry ``qid``."""
        path = self.entry_dir(qid) / META
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            raise QuarantineError(f"no quarantine entry {qid} in {self.root}") from None
        except PermissionError:
            raise  # the caller says whose the quarantine is
        except (OSError, ValueError) as exc:
            raise QuarantineError(f"quarantine entry {qid}: unreadable metadata: {exc}") from None

    def ids(self) -> list[str]:
        """Every complete entry, oldest first."""
        out: list[str] = []
        if not self.root.is_dir():
            return out
        for year in sorted(self.root.iterdir()):
            if not (year.is_dir() and year.name.isdigit()):
                continue
            for month in sorted(year.iterdir()):
                if not month.is_dir():
                    continue
                for day in sorted(month.iterdir()):
                    if not day.is_dir():
                        continue
                    out += sorted(e.name for e in day.iterdir() if ID_RE.match(e.name) and e.is_dir())
        return out

    def entries(self) -> Iterator[dict[str, Any]]:
        for qid in self.ids():
            try:
                yield self.get(qid)
            except QuarantineError as exc:
                yield {"id": qid, "error": str(exc)}

    def delete(self, qid: str) -> None:
        """Remove entry ``qid``: renamed away first (atomic), then deleted."""
        path = self.entry_dir(qid)
        if not path.is_dir():
            raise QuarantineError(f"no quarantine entry {qid} in {self.root}")
        doomed = path.parent / f".del-{qid}"
        os.rename(path, doomed)
        _fsync_dir(path.parent)
        shutil.rmtree(doomed)

    def add_release(self, qid: str, record: dict[str, Any]) -> None:
        """Append a release record to the entry's metadata (replaced atomically)."""
        meta = self.get(qid)
        meta.setdefault("releases", []).append(record)
        entry = self.entry_dir(qid)
        tmp = entry / f".{META}.tmp"
        tmp.unlink(missing_ok=True)
        _write_file(tmp, [_json_bytes(meta)])
        os.replace(tmp, entry / META)
        _fsync_dir(entry)


# --- release -----------------------------------------------------------------------------


def release(store: QuarantineStore, qid: str, how: Submission, to: list[str] | None = None) -> dict[str, Any]:
    """Send the original message of ``qid`` again, through the local MTA (``submit``).

    The envelope is the original one (sender, recipients), or the recipients in
    ``to``.  The message bytes are sent unchanged.
    """
    meta = store.get(qid)
    sender = meta.get("sender") or ""
    rcpts = list(to) if to else list(meta.get("recipients") or [])
    if not rcpts:
        raise QuarantineError(f"quarantine entry {qid} has no recipients; use --to")
    try:
        via = submit(how, sender, rcpts, store.message_path(qid))
    except SubmitError as exc:
        raise QuarantineError(f"release of {qid}: {exc}") from None
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "via": via,
              "sender": sender, "recipients": rcpts}  # fmt: skip
    store.add_release(qid, record)
    return record
