"""Mount syscalls and the mount table, for views (bind mounts of a hierarchy).

A bind mount tells FUSE nothing, so the daemon learns that a view went away
by watching /proc/self/mountinfo, which signals changes with POLLPRI.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import select
from dataclasses import dataclass

MS_RDONLY = 1
MS_REMOUNT = 32
MS_BIND = 4096
MNT_DETACH = 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def bind(source: str, target: str, read_only: bool = False) -> None:
    _check(
        _libc.mount(os.fsencode(source), os.fsencode(target), None, MS_BIND, None),
        f"bind {source} on {target}",
    )
    if read_only:
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        _check(_libc.mount(None, os.fsencode(target), None, flags, None), f"remount {target} ro")


def umount(target: str, lazy: bool = False) -> None:
    _check(_libc.umount2(os.fsencode(target), MNT_DETACH if lazy else 0), f"umount {target}")


_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True, slots=True)
class Mount:
    mount_id: int
    device: str  # "major:minor"
    root: str
    mount_point: str
    fstype: str
    #: the per-mount options ("rw,nosuid,relatime")
    options: str = ""

    @property
    def read_only(self) -> bool:
        return "ro" in self.options.split(",")


def read_mounts(path: str = "/proc/self/mountinfo") -> list[Mount]:
    mounts = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            mounts.append(
                Mount(
                    int(fields[0]),
                    fields[2],
                    _unescape(fields[3]),
                    _unescape(fields[4]),
                    fields[sep + 1],
                    fields[5],
                )
            )
    return mounts


class MountTableWatch:
    """An epoll fd that becomes readable when this mount namespace's table changes.

    mountinfo is always readable (POLLIN), so it cannot go straight into
    trio's epoll; an inner epoll that waits for POLLPRI alone can.
    """

    def __init__(self) -> None:
        self._file = open("/proc/self/mountinfo", "rb")  # noqa: SIM115 - lives as long as the watch
        self._epoll = select.epoll()
        self._epoll.register(self._file.fileno(), select.EPOLLPRI | select.EPOLLERR)

    def fileno(self) -> int:
        return self._epoll.fileno()

    def consume(self) -> None:
        """Clear the inner epoll after a wakeup.

        The readiness check that woke the caller already consumed the change
        (mounts_poll reports POLLPRI once per change and open file), so a
        wakeup is the signal itself: callers re-read the table every time.
        """
        self._epoll.poll(0)

    def close(self) -> None:
        self._epoll.close()
        self._file.close()
