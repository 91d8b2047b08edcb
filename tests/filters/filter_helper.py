"""Helper module imported by uses_helper.py."""

TAG = "helped"
