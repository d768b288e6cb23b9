"""cpuset: the seeds' first client, with the kernel's v1 files, rules and errno (spec 7.1).

What userspace can enforce, it does: every thread of every member gets a CPU
affinity inside its cpuset, on attach and whenever the cpuset's CPUs change;
forks and new threads inherit it from the kernel. As modern kernels do, a
task keeps the part of its own requested affinity that lies inside the
cpuset (all of the cpuset when that part is empty). A task may widen its own
affinity again, which a kernel cpuset would forbid; a periodic audit clips it
back, so the window is one audit period. Memory placement cannot be set for
another process from userspace: mems and the memory flags are validated and
stored with the kernel's rules and have no effect, as the man page says.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import trio

from containerfs.core.container import Container
from containerfs.core.files import Caller, ControlFile, Placement
from containerfs.core.parse import format_id_list, kstrtoll, parse_flag, parse_id_list
from containerfs.core.subsystem import Subsystem
from containerfs.core.task import Task
from containerfs.errors import CgroupError
from containerfs.subsys import sysinfo

if TYPE_CHECKING:
    from containerfs.core.hierarchy import Hierarchy
    from containerfs.core.registry import Registry

log = logging.getLogger(__name__)

NAME = "cpuset"
#: how often a task that widened its own affinity is clipped back (the drift window)
AUDIT_PERIOD = 0.5
#: moves and changes of up to this many threads set affinity before the write returns
INLINE_MAX = 256
#: tasks checked per worker-thread batch in the audit
BATCH = 1024
#: sched_domain_level_max when /sys/kernel/debug cannot tell (x86: SMT, CLS, MC, PKG)
DEFAULT_DOMAIN_LEVEL_MAX = 4


@dataclasses.dataclass(slots=True)
class CpusetState:
    """One cpuset's settings; a write validates a changed copy (the kernel's trial cpuset)."""

    cpus: frozenset[int] = frozenset()
    mems: frozenset[int] = frozenset()
    cpu_exclusive: bool = False
    mem_exclusive: bool = False
    mem_hardwall: bool = False
    memory_migrate: bool = False
    memory_spread_page: bool = False
    memory_spread_slab: bool = False
    sched_load_balance: bool = True
    sched_relax_domain_level: int = -1


def _state(c: Container) -> CpusetState:
    return c.state[NAME]


def _subsys(c: Container) -> Cpuset:
    subsys = c.hierarchy.registry.subsystems[NAME]
    assert isinstance(subsys, Cpuset)
    return subsys


def _is_subset(p: CpusetState, q: CpusetState) -> bool:
    """is_cpuset_subset(): sets are subsets and exclusive flags only where q has them."""
    return (
        p.cpus <= q.cpus
        and p.mems <= q.mems
        and p.cpu_exclusive <= q.cpu_exclusive
        and p.mem_exclusive <= q.mem_exclusive
    )


def _validate(c: Container, trial: CpusetState) -> None:
    """validate_change() of a v1 cpuset, in the kernel's order (spec 7.1, steps 5 to 9)."""
    for child in c.children.values():
        if not _is_subset(_state(child), trial):
            raise CgroupError(errno.EBUSY, f"child {child.path} would not be a subset")
    parent = c.parent
    if parent is None:
        return
    if not _is_subset(trial, _state(parent)):
        raise CgroupError(errno.EACCES, f"not a subset of the parent {parent.path}")
    current = _state(c)
    c.hierarchy.registry.refresh(c)
    if c.populated:
        if current.cpus and not trial.cpus:
            raise CgroupError(errno.ENOSPC, f"{c.path} has tasks: its cpus cannot be emptied")
        if current.mems and not trial.mems:
            raise CgroupError(errno.ENOSPC, f"{c.path} has tasks: its mems cannot be emptied")
    for sibling in parent.children.values():
        if sibling is c:
            continue
        other = _state(sibling)
        if (trial.cpu_exclusive or other.cpu_exclusive) and trial.cpus & other.cpus:
            raise CgroupError(errno.EINVAL, f"cpus overlap exclusive sibling {sibling.path}")
        if (trial.mem_exclusive or other.mem_exclusive) and trial.mems & other.mems:
            raise CgroupError(errno.EINVAL, f"mems overlap exclusive sibling {sibling.path}")


