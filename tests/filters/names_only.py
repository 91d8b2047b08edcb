"""Reads part names and types only: the walk must decode no payload for it."""

NAMES = []


def filter_part(msg, part):
    NAMES.append((part.content_type, part.filename, part.disposition))
