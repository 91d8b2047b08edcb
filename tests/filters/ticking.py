"""filter_tick for tests/postfix/test_postfix_observe.py: each tick appends its number to
$DEFANG_TICK_DIR/ticks; with a file "hang" there it never returns, with "raise" it raises."""

import os
import time
from pathlib import Path

DIR = Path(os.environ.get("DEFANG_TICK_DIR", "/nonexistent"))


def filter_tick(n):
    if (DIR / "hang").exists():
        (DIR / "hanging").write_text(f"{os.getpid()}\n")
        while True:
            time.sleep(1)
    if (DIR / "raise").exists():
        raise RuntimeError(f"tick {n} broke on purpose")
    with open(DIR / "ticks", "a") as f:
        f.write(f"{n} {os.getpid()}\n")


def filter_end(msg):
    msg.add_header("X-Ticked", "yes")
