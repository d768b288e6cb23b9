"""Plain /proc reads: the ground truth at start-up, after lost events, and
whenever the proc connector is unavailable.

Every task may vanish at any moment while we read, so every read treats
"no such file" and "no such process" as "this task is gone" and moves on.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PF_KTHREAD = 0x00200000
PF_NO_SETAFFINITY = 0x04000000

#: states of a task that has exited but is not yet (or no longer) visible as gone
_DEAD_STATES = frozenset({"Z", "X"})
#: what thread_state gives for a thread that cannot run: stopped, traced-stopped,
#: dead, or gone (None)
_NOT_RUNNING_STATES = frozenset({"T", "t", None}) | _DEAD_STATES


@dataclass(frozen=True, slots=True)
class TaskInfo:
    """One thread's facts from /proc/.../stat.

    ``(tid, start_time)`` identifies a task across pid reuse; ``start_time`` is
    in clock ticks since boot, as the kernel reports it.
    """

    tid: int
    tgid: int
    ppid: int
    start_time: int
    state: str
    flags: int


def scan_tasks(proc: str = "/proc") -> dict[int, TaskInfo]:
    """Every live thread on the system, keyed by tid.

    Zombies are left out, including a leader that has exited while its other
    threads live on: those threads are listed, with its tgid, but it is not.
    """
    tasks: dict[int, TaskInfo] = {}
    for tgid, tids in _walk(proc):
        for tid in tids:
            text = _read_text(f"{proc}/{tgid}/task/{tid}/stat")
            if text is None:
                continue
            info = parse_stat(text, tid, tgid)
            if info.state not in _DEAD_STATES:
                tasks[tid] = info
    return tasks


def scan_tids(proc: str = "/proc") -> dict[int, int]:
    """tid -> tgid from directory listings alone; zombies are included.

    About one listing per process instead of one file read per thread: enough
    to spot tasks that appeared or vanished, then read only those.
    """
    return {tid: tgid for tgid, tids in _walk(proc) for tid in tids}


def read_task(tid: int, proc: str = "/proc") -> TaskInfo | None:
    """One task by tid (a thread's tid works too); None if gone or a zombie.

    Both files are opened through one directory fd: it pins the task, so a
    task that dies and whose tid is reused in between cannot mix two tasks'
    facts (reads then fail instead).
    """
    try:
        dir_fd = os.open(f"{proc}/{tid}", os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        stat = _read_text("stat", dir_fd)
        status = _read_text("status", dir_fd)
    finally:
        os.close(dir_fd)
    if stat is None or status is None:
        return None
    tgid = _status_field(status, "Tgid:")
    if tgid is None:
        return None
    info = parse_stat(stat, tid, int(tgid[0]))
    return None if info.state in _DEAD_STATES else info


def parse_stat(text: str, tid: int, tgid: int) -> TaskInfo:
    """Parse a stat line. The comm (field 2) may hold spaces and ')', but the
    kernel writes it in parentheses with nothing else after the last ')'."""
    fields = text[text.rindex(")") + 2 :].split()
    # man proc numbering is 1-based, and fields[0] is field 3 (state).
    return TaskInfo(
        tid=tid,
        tgid=tgid,
        ppid=int(fields[4 - 3]),
        start_time=int(fields[22 - 3]),
        state=fields[3 - 3],
        flags=int(fields[9 - 3]),
    )


def read_ids(tid: int, proc: str = "/proc") -> tuple[int, int, int] | None:
    """(real, effective, saved) uid of a task, or None if it is gone."""
    status = _read_text(f"{proc}/{tid}/status")
    if status is None:
        return None
    uids = _status_field(status, "Uid:")
    if uids is None:
        return None
    real, effective, saved = (int(u) for u in uids[:3])
    return real, effective, saved


def is_unmovable_kthread(info: TaskInfo) -> bool:
    """The kernel refuses (EINVAL) to move tasks with PF_NO_SETAFFINITY: kernel
    threads bound to CPUs, which could be trapped by a cpuset otherwise."""
    return bool(info.flags & PF_NO_SETAFFINITY)


def process_threads(tgid: int, proc: str = "/proc") -> list[int]:
    """The tids of one process, ascending; [] if it is gone."""
    return sorted(_list_numeric(f"{proc}/{tgid}/task"))


def thread_state(tgid: int, tid: int, proc: str = "/proc") -> str | None:
    """The state letter of one thread (/proc/TGID/task/TID/stat field 3), None if gone."""
    text = _read_bytes(f"{proc}/{tgid}/task/{tid}/stat")
    return chr(text[text.rindex(b")") + 2]) if text else None


def thread_children(tgid: int, tid: int, proc: str = "/proc") -> list[int]:
    """The processes one thread forked that still live (CONFIG_PROC_CHILDREN).

    The list is exact once the thread is stopped, which is when it matters:
    a child forked just before the stop, that the tracker has not placed yet
    (a /proc scan without netlink), is found here and nowhere else.
    """
    text = _read_bytes(f"{proc}/{tgid}/task/{tid}/children")
    return [int(pid) for pid in text.split()] if text else []


def process_stopped(tgid: int, proc: str = "/proc") -> bool:
    """True once no thread of the process can run: each is stopped, traced-stopped or dead.

    A process that is gone counts as stopped: it forks no more either.
    """
    return all(
        thread_state(tgid, tid, proc) in _NOT_RUNNING_STATES
        for tid in _list_numeric(f"{proc}/{tgid}/task")
    )


def process_children(tgid: int, proc: str = "/proc") -> set[int]:
    """The live children of every thread of a process (each child is listed under its forker)."""
    return {
        child
        for tid in _list_numeric(f"{proc}/{tgid}/task")
        for child in thread_children(tgid, tid, proc)
    }


# ----------------------------------------------------------------- helpers


def _walk(proc: str) -> list[tuple[int, list[int]]]:
    return [(tgid, _list_numeric(f"{proc}/{tgid}/task")) for tgid in _list_numeric(proc)]


def _list_numeric(path: str) -> list[int]:
    try:
        names = os.listdir(path)
    except (FileNotFoundError, ProcessLookupError):
        return []
    return [int(name) for name in names if name.isdigit()]


def _read_text(path: str, dir_fd: int | None = None) -> str | None:
    """The first 4 KiB of a /proc file, which hold every field we use, or None
    if the task is gone (ESRCH shows up when it dies between open and read)."""
    try:
        fd = os.open(path, os.O_RDONLY, dir_fd=dir_fd)
    except (FileNotFoundError, ProcessLookupError):
        return None
    try:
        data = os.read(fd, 4096)
    except ProcessLookupError:
        return None
    finally:
        os.close(fd)
    # An empty read means the task died after open.
    return data.decode("utf-8", "surrogateescape") if data else None


def _read_bytes(path: str) -> bytes:
    """A whole small /proc file (up to 64 KiB: a children list can be long), b"" if gone."""
    try:
        with open(path, "rb") as f:
            return f.read(65536)
    except (FileNotFoundError, ProcessLookupError):
        return b""


def _status_field(status: str, key: str) -> list[str] | None:
    # Split at "\n" only: the kernel escapes it in the Name line, but not
    # characters that str.splitlines() also breaks at (such as U+0085), so a
    # chosen comm could otherwise forge a "Uid:" or "Tgid:" line.
    for line in status.split("\n"):
        if line.startswith(key):
            return line[len(key) :].split()
    return None


#: The capability bit release_agent needs (linux/capability.h).
CAP_SYS_ADMIN = 21


def user_ns(path: str) -> tuple[int, int]:
    """A user namespace's identity (device, inode) from its /proc/.../ns/user link."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def has_sys_admin(tid: int, own_user_ns: tuple[int, int], proc: str = "/proc") -> bool:
    """Whether thread `tid` holds CAP_SYS_ADMIN, effective, in the daemon's user namespace.

    Capabilities are per thread, so this reads the thread's own status. The
    kernel wants the capability in the initial user namespace: the root of a
    user namespace of its own has every bit of CapEff, but only over that
    namespace, so a thread in another user namespace than the daemon's does
    not count. A thread gone meanwhile holds nothing.
    """
    try:
        if user_ns(f"{proc}/{tid}/ns/user") != own_user_ns:
            return False
        with open(f"{proc}/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_SYS_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False
