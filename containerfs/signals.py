"""Signals sent safely: through pidfds, never to what must not be touched.

Every part that stops, continues or kills tasks (cgroup.kill, numtasks,
the freezer) goes through here, so the rules live in one place: never the
daemon, its ancestors, pid 1 or kernel threads; and never a process that
reused the pid of the one meant (the pidfd is opened, then the process's
start time is checked, then the signal goes through the pidfd).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal

from containerfs.tracking import procscan

log = logging.getLogger(__name__)

_SYS_PIDFD_SEND_SIGNAL = 424
_libc = ctypes.CDLL(None, use_errno=True)


def _ancestry(pid: int) -> set[tuple[int, int]]:
    """(pid, start time) of `pid` and every process above it."""
    found: set[tuple[int, int]] = set()
    seen: set[int] = set()
    while pid > 0 and pid not in seen:
        seen.add(pid)
        info = procscan.read_task(pid)
        if info is None:
            break
        found.add((pid, info.start_time))
        pid = info.ppid
    return found


#: the daemon and every process above it at start-up, by (pid, start time): an
#: ancestor can only exit, never be replaced
PROTECTED: frozenset[tuple[int, int]] = frozenset(_ancestry(os.getpid()))


def _protected(pid: int, info: procscan.TaskInfo) -> bool:
    return pid <= 1 or (pid, info.start_time) in PROTECTED or bool(
        info.flags & procscan.PF_KTHREAD
    )


def is_protected(pid: int) -> bool:
    """True for the daemon, its ancestors (the very processes), pid 1 and kernel threads."""
    if pid <= 1:
        return True
    info = procscan.read_task(pid)
    return info is not None and _protected(pid, info)


def pidfd_send_signal(pidfd: int, sig: int) -> None:
    if _libc.syscall(_SYS_PIDFD_SEND_SIGNAL, pidfd, sig, None, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def signal_process(pid: int, sig: int, start_time: int | None = None) -> bool:
    """Send `sig` to process `pid` through a pidfd; False if it is gone or protected.

    The pidfd is opened first and the process read once after: that one read
    says both whether it may be signalled and whether it is still the one
    that started at `start_time` (a reused pid is left alone).
    """
    if pid <= 1:
        log.warning("refusing to send %s to pid %d", signal.Signals(sig).name, pid)
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno in (errno.ESRCH, errno.EINVAL):
            return False
        raise
    try:
        info = procscan.read_task(pid)
        if info is None or (start_time is not None and info.start_time != start_time):
            return False
        if _protected(pid, info):
            log.warning("refusing to send %s to protected pid %d (daemon, ancestor, kernel "
                        "thread)", signal.Signals(sig).name, pid)
            return False
        pidfd_send_signal(pidfd, sig)
        return True
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)
