"""cpuacct: the seeds' example subsystem, CPU time per container (spec 7.2).

The kernel charges every scheduler tick of runtime to the task's group and
its ancestors. Userspace cannot hook the scheduler, so this samples each
member thread's own counters instead: sum_exec_runtime from
/proc/TGID/task/TID/schedstat (ns, the very counter the kernel's
cpuacct.usage adds up), and the user/system split and last CPU from
/proc/TGID/task/TID/stat (the thread's own; /proc/TID/stat sums its whole
process). A task's
time counts from a baseline taken when it joins (zero for a fresh fork, whose
counters start at zero) to the delta taken when it leaves or exits, so usage
survives exits and moves. Deltas are charged to the container and all its
non-root ancestors, as the kernel charges them, so a parent counts its
descendants and a reset (writing 0) clears only the container written.

An exited task's final time comes, in this order, from its zombie's /proc
entry if it is still there (exact), from the taskstats exit record (a generic
netlink family; exact when kernel.task_delayacct=1, else the kernel's
tick-sampled utime+stime), or from the last sample (short by at most one
sampling period of its CPU time). The root counts everything on the machine,
from /proc/stat. The man page states these bounds.

The counters survive a crash of the daemon: each container's are journaled
as one item keyed by hierarchy and path, at most once per PERSIST_PERIOD and
only for the containers charged since, so the cost follows the containers in
use; a restart takes them back and restored tasks count from a fresh
baseline. What was charged after the last record, and what ran while no
daemon watched, is lost, never counted twice.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from containerfs.core.container import Container
from containerfs.core.files import Caller, ControlFile
from containerfs.core.parse import kstrtoull
from containerfs.core.subsystem import PerContainerItems
from containerfs.core.task import Task
from containerfs.errors import CgroupError
from containerfs.subsys import sysinfo

if TYPE_CHECKING:
    from containerfs.core.hierarchy import Hierarchy
    from containerfs.core.registry import Registry

log = logging.getLogger(__name__)

NAME = "cpuacct"
#: how often member threads are sampled
SAMPLE_PERIOD = 0.2
#: reads of a subtree with up to this many threads sample them on the spot
INLINE_MAX = 64
#: threads sampled between two checkpoints of the trio thread
BATCH = 32
#: the sampler takes at most about this share of the daemon's time: with many
#: tracked threads the period grows beyond SAMPLE_PERIOD instead
SAMPLER_SHARE = 0.1
#: how long an exit record waits for its exit event; the record often comes first, and
#: even before the fork event of a short-lived task has been applied
FINAL_TTL = 5.0
NSEC_PER_TICK = 1_000_000_000 // sysinfo.USER_HZ
#: the accumulated usage is journaled at most this often: a crash loses what ran since
PERSIST_PERIOD = 1.0


# ------------------------------------------------------------------ samples


@dataclass(slots=True)
class Sample:
    """One thread's counters at one moment."""

    total_ns: int
    utime: int  # clock ticks, scaled by the kernel so that utime + stime follow total_ns
    stime: int
    cpu: int
    start_time: int | None


def read_sample(task: Task) -> Sample | None:
    """A thread's counters, or None if it is gone (a zombie still reads).

    They come from /proc/TGID/task/TID: /proc/TID/stat is the whole thread
    group's utime and stime (summed over its threads, dead ones included),
    which would give a thread its process's user/system split.
    """
    try:
        dir_fd = os.open(f"/proc/{task.tgid}/task/{task.tid}", os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        stat = _read("stat", dir_fd)
        sched = _read("schedstat", dir_fd)
    finally:
        os.close(dir_fd)
    if not stat or not sched:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    # man proc numbering: fields[0] is field 3
    return Sample(
        total_ns=int(sched.split()[0]),
        utime=int(fields[14 - 3]),
        stime=int(fields[15 - 3]),
        cpu=int(fields[39 - 3]),
        start_time=int(fields[22 - 3]),
    )


def _read(name: str, dir_fd: int) -> bytes | None:
    try:
        fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)


