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

import errno
import grp
import logging
import os
import pwd
import socket
import stat
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

    Nothing here follows a link: a directory is made with ``mkdir`` in its parent
    (opened once), opened with ``O_DIRECTORY | O_NOFOLLOW``, checked on that descriptor
    and changed with ``fchown``/``fchmod`` on it, so swapping the name for a link between
    the steps changes nothing of anyone else's (a compromised ``defang`` user must not
    turn root's next start into a chown of /etc).  One that is there already is taken
    only if it is a real directory owned by root, by us or by the daemons' user, and
    writable by its owner alone; anything else stops defang with one line naming the
    path, its owner and what was expected (``refusal``): a local user who made
    ``/tmp/defang-1000`` first must not get the sockets, the spool or the quarantine.
    """
    for path, mode in directories:
        _prepare(path, mode, ident)


def _prepare(path: Path, mode: int, ident: Identity | None) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # the admin's path above ours, as written
        parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise PrivilegeError(f"{path.parent}: cannot prepare: {exc.strerror}") from None
    try:
        try:
            os.mkdir(path.name, mode, dir_fd=parent)
            made = True
        except FileExistsError:
            made = False
        fd = os.open(path.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            what = "a symbolic link" if os.path.islink(path) else "not a directory"
            raise PrivilegeError(f"{path}: is {what}; defang's directories must be real ones: remove "
                                 "it") from None  # fmt: skip
        raise PrivilegeError(f"{path}: cannot prepare: {exc.strerror}") from None
    finally:
        os.close(parent)
    try:
        st = os.fstat(fd)
        owner = ident.uid if ident is not None else os.geteuid()
        why = None if made else refusal(path, st, mode, owner)
        if why:
            raise PrivilegeError(why)
        if ident is not None:
            os.fchown(fd, ident.uid, ident.gid)
        if ident is not None or st.st_uid == os.geteuid():
            os.fchmod(fd, mode)  # else root's, not ours to change, and safe as it is (refusal)
    except OSError as exc:
        raise PrivilegeError(f"{path}: cannot prepare: {exc.strerror}") from None
    finally:
        os.close(fd)


def refusal(path: Path, st: os.stat_result, mode: int, owner: int) -> str | None:
    """Why an existing directory may not be taken as defang's (``owner``'s), or None.

    Taken: owned by root or ``owner`` (then given to ``owner``), and writable by its
    owner alone (what another user could have put inside is not trusted).
    """
    whose = "root" if owner == 0 else f"root or {user_name(owner)}"
    expected = f"expected a directory owned by {whose}, mode {mode:04o}"
    if st.st_uid not in (0, owner):
        return (f"{path}: owned by {user_name(st.st_uid)}, not by {whose}: refusing to use it ({expected}; "
                "remove it or name another in the config)")  # fmt: skip
    if st.st_mode & 0o022:
        return (f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets others write to it: refusing to use it "
                f"({expected}; remove it or chmod {mode:04o} it)")  # fmt: skip
    return None


def user_name(uid: int) -> str:
    """``name`` of a uid, or ``uid N`` when it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def others_may_change(path: Path, trusted: frozenset[int] = frozenset({0})) -> str | None:
    """Who but root (and ``trusted``) may change ``path``: the first of it and the
    directories above it that someone else may write to, said in a few words, or None.

    As ``postfix check`` does for Postfix's files: each must be owned by root and
    writable by no group but root's and by nobody else; a directory writable by all with
    the sticky bit (``/tmp``) only lets others add names, so it does not count.
    """
    path = Path(path).resolve()
    for p in (path, *path.parents):
        try:
            st = os.stat(p)
        except OSError:
            return None  # not there: the command itself says so
        if st.st_uid not in trusted:
            return f"{p} is owned by {user_name(st.st_uid)}"
        if st.st_mode & 0o020 and st.st_gid != 0:
            try:
                group = grp.getgrgid(st.st_gid).gr_name
            except KeyError:
                group = f"gid {st.st_gid}"
            return f"{p} is writable by group {group}"
        if st.st_mode & 0o002 and not (p != path and st.st_mode & stat.S_ISVTX):
            return f"{p} is writable by everyone"
    return None


def unsafe_files(files: dict[str, Path | None], daemon_user: str) -> list[str]:
    """One warning line for each of ``files`` (what: path) that others than root may change.

    The daemons run as ``daemon_user`` (started as root) or as whoever started them: a
    filter (or a directory above it) that user may write lets a compromised worker
    rewrite the code every later worker runs, and the config names the filter.  A user
    who is neither root nor ``daemon_user`` (someone trying a filter of their own) is
    trusted with their own files: nothing would separate the workers from them anyway.
    """
    me = os.geteuid()
    trusted = frozenset({0} if me == 0 or user_name(me) == daemon_user else {0, me})
    out = []
    for what, path in files.items():
        why = others_may_change(path, trusted) if path is not None else None
        if why:
            out.append(f"{path}: warning: {why}: only root should be able to change the {what} or a "
                       "directory above it (SECURITY.md)")  # fmt: skip
    return out


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
                       directories: list[tuple[Path, int]],
                       files: tuple[Path, ...] = ()) -> Identity | None:  # fmt: skip
    """What a daemon does first: directories ready, then root given up.  None: not root.

    ``files``: the daemons' own files inside those directories that root may have made
    before the daemons ever ran (``defang test`` as root with a filter that keeps state
    makes the SQLite file root's, which the workers then could not open: every message
    would get ``[state] on_error``); given to the daemons' user (``give_files``)."""
    if os.geteuid() != 0:
        prepare(directories, None)
        return None
    ident = lookup(cfg_user, cfg_group, socket_groups)
    prepare(directories, ident)
    give_files(files, ident)
    if ident.uid == 0:
        log.warning("[daemon] user = %s: every defang process, the filter's too, runs as root",
                    cfg_user)  # fmt: skip
        return ident
    drop(ident)
    log.info("running as %s (uid %d, gid %d)", ident.user, ident.uid, ident.gid)
    return ident


def give_files(files: tuple[Path, ...], ident: Identity) -> None:
    """Give each existing regular file to ``ident``, never following a link (``O_NOFOLLOW``,
    ``fchown`` on what was opened): they lie in a directory ``prepare`` made the daemons'
    own, so nobody else can have put them there, but a link must still not be followed."""
    for path in files:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise PrivilegeError(f"{path}: cannot give it to {ident.user}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise PrivilegeError(f"{path}: not a regular file; defang's state must be one: remove it")
            if (st.st_uid, st.st_gid) != (ident.uid, ident.gid):
                os.fchown(fd, ident.uid, ident.gid)
        finally:
            os.close(fd)


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


def give_log_file(path: Path, user: str, group: str) -> None:
    """``[log] file``, made (or taken) for the daemons' user while still root: the
    daemons open it again as that user (each at its start, and after a rotation).  Never
    through a link, never waiting (a FIFO with no reader); a file that cannot be made is
    left to the log's fallback (stderr)."""
    if os.geteuid() != 0:
        return
    ident = lookup(user, group, ())
    try:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(path, flags, 0o640)
    except OSError as exc:
        log.warning("[log] file %s: %s: logging to standard error", path, exc.strerror or exc)
        return
    try:
        os.fchown(fd, ident.uid, ident.gid)
    finally:
        os.close(fd)


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
