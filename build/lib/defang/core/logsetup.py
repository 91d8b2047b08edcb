"""One log format for every defang process: ``time name[pid] LEVEL: message``."""

from __future__ import annotations

import logging
import sys


def setup(level: str = "info") -> None:
    # Our format uses none of these, and each costs a lookup on every log record
    # (the caller's frame, the thread's name, the multiprocessing process name).
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(name)s[%(process)d] %(levelname)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