# ------------------------------------------------------------------- files


def _list_file(attr: str, nbits: int, top: frozenset[int], max_write: int) -> ControlFile:
    """cpuset.cpus / cpuset.mems: update_cpumask() and update_nodemask()."""

    def read(c: Container) -> str:
        return format_id_list(getattr(_state(c), attr)) + "\n"

    def write(c: Container, data: bytes, caller: Caller) -> None:
        if c.is_root:
            raise CgroupError(errno.EACCES, f"the root cpuset's {attr} are read-only")
        ids = parse_id_list(data, nbits)
        if not ids <= top:
            missing = format_id_list(ids - top)
            raise CgroupError(errno.EINVAL, f"{attr} {missing} not online / without memory")
        current = _state(c)
        if ids == getattr(current, attr):
            return
        trial = dataclasses.replace(current, **{attr: ids})
        _validate(c, trial)
        c.state[NAME] = trial
        if attr == "cpus":
            _subsys(c).cpus_changed(c)

    return ControlFile(attr, read, write, max_write=max_write)


def _effective_file(attr: str) -> ControlFile:
    def read(c: Container) -> str:
        return format_id_list(getattr(_state(c), attr)) + "\n"

    return ControlFile(f"effective_{attr}", read)


def _flag_file(attr: str) -> ControlFile:
    """A flag through cpuset_update_flag(): the whole validate_change() with it toggled."""

    def read(c: Container) -> str:
        return "1\n" if getattr(_state(c), attr) else "0\n"

    def write(c: Container, data: bytes, caller: Caller) -> None:
        value = parse_flag(data)
        trial = dataclasses.replace(_state(c), **{attr: value})
        _validate(c, trial)
        c.state[NAME] = trial

    return ControlFile(attr, read, write)


def _read_relax(c: Container) -> str:
    return f"{_state(c).sched_relax_domain_level}\n"


def _write_relax(c: Container, data: bytes, caller: Caller) -> None:
    value = kstrtoll(data)
    if not -1 <= value <= _domain_level_max() + 1:
        raise CgroupError(errno.EINVAL, f"relax domain level {value} out of range")
    _state(c).sched_relax_domain_level = value


def _domain_level_max() -> int:
    """sched_domain_level_max: the deepest scheduler domain level, from debugfs if mounted."""
    try:
        names = os.listdir("/sys/kernel/debug/sched/domains/cpu0")
    except OSError:
        return DEFAULT_DOMAIN_LEVEL_MAX
    levels = [int(n[6:]) for n in names if n.startswith("domain") and n[6:].isdigit()]
    return max(levels, default=DEFAULT_DOMAIN_LEVEL_MAX)


def _read_pressure_enabled(c: Container) -> str:
    return "1\n" if _subsys(c).memory_pressure_enabled else "0\n"


def _write_pressure_enabled(c: Container, data: bytes, caller: Caller) -> None:
    _subsys(c).memory_pressure_enabled = parse_flag(data)


