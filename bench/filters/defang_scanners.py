"""Benchmark filter "scanners" for defang: spamd and clamd on every message, side by side.

Both checks start at filter_begin and are read at filter_end, so their waits overlap.
A virus is refused (554), a scan that failed tempfails (451); every message gets
X-Spam-Status.  The same work as bench/filters/mimedefang_scanners.pl, which asks the
same daemons one after the other (MIMEDefang 3.3 has no way to overlap them).
"""

from defang import reject, tempfail


def filter_begin(msg):
    msg.start_checks("clamav", "spamassassin")


def filter_end(msg):
    virus = msg.clamav()
    if virus.error:
        return tempfail("Virus scan unavailable", code="451", dsn="4.7.1")
    if virus.infected:
        return reject(f"Virus found: {', '.join(virus.viruses)}", code="554", dsn="5.7.1")
    spam = msg.spamassassin()
    if spam.error:
        return tempfail("Spam scan unavailable", code="451", dsn="4.7.1")
    msg.add_header("X-Spam-Status", spam.status_header())
    return None
