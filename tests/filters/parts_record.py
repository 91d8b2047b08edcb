"""Records what the part walk showed, for the tests to inspect."""

CALLS = []


def filter_begin(msg):
    CALLS.clear()
    CALLS.append(("begin", None))


def filter_multipart(msg, part):
    CALLS.append(("multipart", part))


def filter_part(msg, part):
    CALLS.append(("part", part))


def filter_end(msg):
    CALLS.append(("end", None))
    # here, not in filter_part: a reject there would end the walk (the first decision stands)
    for kind, part in CALLS:
        if kind == "part" and part.filename and part.filename.endswith(".exe"):
            msg.reject(f"No executables ({part.filename})")