def _split(delta_ns: int, du: int, ds: int, cumulative: Sample) -> tuple[int, int]:
    """Split a runtime delta into (user, system) by the ticks the kernel gave each."""
    if du + ds == 0:
        du, ds = cumulative.utime, cumulative.stime
        if du + ds == 0:
            return delta_ns, 0
    user = delta_ns * du // (du + ds)
    return user, delta_ns - user


# ---------------------------------------------------------------- taskstats

_NETLINK_GENERIC = 16
_GENL_ID_CTRL = 0x10
_CTRL_CMD_GETFAMILY = 3
_CTRL_ATTR_FAMILY_ID = 1
_CTRL_ATTR_FAMILY_NAME = 2
_NLM_F_REQUEST = 1
_NLM_F_ACK = 4
_NLMSG_ERROR = 2
_TASKSTATS_CMD_GET = 1
_TASKSTATS_CMD_NEW = 2
_TASKSTATS_CMD_ATTR_REGISTER_CPUMASK = 3
_TASKSTATS_TYPE_PID = 1
_TASKSTATS_TYPE_STATS = 3
_TASKSTATS_TYPE_AGGR_PID = 4
# offsets in struct taskstats (linux/taskstats.h, stable since version 1)
_OFF_RUN_VIRTUAL = 72  # cpu_run_virtual_total: sum_exec_runtime, with delay accounting on
_OFF_UTIME = 152  # ac_utime, us
_OFF_STIME = 160  # ac_stime, us
_SOL_NETLINK = 270
_NETLINK_NO_ENOBUFS = 5
_RCVBUF = 8 << 20


@dataclass(frozen=True, slots=True)
class Final:
    """A thread's CPU time at exit, from taskstats."""

    total_ns: int
    utime_ns: int
    stime_ns: int


def _attrs(data: bytes, pos: int, end: int) -> Iterable[tuple[int, bytes]]:
    while pos + 4 <= end:
        length, kind = struct.unpack_from("=HH", data, pos)
        if length < 4:
            return
        yield kind & 0x3FFF, data[pos + 4 : pos + length]
        pos += (length + 3) & ~3


def _attr(kind: int, payload: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(payload), kind) + payload + b"\0" * (-len(payload) % 4)


def _genl(family: int, cmd: int, attrs: bytes, flags: int = _NLM_F_REQUEST) -> bytes:
    body = struct.pack("=BBH", cmd, 1, 0) + attrs
    return struct.pack("=IHHII", 16 + len(body), family, flags, 1, 0) + body


