"""A filter importing a module that does not exist (line 5)."""

import os

import defang_no_such_module_xyz  # noqa: F401


def filter_end(msg):
    return os.sep
