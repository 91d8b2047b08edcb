"""The MIME helpers a ``filter.py`` imports: ``from workers.helpers import ...``.

Why here and not ``from defang import ...``: ``defang`` is the daemon side, which
never parses MIME; these run inside a worker.  Verdicts still come from ``defang``.

Most of this is also reachable from the objects the hooks get -- ``part.filenames``,
``part.has_extension(...)``, ``part.archive()``, ``part.filename_mismatch``,
``part.safe_filename`` -- this module adds the plain functions and the exceptions
a filter may want to catch::

    from defang import reject
    from workers.helpers import DANGEROUS_EXTENSIONS, MimeLimitError, SignedMessageError

    def filter_part(msg, part):
        listing = part.archive()            # None if the part is not an archive
        if part.has_extension(DANGEROUS_EXTENSIONS) or (
                listing and listing.has_extension(DANGEROUS_EXTENSIONS)):
            msg.quarantine(f"blocked attachment {part.safe_filename}")
            part.replace(f"The attachment {part.filename} was removed.",
                         filename=f"{part.filename}.removed.txt")
"""

from workers.archives import ArchiveListing, ArchiveMember, archive_kind, list_archive
from workers.filenames import (
    DANGEROUS_EXTENSIONS,
    extensions,
    final_extensions,
    has_extension,
    is_dangerous_filename,
    names_differ,
    normalize_filename,
    safe_filename,
    suspicious_filename,
)
from workers.limits import MimeLimitError, MimeLimits, PartActionError, SignedMessageError
from workers.parts import SIGNED_TYPES, Part

__all__ = [
    "DANGEROUS_EXTENSIONS",
    "SIGNED_TYPES",
    "ArchiveListing",
    "ArchiveMember",
    "MimeLimitError",
    "MimeLimits",
    "Part",
    "PartActionError",
    "SignedMessageError",
    "archive_kind",
    "extensions",
    "final_extensions",
    "has_extension",
    "is_dangerous_filename",
    "list_archive",
    "names_differ",
    "normalize_filename",
    "safe_filename",
    "suspicious_filename",
]