class TaskstatsListener:
    """Exit records of every thread that exits on any CPU (root only, initial namespaces)."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.lost = 0

    def open(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_GENERIC)
        try:
            sock.bind((0, 0))
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, 33, _RCVBUF)  # SO_RCVBUFFORCE
            family = self._family(sock)
            cpus = f"0-{sysinfo.nr_cpu_ids() - 1}".encode() + b"\0"
            sock.send(
                _genl(
                    family,
                    _TASKSTATS_CMD_GET,
                    _attr(_TASKSTATS_CMD_ATTR_REGISTER_CPUMASK, cpus),
                    _NLM_F_REQUEST | _NLM_F_ACK,
                )
            )
            self._expect_ack(sock)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        self.sock = sock

    @staticmethod
    def _family(sock: socket.socket) -> int:
        name = _attr(_CTRL_ATTR_FAMILY_NAME, b"TASKSTATS\0")
        sock.send(_genl(_GENL_ID_CTRL, _CTRL_CMD_GETFAMILY, name))
        data = sock.recv(65536)
        _, kind = struct.unpack_from("=IH", data)
        if kind == _NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, 16)
            raise OSError(-code, f"TASKSTATS family: {os.strerror(-code)}")
        length = struct.unpack_from("=I", data)[0]
        for attr_kind, payload in _attrs(data, 20, length):
            if attr_kind == _CTRL_ATTR_FAMILY_ID:
                return struct.unpack_from("=H", payload)[0]
        raise OSError(errno.ENOENT, "no TASKSTATS generic netlink family")

    @staticmethod
    def _expect_ack(sock: socket.socket) -> None:
        data = sock.recv(65536)
        _, kind = struct.unpack_from("=IH", data)
        if kind == _NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, 16)
            if code:
                raise OSError(-code, f"taskstats registration: {os.strerror(-code)}")

    def fileno(self) -> int:
        assert self.sock is not None
        return self.sock.fileno()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def records(self) -> list[tuple[int, bytes]]:
        """Every (tid, struct taskstats) waiting in the socket (non-blocking)."""
        out: list[tuple[int, bytes]] = []
        if self.sock is None:
            return out
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return out
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.lost += 1
                    continue
                raise
            pos = 0
            while pos + 20 <= len(data):
                length = struct.unpack_from("=I", data, pos)[0]
                if length < 20:
                    break
                if data[pos + 16] == _TASKSTATS_CMD_NEW:
                    out.extend(_pid_records(data, pos + 20, pos + length))
                pos += (length + 3) & ~3

    def read(self) -> dict[int, Final]:
        """The final CPU times waiting, by tid."""
        finals: dict[int, Final] = {}
        for tid, stats in self.records():
            if len(stats) < _OFF_STIME + 8:
                continue
            (virtual,) = struct.unpack_from("=Q", stats, _OFF_RUN_VIRTUAL)
            (utime,) = struct.unpack_from("=Q", stats, _OFF_UTIME)
            (stime,) = struct.unpack_from("=Q", stats, _OFF_STIME)
            utime_ns, stime_ns = utime * 1000, stime * 1000
            finals[tid] = Final(_final_ns(virtual, utime_ns + stime_ns), utime_ns, stime_ns)
        return finals


def _final_ns(runtime_ns: int, ticked_ns: int) -> int:
    """The best estimate of a thread's total CPU time from its exit record.

    The runtime (sum_exec_runtime) is exact up to the scheduler's last update
    of it, at most one tick before the record was made; a thread that lived
    less than a tick often shows only a fraction of its time there. The
    tick-sampled utime+stime is unbiased but coarse (whole ticks). So a thread
    that ran for two ticks or more counts its runtime, a shorter one the larger
    of the two: summed over many short threads this follows the ticks' average.
    """
    if runtime_ns >= 2 * sysinfo.tick_ns():
        return runtime_ns
    return max(runtime_ns, ticked_ns)


def _pid_records(data: bytes, pos: int, end: int) -> Iterable[tuple[int, bytes]]:
    """The per-thread records (TASKSTATS_TYPE_AGGR_PID) of one message."""
    for kind, nested in _attrs(data, pos, end):
        if kind != _TASKSTATS_TYPE_AGGR_PID:
            continue
        tid = None
        stats = None
        for inner, payload in _attrs(nested, 0, len(nested)):
            if inner == _TASKSTATS_TYPE_PID:
                tid = struct.unpack_from("=I", payload)[0]
            elif inner == _TASKSTATS_TYPE_STATS:
                stats = payload
        if tid is not None and stats is not None:
            yield tid, stats


# ------------------------------------------------------------------- state


@dataclass(slots=True)
class Usage:
    """One container's charged time per possible CPU, in ns (descendants included)."""

    user: list[int] = field(default_factory=lambda: [0] * sysinfo.nr_cpu_ids())
    system: list[int] = field(default_factory=lambda: [0] * sysinfo.nr_cpu_ids())
    total: list[int] = field(default_factory=lambda: [0] * sysinfo.nr_cpu_ids())

    def reset(self) -> None:
        n = sysinfo.nr_cpu_ids()
        self.user, self.system, self.total = [0] * n, [0] * n, [0] * n


