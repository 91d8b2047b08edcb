"""MIMEDefang's own filter, ported: ``/etc/mail/mimedefang-filter`` of Debian's
mimedefang 3.3 (the same text as its
``examples/suggested-minimum-filter-for-windows-clients``), hook for hook.

What it does, as the original does:

- ``filter_begin``: suspicious characters in the headers: quarantine the whole message
  and discard it; a virus (clamd): discard it; the virus scanner failing: tempfail.
- ``filter_part``: ``message/partial`` refused; a part with a bad file name (the
  original's extension list, a CLSID ``{...}``, or such a name inside a zip) dropped,
  with a warning part put first in the message.
- ``filter_multipart``: the same for containers, and a notice to the administrator.
- ``filter_end``: SpamAssassin on messages under 512 KB: spam gets ``X-Spam-Score: 6.8
  (******) RULE,RULE`` and the report as a part; other mail loses any X-Spam-Score.
  The original's two commented-out lines stay commented out here
  (``remove_redundant_html_parts``, ``action_rebuild``): ``suggested_minimum.py`` is this
  filter with them switched on.

The globals become config (``etc/defang.toml``): ``$AdminAddress`` is
``[notify] administrator``, ``$DaemonAddress`` ``[notify] from``, the scanners are
``[clamav]`` and ``[spamassassin]`` (an empty address means "not installed", as a
missing ``$Features{...}``).  ``md_graphdefang_log(event)`` becomes ``msg.tag(event)``
(counted in ``defangctl status``) and ``md_syslog`` the ``defang.filter`` logger.
Replies keep MIMEDefang's codes (``action_bounce`` is 554 5.7.1) where defang's defaults
differ.  docs/porting.md maps every call.
"""

from __future__ import annotations

import logging
import re

from defang import discard, reject, tempfail

log = logging.getLogger("defang.filter")  # md_syslog: one line, with the queue ID

#: the original's $bad_exts, as extensions (defang sees through "a.pdf.exe", trailing
#: dots and spaces, RTL overrides and encoded words, which the original's regex half did)
BAD_EXTENSIONS = (
    "ade adp app asd asf asx bas bat chm cmd com cpl crt dll exe fxp hlp hta hto inf ini ins isp js jse "
    "lib lnk mdb mde msc msi msp mst ocx pcd pif prg reg scr sct sh shb shs sys url vb vbe vbs vcs vxd "
    "wmd wms wmz wsc wsf wsh"
).split()
CLSID = re.compile(r"\.\{[^}]+\}\.*$")  # a class ID as the extension: Windows runs it
#: control characters in a header: nothing a real mail program writes, a way to confuse
#: the parsers of mail clients (MIMEDefang's $SuspiciousCharsInHeaders)
SUSPICIOUS_HEADER_CHARS = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)")
SPAM_SCAN_LIMIT = 512 * 1024  # "Only scan messages smaller than 512KB"
WARNING = ("An attachment named {name} was removed from this document as it\nconstituted a security "
           "hazard.  If you require this document, please contact\nthe sender and arrange an alternate "
           "means of receiving it.\n")  # fmt: skip


def filter_bad_filename(part):
    """The original's filter_bad_filename, under its own name (``defang check --strict``
    flags only near misses of a hook's name, not helpers like this): a bad extension or
    a CLSID in any name the part gives itself (Content-Disposition, Content-Type,
    Content-Description), or inside a zip."""
    names = list(part.filenames)
    description = part.head.get("Content-Description")
    if description:
        names.append(str(description))
    if part.has_extension(BAD_EXTENSIONS) or any(CLSID.search(n) for n in names):
        return True
    if any(n.lower().rstrip(". ").endswith(".zip") for n in part.filenames):
        listing = part.archive()  # by content; None if it is not an archive after all
        if listing is not None:
            return listing.has_extension(BAD_EXTENSIONS) or any(CLSID.search(n) for n in listing.names)
    return False


def filter_begin(msg):
    # ALWAYS drop messages with suspicious chars in headers
    if any(SUSPICIOUS_HEADER_CHARS.search(raw) for _, raw in msg.raw_headers):
        msg.tag("suspicious_chars")
        msg.quarantine("Message quarantined because of suspicious characters in headers")
        return discard()  # Do NOT allow message to reach recipient(s)

    result = msg.clamav()  # the spool file is the "mbox" MIMEDefang copied for the scanner
    # Lower level of paranoia - only looks for actual viruses
    found_virus = result.category == "virus"
    # Higher level of paranoia - takes care of "suspicious" objects
    # found_virus = result.category in ("virus", "suspicious")
    if found_virus:
        msg.tag("virus")
        log.warning("%s: Discarding because of virus %s", msg.queue_id, ", ".join(result.viruses))
        return discard()
    if result.error:  # not installed ([clamav] address empty) is "skipped", not an error
        log.warning("%s: Problem running virus scanner: %s", msg.queue_id, result.error)
        return tempfail("Problem running virus-scanner", code="451", dsn="4.3.0")
    return None


def filter_part(msg, part):
    # Block message/partial parts
    if part.content_type == "message/partial":
        msg.tag("message/partial")
        return reject("MIME type message/partial not accepted here", code="554", dsn="5.7.1")
    if filter_bad_filename(part):
        msg.tag("bad_filename")
        part.drop_with_warning(WARNING.format(name=part.safe_filename), first=True)
    return None


def filter_multipart(msg, part):
    if part.parent is None:
        return None  # MIMEDefang does not call filter_multipart for the message itself
    if filter_bad_filename(part):
        msg.tag("bad_filename")
        msg.notify_administrator(
            "MIMEDefang notification",
            f"A MULTIPART attachment of type {part.content_type}, named {part.safe_filename} was dropped.\n",
        )
        part.drop_with_warning(WARNING.format(name=part.safe_filename), first=True)
        return None
    # Block message/partial parts
    if part.content_type == "message/partial":
        msg.tag("message/partial")
        return reject("MIME type message/partial not accepted here", code="554", dsn="5.7.1")
    return None


def filter_end(msg):
    # (no "return if message_rejected()": defang calls no hook after a decision)
    if msg.size < SPAM_SCAN_LIMIT:
        result = msg.spamassassin()
        if result.scanned:
            stars = "*" * min(int(result.score), 40)
            names = ",".join(sorted(result.rules))
            if result.is_spam:
                # action_change_header adds the header when there is none
                if msg.get_header("X-Spam-Score") is None:
                    msg.add_header("X-Spam-Score", f"{result.score:.1f} ({stars}) {names}")
                else:
                    msg.change_header("X-Spam-Score", f"{result.score:.1f} ({stars}) {names}")
                msg.tag("spam")
                # If you find the SA report useful, add it, I guess...
                msg.add_part(result.report + "\n", "text/plain", filename="SpamAssassinReport.txt",
                             disposition="inline")  # fmt: skip
            else:
                # Delete any existing X-Spam-Score header?
                msg.delete_header("X-Spam-Score")

    # If you want to strip out HTML parts if there is a corresponding
    # plain-text part, uncomment the next line.
    # msg.remove_redundant_html_parts()

    msg.tag("mail_in")

    # Deal with malformed MIME: rewrite every container whose bytes are ambiguous
    # (defang copies the rest byte for byte, so well-formed mail is not touched).
    # msg.rebuild()