_FILES = (
    _list_file(
        "cpus",
        sysinfo.nr_cpu_ids(),
        sysinfo.online_cpus(),
        100 + 6 * sysinfo.nr_cpus_config(),
    ),
    _list_file(
        "mems",
        sysinfo.max_numnodes(),
        sysinfo.memory_nodes(),
        100 + 6 * sysinfo.max_numnodes(),
    ),
    _effective_file("cpus"),
    _effective_file("mems"),
    _flag_file("cpu_exclusive"),
    _flag_file("mem_exclusive"),
    _flag_file("mem_hardwall"),
    _flag_file("sched_load_balance"),
    ControlFile("sched_relax_domain_level", _read_relax, _write_relax),
    _flag_file("memory_migrate"),
    # no reclaim rate is visible per group from userspace: always 0, as with it disabled
    ControlFile("memory_pressure", lambda c: "0\n"),
    _flag_file("memory_spread_page"),
    _flag_file("memory_spread_slab"),
    ControlFile(
        "memory_pressure_enabled",
        _read_pressure_enabled,
        _write_pressure_enabled,
        placement=Placement.ROOT_ONLY,
    ),
)


# --------------------------------------------------------------- affinity


def _get(tid: int) -> frozenset[int] | None:
    try:
        return frozenset(os.sched_getaffinity(tid))
    except OSError:  # gone, or not ours to read
        return None


def _set(tid: int, cpus: frozenset[int]) -> None:
    try:
        os.sched_setaffinity(tid, cpus)
    except ProcessLookupError:
        pass  # exiting: nothing left to constrain
    except OSError as exc:
        log.warning("cannot set the affinity of task %d to %s: %s", tid, sorted(cpus), exc)