def _root_usage() -> Usage:
    """The root counts every task on the machine: /proc/stat's per-CPU times (USER_HZ)."""
    usage = Usage()
    with open("/proc/stat", "rb") as f:
        for line in f:
            if not line.startswith(b"cpu") or line[3:4] == b" ":
                continue
            parts = line.split()
            cpu = int(parts[0][3:])
            if cpu >= len(usage.total):
                continue
            user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in parts[1:8])
            usage.user[cpu] = (user + nice) * NSEC_PER_TICK
            usage.system[cpu] = (system + irq + softirq) * NSEC_PER_TICK
            usage.total[cpu] = usage.user[cpu] + usage.system[cpu]
    return usage


def _subsys(c: Container) -> Cpuacct:
    subsys = c.hierarchy.registry.subsystems[NAME]
    assert isinstance(subsys, Cpuacct)
    return subsys


def _usage(c: Container) -> Usage:
    """The counters of `c`, brought up to date first."""
    if c.is_root:
        return _root_usage()
    _subsys(c).catch_up(c)
    return c.state[NAME]


# ------------------------------------------------------------------- files


def _read_total(kind: str) -> Callable[[Container], str]:
    def read(c: Container) -> str:
        return f"{sum(getattr(_usage(c), kind))}\n"

    return read


def _read_percpu(kind: str) -> Callable[[Container], str]:
    def read(c: Container) -> str:
        return "".join(f"{v} " for v in getattr(_usage(c), kind)) + "\n"

    return read


def _read_all(c: Container) -> str:
    u = _usage(c)
    rows = "".join(f"{cpu} {u.user[cpu]} {u.system[cpu]}\n" for cpu in range(len(u.total)))
    return "cpu user system\n" + rows


def _read_stat(c: Container) -> str:
    u = _usage(c)
    return f"user {sum(u.user) // NSEC_PER_TICK}\nsystem {sum(u.system) // NSEC_PER_TICK}\n"


def _write_usage(c: Container, data: bytes, caller: Caller) -> None:
    if kstrtoull(data) != 0:
        raise CgroupError(errno.EINVAL, "cpuacct.usage can only be reset, by writing 0")
    if c.is_root:
        return  # the kernel does not reset the global counters either
    subsys = _subsys(c)
    subsys.catch_up(c)
    c.state[NAME].reset()
    subsys.journal_now(c)


_FILES = (
    ControlFile("usage", _read_total("total"), _write_usage, persist=False),
    ControlFile("usage_user", _read_total("user")),
    ControlFile("usage_sys", _read_total("system")),
    ControlFile("usage_percpu", _read_percpu("total")),
    ControlFile("usage_percpu_user", _read_percpu("user")),
    ControlFile("usage_percpu_sys", _read_percpu("system")),
    ControlFile("usage_all", _read_all),
    ControlFile("stat", _read_stat),
)


# --------------------------------------------------------------- subsystem


