"""Imports a helper module from its own directory (sys.path must include it)."""

from filter_helper import TAG


def filter_initialize():
    global READY
    READY = True


def filter_cleanup():
    raise RuntimeError("cleanup failed")


def filter_end(msg):
    msg.add_header("X-Tag", TAG)
