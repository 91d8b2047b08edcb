"""Charsets we get only spam in: a header word encoded in one (=?euc-kr?B?...?=) or a
part declared in one is refused.  Edit BLOCKED for your own mail."""

import re

from defang import reject

BLOCKED = frozenset({"ks_c_5601-1987", "euc-kr"})
ENCODED_WORD = re.compile(rb"=\?([^?*\s]+)(?:\*[^?]*)?\?[bq]\?", re.IGNORECASE)


def _refuse(charset):
    return reject(f"Mail in the charset {charset} is not accepted here", code="554", dsn="5.7.1")


def filter_begin(msg):
    for _name, raw in msg.raw_headers:
        for charset in ENCODED_WORD.findall(raw):
            charset = charset.decode("ascii", "replace").lower()
            if charset in BLOCKED:
                return _refuse(charset)
    return None


def filter_part(msg, part):
    charset = (part.charset or "").lower()
    if charset in BLOCKED:
        return _refuse(charset)
    return None
