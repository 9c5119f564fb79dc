"""``--user``/``--group``: start as root, then run as an ordinary user.

twistd's own ``-u/-g`` switch user after ``privilegedStartService`` and before
``startService``; that only helps services that bind in
``privilegedStartService``, and a node binds its ports in ``startService``
(the mail listeners even later, once the store is recovered) and creates its
databases while the service tree is built, as root.  So :class:`RunAs`, a
child of the node, does it in ``privilegedStartService`` (after twistd has
written its pid and log files, before anything listens): it hands the data
directory to the user, switches groups and user for every thread, and keeps
exactly one capability, ``CAP_NET_BIND_SERVICE`` (Linux), when a configured
port is below 1024, so ports such as 25, 110 and 143 still bind.  Nothing
else of root survives: the process cannot switch back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import grp
import os
import pwd
import stat
from collections.abc import Iterable
from pathlib import Path

import attrs
from twisted.application.service import Service
from twisted.logger import Logger

CAP_NET_BIND_SERVICE = 10
_PR_SET_KEEPCAPS = 8
_LINUX_CAPABILITY_VERSION_3 = 0x20080522


@attrs.frozen
class Account:
    """Whom to run as."""

    name: str
    uid: int
    gid: int
    group: str | None  # None: the user's own groups (initgroups)


def lookup_account(user: str, group: str | None = None) -> Account:
    """The :class:`Account` for ``user`` (name or number) and optional ``group``."""
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise KeyError(f"--user {user}: no such user") from None
    gid = pw.pw_gid
    if group:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise KeyError(f"--group {group}: no such group") from None
    return Account(pw.pw_name, pw.pw_uid, gid, group)


def _may(
    st: os.stat_result, account: Account, groups: set[int], bits: tuple[int, int, int]
) -> bool:
    if st.st_uid == account.uid:
        return bool(st.st_mode & bits[0])
    if st.st_gid in groups:
        return bool(st.st_mode & bits[1])
    return bool(st.st_mode & bits[2])


def unreadable_for(account: Account, paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Those of ``paths`` (directories) that ``account`` could not list and enter."""
    groups = {account.gid}
    if account.group is None:
        groups |= set(os.getgrouplist(account.name, account.gid))
    search = (stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH)
    read = (stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH)
    bad = []
    for path in paths:
        p = Path(path).resolve()
        try:
            ok = all(_may(d.stat(), account, groups, search) for d in (*p.parents, p))
            ok = ok and _may(p.stat(), account, groups, read)
        except OSError:
            ok = False
        if not ok:
            bad.append(str(p))
    return bad


def code_dirs() -> list[str]:
    """Where the modules a node may still import after switching user come from."""
    import twisted
    import yimaporc

    return sorted(
        {
            os.path.dirname(os.__file__),  # the standard library
            os.path.dirname(os.path.dirname(twisted.__file__)),
            os.path.dirname(os.path.dirname(yimaporc.__file__)),
        }
    )


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def chown_tree(root: Path, uid: int, gid: int) -> int:
    """Give ``root`` and everything under it to ``uid:gid`` (symlinks not followed)."""
    changed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            st = os.lstat(name)
            if st.st_uid != uid or st.st_gid != gid:
                os.lchown(name, uid, gid)
                changed += 1
    return changed


def switch_user(account: Account, keep_bind: bool) -> None:
    """Become ``account`` for good; with ``keep_bind``, keep CAP_NET_BIND_SERVICE."""
    libc = _libc() if keep_bind else None
    if libc is not None:
        _check(libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    if account.group is None:
        os.initgroups(account.name, account.gid)
    else:
        os.setgroups([account.gid])
    os.setgid(account.gid)
    os.setuid(account.uid)
    if libc is not None:
        header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        data[0].effective = data[0].permitted = 1 << CAP_NET_BIND_SERVICE
        _check(libc.capset(ctypes.byref(header), data), "capset(CAP_NET_BIND_SERVICE)")
        _check(libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    if account.uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            pass
        else:  # pragma: no cover - would mean the switch did not hold
            raise RuntimeError("switched user but could become root again")


class RunAs(Service):
    """Switches the process to ``account`` in ``privilegedStartService``."""

    log = Logger()
    name = "run-as"

    def __init__(self, account: Account, dirs: Iterable[Path], ports: Iterable[int]) -> None:
        self.account = account
        #: The data directory and any disk directories (``--disk``) outside it.
        self.dirs = list(dirs)
        self.keep_bind = any(p < 1024 and p != 0 for p in ports)

    def privilegedStartService(self) -> None:
        """Hand over the data (and disk) directories, then switch user (keeping the bind cap)."""
        super().privilegedStartService()
        a = self.account
        if os.geteuid() == a.uid and os.getegid() == a.gid:
            return
        changed = sum(chown_tree(d, a.uid, a.gid) for d in self.dirs if d.exists())
        switch_user(a, self.keep_bind)
        self.log.info(
            "running as {user} (uid {uid}, gid {gid}); {n} entries of {dir} handed over{cap}",
            user=a.name,
            uid=a.uid,
            gid=a.gid,
            n=changed,
            dir=", ".join(map(str, self.dirs)),
            cap=", keeping CAP_NET_BIND_SERVICE" if self.keep_bind else "",
        )
