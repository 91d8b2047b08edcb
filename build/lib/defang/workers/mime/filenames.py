"""Attachment names as an attacker writes them and as a user's machine reads them.

A name in a MIME header is attacker-controlled text.  Three things are done with it
here, each for a reason:

* ``safe_filename`` shows it in a log line: control characters, NUL and bidi
  overrides are escaped (``\\u202e``), so a name can neither forge log lines nor
  reverse the text an admin reads.
* ``normalize_filename`` is the name a Windows or Unix desktop would save: the last
  path component, Unicode NFKC, bidi and invisible characters removed, trailing dots
  and spaces stripped (Windows ignores them, so ``x.exe.`` runs as ``x.exe``).
* ``extensions`` / ``has_extension`` see through tricks: ``invoice.pdf.exe`` (all
  extensions), ``invoice\\u202egpj.exe`` (the display shows ``invoiceexe.jpg``; the
  file is an ``.exe``), ``invoice.pdf\\0.exe`` (C code stops at the NUL, other code
  does not: both readings count).

Nothing here raises on odd input (None, surrogates, empty strings).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

# Bidirectional formatting characters: they reorder what is displayed.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# Characters that display as nothing.
INVISIBLE = frozenset("\u00ad\u034f\u180e\u200b\u200c\u200d\u2060\u2061\u2062\u2063\u2064\ufeff")

#: Extensions that run code on a common desktop when opened.  Admins extend or
#: replace this set; it is only a default.
DANGEROUS_EXTENSIONS = frozenset(
    """
    ade adp app appx application appref-ms asp aspx bas bat bin cab chm cmd com cpl crt csh
    dll docm dotm exe fxp gadget hlp hta htaccess inf ins iso img isp its jar jnlp js jse ksh
    lib lnk mad maf mag mam maq mar mas mat mau mav maw mda mdb mde mdt mdw mdz msc msh msh1
    msh2 mshxml msh1xml msh2xml msi msix msp mst ocx ops pcd pif pl plg potm ppam ppsm pptm
    prf prg ps1 ps1xml ps2 ps2xml psc1 psc2 pst py pyc pyo pyw pyz reg scf scr sct settingcontent-ms
    shb shs sys tmp url vb vbe vbp vbs vhd vhdx vsmacros vsw vxd ws wsc wsf wsh xbap xlam xll xlsm
    xltm xnk
    """.split()
)

_PATH_SEP = re.compile(r"[/\\]")
_ADS = re.compile(r"::\$data$", re.IGNORECASE)  # NTFS "file.exe::$DATA" names the same file
_TRAILING = " .\t"


def safe_filename(name: str | None, limit: int = 160) -> str:
    """``name`` as printable text for a log line; ``-`` for None.

    Like ``repr`` without the quotes, but also escapes bidi and invisible characters
    (``str.isprintable`` lets some through) and shortens very long names.
    """
    if name is None:
        return "-"
    out: list[str] = []
    for ch in name[: limit + 1]:
        if ch == "\\":
            out.append("\\\\")
        elif ch.isprintable() and ch not in BIDI_CONTROLS and ch not in INVISIBLE:
            out.append(ch)
        else:
            code = ord(ch)
            if code < 0x100:
                out.append(f"\\x{code:02x}")
            elif code < 0x10000:
                out.append(f"\\u{code:04x}")
            else:
                out.append(f"\\U{code:08x}")
    text = "".join(out)
    if len(name) > limit:
        text = f"{text[:limit]}...(+{len(name) - limit} chars)"
    return text


def _clean(name: str) -> str:
    """Remove what a desktop does not show or does not keep, take the last component."""
    name = unicodedata.normalize("NFKC", name)
    name = "".join(ch for ch in name if ch not in BIDI_CONTROLS and ch not in INVISIBLE)
    name = "".join(ch for ch in name if ch >= " " and ch != "\x7f")  # control characters
    name = _PATH_SEP.split(name)[-1]
    name = _ADS.sub("", name)
    return name.strip().rstrip(_TRAILING)


def normalize_filename(name: str | None) -> str:
    """The name a desktop would save (see the module docstring); "" for None.

    A NUL ends the name, as it does for C code that saves the file.
    """
    if not name:
        return ""
    return _clean(name.split("\0", 1)[0])


def _readings(name: str) -> list[str]:
    """Every way the name may be read: cut at a NUL, and with the NUL removed."""
    if "\0" not in name:
        return [_clean(name)]
    return [_clean(name.split("\0", 1)[0]), _clean(name.replace("\0", ""))]


def _suffixes(clean: str) -> list[str]:
    stem = clean.lstrip(".")  # ".bashrc" has no extension; "..exe" has one
    parts = stem.split(".")
    return [p.strip().lower() for p in parts[1:] if p.strip()]


def extensions(name: str | None) -> list[str]:
    """Every extension of ``name``, lowercased, in order: ``a.PDF.exe`` -> ["pdf", "exe"].

    With a NUL in the name, the extensions of both readings are listed.
    """
    if not name:
        return []
    out: list[str] = []
    for reading in _readings(name):
        for ext in _suffixes(reading):
            if ext not in out:
                out.append(ext)
    return out


def final_extensions(name: str | None) -> list[str]:
    """The last extension of each reading of ``name`` (usually one)."""
    if not name:
        return []
    out: list[str] = []
    for reading in _readings(name):
        suffixes = _suffixes(reading)
        if suffixes and suffixes[-1] not in out:
            out.append(suffixes[-1])
    return out


def has_extension(name: str | None, exts: Iterable[str], *, anywhere: bool = False) -> bool:
    """True when ``name`` ends in one of ``exts`` (``anywhere``: has one of them at all).

    ``exts`` are compared without the dot and case-insensitively (``"exe"``, ``".EXE"``).
    """
    wanted = {e.lower().lstrip(".") for e in exts}
    found = extensions(name) if anywhere else final_extensions(name)
    return any(e in wanted for e in found)


def suspicious_filename(name: str | None, dangerous: Iterable[str] = DANGEROUS_EXTENSIONS) -> list[str]:
    """Reasons why ``name`` looks like a trick or a risk; empty when it looks harmless."""
    if not name:
        return []
    reasons: list[str] = []
    if "\0" in name:
        reasons.append("NUL character in the name")
    if any(ch in BIDI_CONTROLS for ch in name):
        reasons.append("bidirectional override character (the displayed name is not the real one)")
    if any(ch in INVISIBLE for ch in name):
        reasons.append("invisible character in the name")
    if any(unicodedata.category(ch) == "Cc" for ch in name.replace("\0", "")):
        reasons.append("control character in the name")
    if _PATH_SEP.search(name):
        reasons.append("path separator in the name")
    if name.rstrip() != name.rstrip(_TRAILING) or _ADS.search(name.rstrip()):
        reasons.append("trailing dots, spaces or stream suffix (ignored by Windows)")
    dangerous = {e.lower().lstrip(".") for e in dangerous}
    finals = final_extensions(name)
    bad = [e for e in finals if e in dangerous]
    if bad:
        reasons.append(f"dangerous extension .{bad[0]}")
    exts = extensions(name)
    if bad and len(exts) > 1:
        reasons.append("double extension " + ".".join(exts))
    return reasons


def is_dangerous_filename(name: str | None, dangerous: Iterable[str] = DANGEROUS_EXTENSIONS) -> bool:
    """True for a dangerous final extension or a name that hides its real extension."""
    reasons = suspicious_filename(name, dangerous)
    return any(r.startswith(("dangerous extension", "bidirectional", "NUL")) for r in reasons)


def names_differ(a: str | None, b: str | None) -> bool:
    """True when two names for one part (Content-Type name, Content-Disposition filename)
    would be saved as different files: a sign of a filter-evasion attempt."""
    if not a or not b:
        return False
    return normalize_filename(a).casefold() != normalize_filename(b).casefold()
