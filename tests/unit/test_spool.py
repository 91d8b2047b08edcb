"""The front end's spool files: reuse, the bound on what free files keep, removal when idle."""

import os

from defang.frontend import spool


def test_free_spool_files_keep_at_most_spool_keep_bytes(tmp_path, monkeypatch):
    """The bytes left in free spool files are bounded: past SPOOL_KEEP_BYTES in all, a
    file given back is cut short; every free file goes when the last transaction ends."""
    monkeypatch.setattr(spool, "SPOOL_KEEP_BYTES", 1000)
    fe = spool.SpoolDir(tmp_path)
    fe.transaction(True)  # a transaction under way: free files are kept
    files = [fe.take() for _ in range(3)]
    assert [old for _, _, old in files] == [0, 0, 0]  # new files
    for path, fd, _ in files:
        os.write(fd, b"x" * 600)
        fe.give(path, fd, 600)
    assert sorted(os.path.getsize(path) for path, _, _ in files) == [0, 400, 600]
    again = [fe.take() for _ in range(3)]
    assert sorted(old for _, _, old in again) == [0, 400, 600]  # what each still holds
    assert {path for path, _, _ in again} == {path for path, _, _ in files}
    for path, fd, old in again:
        fe.give(path, fd, old)
    fe.transaction(False)
    assert list(tmp_path.iterdir()) == []
