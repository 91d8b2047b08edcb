"""Where ``defang replay`` finds its messages: .eml files, directories of them, an mbox,
a Maildir, the quarantine store.

Each message becomes an ``Item``: its name as the admin knows it (a file name,
``mbox:N``, a quarantine ID), and either a file the replaying process reads itself or
the bytes (an mbox's messages, read here once).  A quarantine entry brings its saved
envelope; every other message gets the one from the command line.
"""

from __future__ import annotations

import mailbox
import os
from dataclasses import dataclass
from pathlib import Path

from defang.workers.stores.quarantine import MESSAGE, META, QuarantineError, QuarantineStore

MESSAGE_SUFFIXES = (".eml",)


class SourceError(Exception):
    """A path given to replay holds no message we can read; the text is ``path: why``."""


@dataclass(frozen=True)
class Item:
    """One message to replay."""

    name: str
    path: str | None = None  # the file to read, or
    data: bytes | None = None  # the message itself
    envelope: dict | None = None  # a quarantine entry's: sender, recipients, ip, hostname, helo, queue_id
    store: str | None = None  # the quarantine store (root) of an entry, for --release-accepted
    qid: str | None = None
    problem: str | None = None  # why it cannot be replayed (an entry's unreadable metadata)

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        with open(self.path, "rb") as f:
            return f.read()


def find(paths: list[str]) -> tuple[list[Item], int]:
    """Every message in ``paths``, in order, and how many files were skipped (in a
    directory, files not named ``*.eml``).  Raises SourceError for a path that is
    missing, unreadable, or holds no message."""
    items: list[Item] = []
    skipped = 0
    for path in paths:
        found, skip = _one(path)
        items += found
        skipped += skip
    return items, skipped


def quarantine_items(root: str | os.PathLike[str]) -> list[Item]:
    """Every entry of the quarantine store at ``root``, oldest first, with its envelope."""
    store = QuarantineStore(root)
    items = []
    for qid in store.ids():
        try:
            items.append(_entry(store, qid, store.get(qid)))
        except QuarantineError as exc:
            items.append(Item(qid, store=str(store.root), qid=qid, problem=str(exc)))
    return items


def _one(path: str) -> tuple[list[Item], int]:
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise SourceError(f"{path}: {exc.strerror}") from None
    if p.is_dir():
        return _directory(p)
    if not os.access(p, os.R_OK):
        raise SourceError(f"{path}: Permission denied")
    if st.st_size == 0:
        raise SourceError(f"{path}: an empty file")
    if _is_mbox(p):
        return _mbox(p), 0
    return [Item(str(p), path=str(p))], 0


def _directory(d: Path) -> tuple[list[Item], int]:
    if (d / META).is_file() and (d / MESSAGE).is_file():  # one quarantine entry
        store = QuarantineStore(d.parent.parent.parent.parent)
        try:
            return [_entry(store, d.name, store.get(d.name))], 0
        except QuarantineError as exc:
            raise SourceError(f"{d}: {exc}") from None
    if (d / "cur").is_dir() and (d / "new").is_dir():  # a Maildir: one message per file
        files = sorted(f for sub in ("new", "cur") for f in (d / sub).iterdir()
                       if f.is_file() and not f.name.startswith("."))  # fmt: skip
        return [Item(str(f), path=str(f)) for f in files], 0
    entries = quarantine_items(d)
    if entries:
        return entries, 0
    items, skipped = [], 0
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for name in sorted(files):
            if name.endswith(MESSAGE_SUFFIXES):
                items.append(Item(os.path.join(root, name), path=os.path.join(root, name)))
            elif not name.startswith("."):
                skipped += 1
    if not items:
        raise SourceError(f"{d}: no messages (no *.eml file, not a Maildir with cur/ and new/, "
                          f"no quarantine entry)")  # fmt: skip
    return items, skipped


def _is_mbox(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(5) == b"From "


def _mbox(p: Path) -> list[Item]:
    box = mailbox.mbox(p, create=False)
    try:
        return [Item(f"{p}:{n}", data=box.get_bytes(key)) for n, key in enumerate(box.keys(), 1)]
    finally:
        box.close()


def _entry(store: QuarantineStore, qid: str, meta: dict) -> Item:
    conn = meta.get("conn") or {}
    envelope = {
        "sender": meta.get("sender") or "",
        "recipients": list(meta.get("recipients") or []),
        "ip": conn.get("ip") or "",
        "hostname": conn.get("hostname") or "",
        "helo": conn.get("helo") or "",
        "queue_id": meta.get("queue_id") or "",
    }
    return Item(qid, path=str(store.message_path(qid)), envelope=envelope, store=str(store.root), qid=qid)
