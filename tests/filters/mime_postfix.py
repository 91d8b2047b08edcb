"""End-to-end MIME filter: executables inside archives are quarantined and replaced by a
notice; every message gets a boilerplate in its text and HTML bodies."""

from defang import DANGEROUS_EXTENSIONS

TEXT = "-- scanned by defang --"
HTML = '<p class="defang">scanned by defang</p>'


def filter_part(msg, part):
    listing = part.archive()
    if listing is not None and listing.has_extension(DANGEROUS_EXTENSIONS):
        qid = msg.quarantine(f"{part.safe_filename} holds an executable")
        part.replace(f"The attachment {part.filename} held an executable. Quarantined as {qid}.",
                     filename=part.filename + ".removed.txt")


def filter_end(msg):
    msg.append_boilerplate(TEXT, HTML)
