"""Executables by name: a dangerous extension in any name a part gives itself, one
hidden behind a double extension or a bidi trick ("invoice.pdf.exe",
"invoice\u202efdp.exe"), and the same inside zip and other archives."""

from defang import is_dangerous_filename, reject, safe_filename


def _refuse(name, where=""):
    return reject(f"Executable attachments are not accepted ({safe_filename(name)}{where})",
                  code="554", dsn="5.7.1")  # fmt: skip


def filter_part(msg, part):
    for name in part.filenames:
        if is_dangerous_filename(name):
            return _refuse(name)
    listing = part.archive()
    if listing is not None:
        for member in listing.members:
            if is_dangerous_filename(member.name):
                return _refuse(member.name, f" in {safe_filename(part.filename or 'an archive')}")
    return None