class Cpuacct(PerContainerItems):
    """Per-container CPU time: a baseline at join, deltas by sampling, the rest at leave."""

    name = NAME
    files = _FILES

    def __init__(self, registry: Registry) -> None:
        super().__init__(registry)
        #: last sample of every thread in a non-root container
        self.tracked: dict[Task, Sample] = {}
        self.taskstats: TaskstatsListener | None = None
        #: exit records of the last FINAL_TTL seconds, by tid: the exit event comes after
        self.finals: dict[int, Final] = {}
        self._finals_old: dict[int, Final] = {}
        #: exits seen before their taskstats record was read: tid -> (container, last
        #: sample, when); settled when the record comes, or from the last sample at expiry
        self._awaiting: dict[int, tuple[Container, Sample, float]] = {}
        self.counters = {"samples": 0, "exit_zombie": 0, "exit_taskstats": 0, "exit_last": 0}

    # ---------------------------------------------------------------- charge

    def _track(self, task: Task, sample: Sample) -> None:
        self.tracked[task] = sample

    def _untrack(self, task: Task) -> Sample | None:
        return self.tracked.pop(task, None)

    def _charge(self, c: Container, cpu: int, delta_ns: int, user_ns: int) -> None:
        """Add to `c` and its ancestors, as the kernel's cpuacct_charge() does (not the root)."""
        if delta_ns <= 0:
            return
        for node in c.ancestors():
            if node.is_root:
                break
            u: Usage = node.state[NAME]
            if cpu < len(u.total):
                u.total[cpu] += delta_ns
                u.user[cpu] += user_ns
                u.system[cpu] += delta_ns - user_ns
                self.changed.add(node)

    def _charge_delta(self, c: Container, old: Sample, new: Sample) -> bool:
        """Charge what ran between two samples of one task; False if `new` is not that task."""
        if old.start_time is not None and new.start_time != old.start_time:
            return False  # the tid was reused: the task itself is gone
        delta = new.total_ns - old.total_ns
        if delta < 0:
            return False
        user, _ = _split(delta, new.utime - old.utime, new.stime - old.stime, new)
        self._charge(c, new.cpu, delta, user)
        return True

    def _advance(self, task: Task, c: Container, new: Sample) -> None:
        old = self.tracked.get(task)
        if old is not None and self._charge_delta(c, old, new):
            self.tracked[task] = new

    def _container(self, task: Task) -> Container | None:
        h = self.hierarchy
        return task.cgroups.get(h.id) if h is not None else None

    def catch_up(self, c: Container) -> None:
        """Before a read: apply pending exits, and sample a small subtree on the spot."""
        self.registry.refresh(c)
        members = [t for node in c.walk() for t in node.tasks if t in self.tracked]
        if len(members) > INLINE_MAX:
            return  # the sampler's last pass stands (at most SAMPLE_PERIOD old)
        for task in members:
            sample = read_sample(task)
            home = self._container(task)
            if sample is not None and home is not None:
                self._advance(task, home, sample)

    # ----------------------------------------------------------------- hooks

    def create(self, container: Container) -> Usage:
        usage = Usage()
        saved = self.take_restored(container)
        if saved is not None:
            n = len(usage.total)
            usage.user = (saved[0] + [0] * n)[:n]
            usage.system = (saved[1] + [0] * n)[:n]
            usage.total = [u + s for u, s in zip(usage.user, usage.system, strict=True)]
        return usage

    def destroy(self, container: Container) -> None:
        """Its journaled usage goes too: a container made later at its path starts at 0."""
        container.state[NAME].reset()
        self.journal_now(container)

    def fork(self, task: Task, container: Container) -> None:
        if not container.is_root:
            # a new task's counters start at zero: counting from zero misses nothing
            self._track(task, Sample(0, 0, 0, 0, task.start_time))

    def stats(self) -> dict[str, int]:
        """How exits were settled: exact (zombie, taskstats) or from the last sample."""
        lost = self.taskstats.lost if self.taskstats is not None else 0
        return {**self.counters, "taskstats_lost": lost}

    def restore(self, task: Task, container: Container) -> None:
        """Back after a restart: only what it runs from now on is charged here."""
        if not container.is_root:
            sample = read_sample(task)
            if sample is not None:
                self._track(task, sample)

    def attach(self, dst: Container, tasks: Sequence[Task], sources: Sequence[Container]) -> None:
        for task, src in zip(tasks, sources, strict=True):
            sample = read_sample(task)
            if sample is None:
                continue  # exiting: its exit event settles it
            self._advance(task, src, sample)
            if dst.is_root:
                self._untrack(task)
            else:
                self._track(task, sample)

    def exit(self, task: Task, container: Container) -> None:
        last = self.tracked.get(task)
        if last is None:
            return
        self._drain_taskstats()
        record = self.finals.pop(task.tid, None) or self._finals_old.pop(task.tid, None)
        self._untrack(task)
        final = read_sample(task)
        if final is not None and self._charge_delta(container, last, final):
            self.counters["exit_zombie"] += 1
        elif record is not None:
            self.counters["exit_taskstats"] += 1
            self._charge_final(container, last, record)
        elif self.taskstats is not None:
            # reaped already, and its record not read yet: settle it when it is
            self._awaiting[task.tid] = (container, last, time.monotonic())
        else:
            self.counters["exit_last"] += 1

    def _charge_final(self, c: Container, last: Sample, record: Final) -> None:
        delta = record.total_ns - last.total_ns
        ticks = record.utime_ns + record.stime_ns
        user = delta * record.utime_ns // ticks if ticks else delta
        self._charge(c, last.cpu, delta, user)

    def unbind(self, hierarchy: Hierarchy) -> None:
        super().unbind(hierarchy)
        self.tracked.clear()
        self.finals.clear()
        self._finals_old.clear()
        self._awaiting.clear()

    # ------------------------------------------------------------ persistence

    def item_of(self, c: Container) -> list[list[int]] | None:
        """[user, system] ns per CPU (usage_* and stat derive from these); none at zero.

        The root is not kept: it reads the machine's counters.
        """
        u: Usage = c.state[NAME]
        return [u.user, u.system] if any(u.total) else None

    # ------------------------------------------------------------ background

    def _drain_taskstats(self) -> None:
        """Collect every exit record on the machine; a tid's exit event comes after it."""
        if self.taskstats is not None:
            self.finals.update(self.taskstats.read())
        for tid in [t for t in self._awaiting if t in self.finals]:
            c, last, _seen = self._awaiting.pop(tid)
            self.counters["exit_taskstats"] += 1
            self._charge_final(c, last, self.finals.pop(tid))

    def _expire_finals(self) -> None:
        """Records older than one to two FINAL_TTL go: their tasks were not ours.

        An exit still waiting for its record after FINAL_TTL never gets one: it
        counts up to its last sample.
        """
        self._finals_old, self.finals = self.finals, {}
        deadline = time.monotonic() - FINAL_TTL
        for tid in [t for t, (_c, _last, seen) in self._awaiting.items() if seen < deadline]:
            del self._awaiting[tid]
            self.counters["exit_last"] += 1

    def _open_taskstats(self) -> None:
        listener = TaskstatsListener()
        try:
            listener.open()
        except OSError as exc:
            log.info("taskstats unavailable (%s): exits count up to their last sample", exc)
            return
        self.taskstats = listener

    async def _sample_all(self) -> None:
        """Sample every tracked thread, a slice at a time on the trio thread.

        A sample is two small /proc reads. A worker thread doing hundreds of
        them holds the GIL most of the time and delays the tracker's events
        (a fork storm then outruns numtasks); slices with a checkpoint between
        them let every fork and exit event in between be handled first.
        """
        tasks = list(self.tracked)
        for i in range(0, len(tasks), BATCH):
            await trio.lowlevel.checkpoint()
            batch = [t for t in tasks[i : i + BATCH] if t in self.tracked]
            samples = [read_sample(t) for t in batch]
            for task, sample in zip(batch, samples, strict=True):
                home = self._container(task)
                if sample is not None and home is not None and not home.is_root:
                    self._advance(task, home, sample)
            self.counters["samples"] += len(batch)

    async def run(self) -> None:
        """Sample every tracked thread each period, drain the taskstats socket, and
        journal the usage at a bounded rate."""
        # the restore is over: a container not made again by now is gone with its usage
        self.restoring.clear()
        expire_at = trio.current_time() + FINAL_TTL
        persist_at = trio.current_time() + PERSIST_PERIOD
        try:
            period = SAMPLE_PERIOD
            while True:
                await trio.sleep(period)
                if self.hierarchy is None:
                    if self.taskstats is not None:
                        self.taskstats.close()
                        self.taskstats = None
                    continue
                if self.taskstats is None:
                    self._open_taskstats()
                self._drain_taskstats()
                if trio.current_time() >= expire_at:
                    self._expire_finals()
                    expire_at = trio.current_time() + FINAL_TTL
                started = trio.current_time()
                await self._sample_all()
                period = max(SAMPLE_PERIOD, (trio.current_time() - started) / SAMPLER_SHARE)
                if trio.current_time() >= persist_at:
                    self.journal_changed()
                    persist_at = trio.current_time() + PERSIST_PERIOD
        finally:
            if self.taskstats is not None:
                self.taskstats.close()
            self.journal_changed()  # a clean stop: the journal is still open
