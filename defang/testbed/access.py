"""What the unprivileged ``defang`` user can reach: the daemons drop root, so a filter, a
directory or an interpreter they are handed must be readable by others on the whole path
(pytest's tmp_path, under /tmp/pytest-of-root, mode 0700, is not; /root is not)."""

from __future__ import annotations

from pathlib import Path


def reachable_by_others(path: Path) -> bool:
    """Can a user other than root read ``path`` (every directory above it searchable)?"""
    path = Path(path).resolve()
    if not path.exists() or not path.stat().st_mode & 0o004:
        return False
    return all(p.stat().st_mode & 0o001 for p in path.parents)
