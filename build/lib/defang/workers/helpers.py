"""Deprecated: the MIME helpers' old address.  Import them from ``defang`` instead::

    from defang import DANGEROUS_EXTENSIONS, MimeLimitError, SignedMessageError

Filters written for defang 0.1 imported them as ``workers.helpers``; the filter loader
still finds that name (``defang.workers.loader.OldNames``) and warns with the line of the
filter that imported it.  It goes in the next release.
"""

from defang.workers.mime.archives import ArchiveListing, ArchiveMember, archive_kind, list_archive
from defang.workers.mime.filenames import (
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
from defang.workers.mime.limits import MimeLimitError, MimeLimits, PartActionError, SignedMessageError
from defang.workers.mime.part import SIGNED_TYPES, Part

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
