"""The default defang filter: a useful starting point, meant to be edited.

defang imports this file once per worker process and calls the hooks it defines.
Every hook is optional, and defang asks the MTA only for the steps that have a hook,
so delete what you do not use.  `defang check` tells you whether this file loads;
`defang test some.eml` shows what it would decide for one message.

What it does:
  * MAIL FROM: rejects senders whose address is malformed (email-validator; no DNS);
  * every attachment: rejects the message if a file name has an executable extension,
    also behind a double extension such as "invoice.pdf.exe";
  * with [clamav] address set in defang.toml: scans every message with clamd; a virus
    is refused (554), and a message that could not be scanned (clamd down, timing out,
    answering garbage) is TEMPFAILED (451): the sender retries later, and no message
    is ever passed unscanned.  One too big to stream to clamd ([clamav] max_size, clamd
    over TCP) is refused (552 5.3.4): a retry could not help.  Without that setting
    nothing is scanned;
  * every message that passes: adds an X-Scanned-By header.
"""

from email_validator import EmailNotValidError, validate_email

from defang import reject, tempfail

# Extensions Windows executes on a double click.  Compared case-insensitively with the
# last extension of every attachment's (decoded) file name.
EXECUTABLE_EXTENSIONS = frozenset(
    "exe com scr pif bat cmd vbs vbe js jse wsf wsh msi msp hta cpl jar lnk reg ps1 "
    "application gadget inf scf".split()
)  # fmt: skip


def filter_sender(conn, sender):
    """MAIL FROM: a malformed address is refused before any data is sent.

    The null sender ("", used by bounces) is always allowed.  Runs without DNS:
    deliverability is the MTA's business; only the syntax is checked here.
    """
    if sender == "":
        return None
    try:
        validate_email(sender, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError as exc:
        return reject(f"Malformed sender address: {exc}", code="553", dsn="5.1.7")
    return None


def filter_part(msg, part):
    """Each leaf MIME part: refuse executables, whatever they are wrapped in."""
    name = part.filename
    if not name:
        return
    extension = name.rstrip(". ").rsplit(".", 1)[-1].lower() if "." in name else ""
    if extension in EXECUTABLE_EXTENSIONS:
        msg.reject(f"Executable attachments are not accepted ({extension})",
                   code="554", dsn="5.7.1")  # fmt: skip


def filter_end(msg):
    """After the parts: the virus scan, then stamp the message so downstream systems see
    it was scanned."""
    virus = msg.clamav()  # "skipped" when [clamav] is not configured: nothing to do
    if virus.error:
        return tempfail("Virus scan unavailable, try again later", code="451", dsn="4.7.1")
    if virus.oversize:  # over [clamav] max_size: a retry would be refused the same way
        return reject(f"Message too big to scan for viruses ({virus.oversize} bytes)",
                      code="552", dsn="5.3.4")
    if virus.infected:
        return reject(f"Virus found: {', '.join(virus.viruses)}", code="554", dsn="5.7.1")
    msg.add_header("X-Scanned-By", "defang")
    return None
