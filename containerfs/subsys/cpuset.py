"""cpuset: the seeds' first client, with the kernel's v1 files, rules and errno (spec 7.1).

What userspace can enforce, it does: every thread of every member gets a CPU
affinity inside its cpuset, on attach and whenever the cpuset's CPUs change;
forks and new threads inherit it from the kernel. As modern kernels do, a
task keeps the part of its own requested affinity that lies inside the
cpuset (all of the cpuset when that part is empty). A task may widen its own
affinity again, which a kernel cpuset would forbid; a periodic audit clips it
back, each pass starting AUDIT_PERIOD after the last one ended, so the window
is AUDIT_PERIOD plus the time of one pass. Large moves and changes are
applied by the same loop, and a task moved back to the root gets its own
request (or every CPU) back there too. Memory placement cannot be set for
another process from userspace: mems and the memory flags are validated and
stored with the kernel's rules and have no effect, as the man page says.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import os
import re
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
#: the pause between audit passes: the drift window is this plus one pass
AUDIT_PERIOD = 0.5
#: moves and changes of up to this many threads set affinity before the write returns
INLINE_MAX = 256
#: tasks checked per worker-thread batch in the audit
BATCH = 1024
_CPU = "/sys/devices/system/cpu"
_NODE = "/sys/devices/system/node"
#: per-domain files, with a `level` file since 6.9, when booted with sched_verbose
_DEBUGFS_DOMAINS = "/sys/kernel/debug/sched/domains"


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
            _subsys(c).cpus_changed(c, current.cpus)

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
    """update_relax_domain_level(): -1 to sched_domain_level_max + 1, else EINVAL."""
    value = kstrtoll(data)
    if not -1 <= value <= _domain_level_max() + 1:
        raise CgroupError(errno.EINVAL, f"relax domain level {value} out of range")
    _state(c).sched_relax_domain_level = value


def _domain_level_max() -> int:
    """The kernel's sched_domain_level_max, as well as userspace can know it.

    It is the level of the highest scheduler domain the kernel built (levels
    count from 0, degenerate ones included). Kernels since 6.9 show each
    domain's level in debugfs (with sched_verbose); otherwise the build is
    redone here from the topology in sysfs, as build_sched_domains() does it.
    """
    shown = _debugfs_level_max()
    if shown is not None:
        return shown
    domain_cpus = sysinfo.online_cpus() - _read_cpus(f"{_CPU}/isolated")
    return built_level_max(domain_cpus, _topology_levels(domain_cpus))


def built_level_max(cpu_map: frozenset[int], levels: Sequence[dict[int, frozenset[int]]]) -> int:
    """sched_domain_level_max after build_sched_domains(cpu_map) over topology `levels`.

    Each level maps a CPU to its mask at that level, lowest level first. For
    every CPU the kernel builds one domain per level, each spanning the mask
    within cpu_map (and its child's span), and stops at the first that spans
    all of cpu_map; the domain's level is its child's plus one.
    """
    deepest = 0
    for cpu in cpu_map:
        span: frozenset[int] = frozenset()
        level = -1
        for masks in levels:
            span = (masks.get(cpu, frozenset({cpu})) & cpu_map) | span
            level += 1
            if span == cpu_map:
                break
        deepest = max(deepest, level)
    return deepest


def _read_cpus(path: str) -> frozenset[int]:
    try:
        with open(path, "rb") as f:
            return parse_id_list(f.read(), sysinfo.nr_cpu_ids())
    except (OSError, CgroupError):
        return frozenset()


def _debugfs_level_max() -> int | None:
    """The highest `level` of the domains in debugfs, or None if it does not show them."""
    levels = []
    try:
        for cpu in os.listdir(_DEBUGFS_DOMAINS):
            for domain in os.listdir(f"{_DEBUGFS_DOMAINS}/{cpu}"):
                with open(f"{_DEBUGFS_DOMAINS}/{cpu}/{domain}/level") as f:
                    levels.append(int(f.read()))
    except (OSError, ValueError):
        return None
    return max(levels, default=None)


def _mask(cpu: int, *paths: str | None) -> frozenset[int]:
    """The first of these sysfs lists of `cpu` that reads non-empty; itself alone if none."""
    for path in paths:
        mask = _read_cpus(f"{_CPU}/cpu{cpu}/{path}") if path else frozenset()
        if mask:
            return mask
    return frozenset({cpu})


def _llc_path(cpu: int) -> str | None:
    """The sysfs cache index of the last-level cache of `cpu` (what MC domains span)."""
    best = None
    try:
        for index in os.listdir(f"{_CPU}/cpu{cpu}/cache"):
            if not index.startswith("index"):
                continue
            with open(f"{_CPU}/cpu{cpu}/cache/{index}/level") as f:
                level = int(f.read())
            if best is None or level > best[0]:
                best = (level, f"cache/{index}/shared_cpu_list")
    except (OSError, ValueError):
        return None
    return best[1] if best else None


def _numa_levels(cpus: frozenset[int]) -> list[dict[int, frozenset[int]]]:
    """sched_init_numa(): a NODE level, then one per larger distance between nodes."""
    node_cpus: dict[int, frozenset[int]] = {}
    distances: dict[int, list[int]] = {}
    try:
        for name in os.listdir(_NODE):
            if name.startswith("node") and name[4:].isdigit():
                node = int(name[4:])
                node_cpus[node] = _read_cpus(f"{_NODE}/{name}/cpulist")
                with open(f"{_NODE}/{name}/distance") as f:
                    distances[node] = [int(d) for d in f.read().split()]
    except (OSError, ValueError):
        return []
    steps = sorted({d for row in distances.values() for d in row})
    if len(steps) < 2:
        return []
    levels = []
    for step in steps:
        near = {}
        for node, row in distances.items():
            span = frozenset().union(
                *(node_cpus.get(other, frozenset()) for other, d in enumerate(row) if d <= step)
            )
            near.update({cpu: span for cpu in node_cpus[node] & cpus})
        levels.append(near)
    return levels


def _drops_lone_threads(smt: dict[int, frozenset[int]]) -> bool:
    """x86 since 6.17 builds no SMT level when cores run one thread each."""
    if os.uname().machine not in ("x86_64", "i686", "i586", "i486", "i386"):
        return False
    release = re.match(r"(\d+)\.(\d+)", os.uname().release)
    recent = release is not None and (int(release[1]), int(release[2])) >= (6, 17)
    return recent and all(len(mask) <= 1 for mask in smt.values())


def _topology_levels(cpus: frozenset[int]) -> list[dict[int, frozenset[int]]]:
    """The kernel's default topology (SMT, CLS, MC, PKG, then NUMA), the configured levels."""
    levels = []
    smt = {cpu: _mask(cpu, "topology/thread_siblings_list") for cpu in cpus}
    if sysinfo.config_enabled("CONFIG_SCHED_SMT") and not _drops_lone_threads(smt):
        levels.append(smt)
    if sysinfo.config_enabled("CONFIG_SCHED_CLUSTER"):
        levels.append({cpu: _mask(cpu, "topology/cluster_cpus_list") for cpu in cpus})
    if sysinfo.config_enabled("CONFIG_SCHED_MC"):  # cpu_coregroup_mask(): the CPUs sharing the LLC
        levels.append({cpu: _mask(cpu, _llc_path(cpu), "topology/core_siblings_list")
                       for cpu in cpus})
    package = {
        cpu: _mask(cpu, "topology/package_cpus_list", "topology/core_siblings_list")
        for cpu in cpus
    }
    numa = _numa_levels(cpus)
    # x86 drops the package level when a package holds more than one node
    if not numa or all(package[cpu] <= numa[0].get(cpu, package[cpu]) for cpu in cpus):
        levels.append(package)
    return levels + numa


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
        #: tasks to check soon (forks, large moves and changes), outside the request path,
        #: each with the mask it may hold without having asked (see _learn)
        self.pending: dict[Task, frozenset[int]] = {}
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
        """Members of a cpuset get its CPUs; tasks back in the root get their own request."""
        cpus = _state(dst).cpus
        homes = [(task, _state(src).cpus) for task, src in zip(tasks, sources, strict=True)]
        if len(tasks) > INLINE_MAX:
            self._defer(homes)
            return
        for task, home in homes:
            self._enforce(task, cpus, home)

    def fork(self, task: Task, container: Container) -> None:
        # the kernel copies the mask on fork; a fork racing an attach may copy an old one
        if not container.is_root:
            self._defer([(task, _state(container).cpus)])

    def restore(self, task: Task, container: Container) -> None:
        """Back after a restart: its mask may have drifted while nothing watched."""
        self.fork(task, container)

    def exit(self, task: Task, container: Container) -> None:
        self.requested.pop(task, None)
        self.applied.pop(task, None)
        self.pending.pop(task, None)

    def bind(self, hierarchy: Hierarchy) -> None:
        super().bind(hierarchy)
        self._poke()

    def unbind(self, hierarchy: Hierarchy) -> None:
        super().unbind(hierarchy)
        self.requested.clear()
        self.applied.clear()
        self.pending.clear()

    def cpus_changed(self, c: Container, old: frozenset[int]) -> None:
        """A cpuset's CPUs changed from `old`: its own tasks follow (children were subsets)."""
        cpus = _state(c).cpus
        if len(c.tasks) > INLINE_MAX:
            self._defer([(task, old) for task in c.tasks])
            return
        for task in list(c.tasks):
            self._enforce(task, cpus, old)

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

    def _defer(self, homes: Iterable[tuple[Task, frozenset[int]]]) -> None:
        self.pending.update(homes)
        self._poke()

    def _poke(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _members(
        self, homes: Iterable[tuple[Task, frozenset[int]]]
    ) -> list[tuple[Task, frozenset[int], frozenset[int]]]:
        """(task, cpus of its cpuset, home) for the given tasks that are still tracked.

        Tasks in the root are kept: one moved back there by a large move must
        get its own request (or every CPU) back, as a small move gives it.
        """
        h = self.hierarchy
        if h is None:
            return []
        out = []
        for task, home in homes:
            c = task.cgroups.get(h.id)
            if c is not None and task.tid in self.registry.tasks:
                out.append((task, _state(c).cpus, home))
        return out

    async def _check(self, members: list[tuple[Task, frozenset[int], frozenset[int]]]) -> None:
        """Read masks in a worker thread; fix on this thread what is not what it should be.

        A task is left alone only when its mask is both the one this daemon
        last gave it and the one it should have now: after a move or a change
        of CPUs the first holds and the second does not.
        """
        for i in range(0, len(members), BATCH):
            batch = members[i : i + BATCH]
            masks = await trio.to_thread.run_sync(lambda b=batch: [_get(m[0].tid) for m in b])
            h = self.hierarchy
            if h is None:
                return
            for (task, cpus, home), current in zip(batch, masks, strict=True):
                c = task.cgroups.get(h.id)
                if current is None or c is None or _state(c).cpus != cpus:
                    continue  # gone, or moved or changed meanwhile (that enforced it)
                if current == self.applied.get(task) == self._target(task, cpus):
                    continue
                self._learn(task, current, home)
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
                homes, self.pending = self.pending, {}
                await self._check(self._members(homes.items()))
            if trio.current_time() >= next_audit:
                root = self.hierarchy.root
                homes = [(t, _state(c).cpus) for c in root.walk() if not c.is_root for t in c.tasks]
                await self._check(self._members(homes))
                self.audits += 1
                next_audit = trio.current_time() + AUDIT_PERIOD
