"""A filter whose own code raises while importing (line 7, inside a call from line 10)."""

LIMITS = {}


def _setup():
    return LIMITS["missing"]


VALUE = _setup()
