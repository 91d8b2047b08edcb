"""Defines every message hook and reads everything a part offers (corpus walk)."""

SEEN = []


def filter_begin(msg):
    SEEN.clear()
    SEEN.append((msg.subject, len(msg.headers), msg.get_header("From")))


def filter_multipart(msg, part):
    SEEN.append(
        (
            "multipart",
            part.content_type,
            part.filename,
            part.size,
            part.payload,
            part.charset,
            part.disposition,
            part.defects,
        )
    )


def filter_part(msg, part):
    SEEN.append(
        (
            "part",
            part.content_type,
            part.filename,
            part.size,
            part.payload,
            part.charset,
            part.disposition,
            part.defects,
        )
    )


def filter_end(msg):
    msg.add_header("X-Parts", str(len(SEEN) - 1))
