"""Who the daemons run as: root only long enough to make their directories, then ``[daemon] user``.

Started as root, ``defang run`` (and ``defang milter`` or ``defang multiplexor`` started on
their own) makes the runtime, spool and quarantine directories and gives them to the
unprivileged user, then switches to that user and group for good (``setgroups``,
``setgid``, ``setuid``: the saved IDs go too, so nothing can switch back, and Linux clears
every capability with uid 0).  Every other process of defang -- the multiplexor, the zygote,
the workers running the admin's filter.py on hostile mail, the milter front end -- is forked
after that and never was root.  The sockets are made afterwards, by the daemons that own
them, already as that user: the supplementary groups kept are exactly the ones the
sockets are given to (``[milter] socket_group`` for the MTA, ``[multiplexor]
control_group`` for the admins), because a process may give its file only to a group it
is in.

Started as any other user, defang runs as that user and changes nothing.  ``user =
"root"`` is allowed, for a test box, and logged as a warning at every start.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("defang.privileges")

#: directories holding mail: only the daemons' user may enter them
PRIVATE_DIR_MODE = 0o700
#: the runtime dir: others (the MTA, admins) may reach the sockets inside by name,
#: whose own modes and groups decide who may connect; nobody else may list it
RUNTIME_DIR_MODE = 0o711


class PrivilegeError(Exception):
    """The daemons cannot run as configured; the text says what to change."""


@dataclass(frozen=True)
class Identity:
    user: str
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary: the socket groups


def lookup(user: str, group: str, socket_groups: tuple[str, ...]) -> Identity:
    """The uid, gid and socket groups named in the config; PrivilegeError if one is missing.

    A socket group that does not exist is skipped (the socket keeps the daemon's group,
    and the milter logs so): a box without Postfix has no ``postfix`` group.
    """
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(
            f"[daemon] user {user!r} does not exist: create it (adduser --system --group "
            f"--no-create-home {user}; scripts/bootstrap does) or name another user"
        ) from None
    try:
        gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
    except KeyError:
        raise PrivilegeError(f"[daemon] group {group!r} does not exist: create it or name another") from None
    extra = []
    for name in socket_groups:
        try:
            extra.append(grp.getgrnam(name).gr_gid)
        except KeyError:
            continue
    return Identity(user, pw.pw_uid, gid, tuple(dict.fromkeys([gid, *extra])))


def prepare(directories: list[tuple[Path, int]], ident: Identity | None) -> None:
    """Make each directory (mode as given) and, as root, give it to the daemons' user.

    An existing directory is taken as it is, but its mode is set and, as root, its owner:
    so a runtime dir made by an older version or by systemd ends up as documented.  A
    symlink is refused: a directory of ours must be a directory.
    """
    for path, mode in directories:
        if path.is_symlink():
            raise PrivilegeError(f"{path}: is a symbolic link; defang's directories must be real ones")
        try:
            if ident is None and path.is_dir() and path.stat().st_uid != os.geteuid():
                continue  # not ours to change (a shared directory): used as it is
            path.mkdir(parents=True, exist_ok=True)
            if ident is not None:
                os.chown(path, ident.uid, ident.gid)
            os.chmod(path, mode)
        except OSError as exc:
            raise PrivilegeError(f"{path}: cannot prepare: {exc.strerror}") from None


def drop(ident: Identity) -> None:
    """Become ``ident`` for good, and check nothing of root is left."""
    os.setgroups(list(ident.groups))
    os.setresgid(ident.gid, ident.gid, ident.gid)
    os.setresuid(ident.uid, ident.uid, ident.uid)
    held = capabilities()
    if ident.uid != 0 and (os.getresuid() != (ident.uid,) * 3 or any(held.values())):
        raise PrivilegeError(f"still privileged after switching to {ident.user}: {os.getresuid()} {held}")


def capabilities(pid: int | str = "self") -> dict[str, int]:
    """CapPrm, CapEff and CapAmb of a process, from /proc (0 each: it holds none)."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("CapPrm", "CapEff", "CapAmb"):
            out[key] = int(value.strip(), 16)
    return out


def become_daemon_user(cfg_user: str, cfg_group: str, socket_groups: tuple[str, ...],
                       directories: list[tuple[Path, int]]) -> Identity | None:  # fmt: skip
    """What a daemon does first: directories ready, then root given up.  None: not root."""
    if os.geteuid() != 0:
        prepare(directories, None)
        return None
    ident = lookup(cfg_user, cfg_group, socket_groups)
    prepare(directories, ident)
    if ident.uid == 0:
        log.warning("[daemon] user = %s: every defang process, the filter's too, runs as root",
                    cfg_user)  # fmt: skip
        return ident
    drop(ident)
    log.info("running as %s (uid %d, gid %d)", ident.user, ident.uid, ident.gid)
    return ident


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket (SO_PEERCRED)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def peer_groups(pid: int, uid: int, gid: int) -> set[int]:
    """The peer's groups: from /proc while it lives, else its user's as the system lists them."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return {gid, *(int(g) for g in line.split()[1:])}
    except OSError:
        pass
    try:
        return set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
    except KeyError:
        return {gid}


def refuse_change(peer: tuple[int, int, int] | None, admin_group: str) -> str | None:
    """Why a control client may not change the running daemons (reload, stop), or None.

    Allowed: root, the daemons' own user, and members of ``admin_group`` (the control
    socket's group).  The socket's mode keeps everyone else out already; this holds even
    when an admin opens the socket wider so that monitoring may read the status.
    """
    if peer is None:
        return "the client's credentials are unknown"
    pid, uid, gid = peer
    if uid in (0, os.geteuid()):
        return None
    try:
        admin_gid = grp.getgrnam(admin_group).gr_gid if admin_group else os.getegid()
    except KeyError:
        admin_gid = os.getegid()
    if admin_gid in peer_groups(pid, uid, gid):
        return None
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    group = admin_group or grp.getgrgid(admin_gid).gr_name
    return f"uid {uid} ({name}) is not root, defang's user or in group {group}"


def give_socket(path: Path, mode: int, group: str) -> None:
    """Set a socket file's mode and, if the group exists, its group (we must be in it)."""
    os.chmod(path, mode)
    if not group:
        return
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        log.info("no group %r on this system: socket %s keeps its group", group, path)
        return
    try:
        os.chown(path, -1, gid)
    except PermissionError as exc:
        log.warning("cannot give socket %s to group %s: %s", path, group, exc.strerror)