class Cpuset(Subsystem):
    """The cpuset subsystem: v1 files and rules; affinity enforced on every member thread."""

    name = NAME
    files = _FILES

    def __init__(self, registry: Registry) -> None:
        super().__init__(registry)
        self.memory_pressure_enabled = False
        #: the affinity a task asked for itself (None: none, it takes the whole cpuset)
        self.requested: dict[Task, frozenset[int] | None] = {}
        #: the affinity this subsystem last gave a task
        self.applied: dict[Task, frozenset[int]] = {}
        #: tasks to check soon (forks and large moves), outside the request path
        self.pending: set[Task] = set()
        self.audits = 0
        self.clipped = 0
        self._wakeup: trio.Event | None = None

    # ---------------------------------------------------------------- hooks

    def create(self, container: Container) -> CpusetState:
        parent = container.parent
        if parent is None:
            return CpusetState(
                cpus=sysinfo.online_cpus(),
                mems=sysinfo.memory_nodes(),
                cpu_exclusive=True,
                mem_exclusive=True,
            )
        up = _state(parent)
        state = CpusetState(
            memory_spread_page=up.memory_spread_page,
            memory_spread_slab=up.memory_spread_slab,
        )
        if container.clone_children and not any(
            # a rebind creates states for existing containers: skip siblings without one yet
            _state(s).cpu_exclusive or _state(s).mem_exclusive
            for s in parent.children.values()
            if NAME in s.state
        ):
            state.cpus = up.cpus
            state.mems = up.mems
        return state

    def can_attach(self, dst: Container, tasks: Sequence[Task]) -> None:
        state = _state(dst)
        if not state.cpus or not state.mems:
            raise CgroupError(errno.ENOSPC, f"cpuset {dst.path} has no cpus or no mems")

    def attach(self, dst: Container, tasks: Sequence[Task], sources: Sequence[Container]) -> None:
        cpus = _state(dst).cpus
        if len(tasks) > INLINE_MAX:
            self._defer(tasks)
            return
        for task, src in zip(tasks, sources, strict=True):
            self._enforce(task, cpus, _state(src).cpus)

    def fork(self, task: Task, container: Container) -> None:
        # the kernel copies the mask on fork; a fork racing an attach may copy an old one
        if not container.is_root:
            self.pending.add(task)
            self._poke()

    def restore(self, task: Task, container: Container) -> None:
        """Back after a restart: its mask may have drifted while nothing watched."""
        self.fork(task, container)

    def exit(self, task: Task, container: Container) -> None:
        self.requested.pop(task, None)
        self.applied.pop(task, None)
        self.pending.discard(task)

    def bind(self, hierarchy: Hierarchy) -> None:
        super().bind(hierarchy)
        self._poke()

    def unbind(self, hierarchy: Hierarchy) -> None:
        super().unbind(hierarchy)
        self.requested.clear()
        self.applied.clear()
        self.pending.clear()

    def cpus_changed(self, c: Container) -> None:
        """A cpuset's CPUs changed: its own tasks follow (children were already subsets)."""
        cpus = _state(c).cpus
        if len(c.tasks) > INLINE_MAX:
            self._defer(c.tasks)
            return
        for task in list(c.tasks):
            self._enforce(task, cpus, cpus)

    # ------------------------------------------------------------- affinity

    def _learn(self, task: Task, current: frozenset[int], home: frozenset[int]) -> None:
        """Record what the task itself asked for, judging from its mask as found.

        A mask we did not set is the task's own choice, unless it is the whole
        of the cpuset it lives in (what it inherits without asking).
        """
        applied = self.applied.get(task)
        if applied is None:
            self.requested[task] = None if current >= home else current
        elif current != applied:
            self.requested[task] = current
            self.clipped += 1

    def _target(self, task: Task, cpus: frozenset[int]) -> frozenset[int]:
        request = self.requested.get(task)
        return (request & cpus) or cpus if request is not None else cpus

    def _enforce(self, task: Task, cpus: frozenset[int], home: frozenset[int]) -> None:
        """Give one thread its affinity inside `cpus` now (a few syscalls)."""
        current = _get(task.tid)
        if current is None:
            return
        self._learn(task, current, home)
        want = self._target(task, cpus)
        if want != current:
            _set(task.tid, want)
        self.applied[task] = want

    def _defer(self, tasks: Iterable[Task]) -> None:
        self.pending.update(tasks)
        self._poke()

    def _poke(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _members(self, tasks: Iterable[Task]) -> list[tuple[Task, frozenset[int]]]:
        """(task, cpus of its cpuset) for the given tasks that are still in a non-root cpuset."""
        h = self.hierarchy
        if h is None:
            return []
        out = []
        for task in tasks:
            c = task.cgroups.get(h.id)
            if c is not None and not c.is_root and task.tid in self.registry.tasks:
                out.append((task, _state(c).cpus))
        return out

    async def _check(self, members: list[tuple[Task, frozenset[int]]]) -> None:
        """Read masks in a worker thread; fix on this thread what drifted or is new."""
        for i in range(0, len(members), BATCH):
            batch = members[i : i + BATCH]
            masks = await trio.to_thread.run_sync(lambda b=batch: [_get(t.tid) for t, _ in b])
            h = self.hierarchy
            if h is None:
                return
            for (task, cpus), current in zip(batch, masks, strict=True):
                c = task.cgroups.get(h.id)
                if current is None or c is None or _state(c).cpus != cpus:
                    continue  # gone, or moved meanwhile (the move enforced it)
                if current == self.applied.get(task):
                    continue
                self._learn(task, current, cpus)
                want = self._target(task, cpus)
                if want != current:
                    _set(task.tid, want)
                self.applied[task] = want

    async def run(self) -> None:
        """Check forked tasks and large moves promptly; audit every member each period."""
        self._wakeup = trio.Event()
        next_audit = trio.current_time() + AUDIT_PERIOD
        while True:
            timeout = next_audit - trio.current_time() if self.hierarchy else math.inf
            with trio.move_on_after(max(timeout, 0)):
                await self._wakeup.wait()
            self._wakeup = trio.Event()
            if self.hierarchy is None:
                continue
            if self.pending:
                tasks, self.pending = self.pending, set()
                await self._check(self._members(tasks))
            if trio.current_time() >= next_audit:
                root = self.hierarchy.root
                members = [t for c in root.walk() if not c.is_root for t in c.tasks]
                await self._check(self._members(members))
                self.audits += 1
                next_audit = trio.current_time() + AUDIT_PERIOD
