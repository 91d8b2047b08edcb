"""Drops every attachment and appends a boilerplate (the whole-corpus rewrite test)."""

TEXT = "-- Scanned by defang (boilerplate) --"
HTML = '<p class="defang-boilerplate">Scanned by defang</p>'
SEEN = {}


def filter_begin(msg):
    SEEN.clear()
    SEEN["dropped"] = []


def filter_part(msg, part):
    if part.is_attachment:
        part.drop(force=True)
        SEEN["dropped"].append(part.index)


def filter_end(msg):
    SEEN["bodies"] = [p.index for p in msg.append_boilerplate(TEXT, HTML, force=True)]
