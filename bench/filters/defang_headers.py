"""Benchmark filter "headers": walk every part, count them, add X-Scanned, reject *.exe.

The same work as bench/filters/mimedefang_headers.pl does in MIMEDefang's Perl API:
containers (filter_multipart) and leaves (filter_part) are both counted, as MIMEDefang
calls filter_multipart and filter for each.
"""

from defang import reject

_parts = 0


def filter_begin(msg):
    global _parts
    _parts = 0


def filter_multipart(msg, part):
    global _parts
    _parts += 1


def filter_part(msg, part):
    global _parts
    _parts += 1
    if part.filename and part.filename.lower().endswith(".exe"):
        return reject("No executables", code="554", dsn="5.7.1")
    return None


def filter_end(msg):
    msg.add_header("X-Scanned", f"parts={_parts}")
