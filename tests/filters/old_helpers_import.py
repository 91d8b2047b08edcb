"""A filter written for defang 0.1: the helpers from their old address (still found, with a warning)."""

from workers.helpers import DANGEROUS_EXTENSIONS


def filter_part(msg, part):
    if part.has_extension(DANGEROUS_EXTENSIONS):
        msg.reject("Dangerous attachment")
