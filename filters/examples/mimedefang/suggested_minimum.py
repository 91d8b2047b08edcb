"""MIMEDefang's ``examples/suggested-minimum-filter-for-windows-clients``, with every line
it suggests uncommenting switched on.

MIMEDefang 3.3 ships this file with the same text as ``/etc/mail/mimedefang-filter``
(ported hook for hook in ``mimedefang_filter.py``, which this filter reuses: the
filter's directory is on the import path).  What its comments offer, turned on here:

- "Higher level of paranoia": clamd's "suspicious" results (heuristics such as an
  encrypted archive, ``VirusResult.category``) are quarantined and discarded as viruses
  are;
- ``remove_redundant_html_parts``: the text/html alternative of a message that has a
  text/plain one is dropped;
- ``action_rebuild``: every message's MIME structure is rewritten where it is ambiguous
  (defang copies what is well-formed byte for byte);
- ``send_quarantine_notifications``: the administrator hears of each quarantine.
"""

from __future__ import annotations

import mimedefang_filter as shipped
from mimedefang_filter import filter_multipart, filter_part

from defang import discard

__all__ = ["filter_begin", "filter_end", "filter_multipart", "filter_part"]


def filter_begin(msg):
    decided = shipped.filter_begin(msg)  # header characters, viruses, the scanner failing
    if decided is not None:
        return decided
    result = msg.clamav()  # kept from the call above: clamd is not asked twice
    if result.category == "suspicious":  # the higher level of paranoia
        msg.tag("suspicious")
        qid = msg.quarantine(f"suspicious: {', '.join(result.suspicious)}")
        msg.notify_administrator("MIMEDefang Quarantine Report",
                                 f"A message with {', '.join(result.viruses)} was quarantined as {qid}.\n")
        return discard()
    return None


def filter_end(msg):
    shipped.filter_end(msg)
    msg.remove_redundant_html_parts()
    msg.rebuild()
    if msg.quarantine_id is not None:  # send_quarantine_notifications()
        msg.notify_administrator("MIMEDefang Quarantine Report",
                                 f"A message was quarantined as {msg.quarantine_id}.\n")  # fmt: skip
