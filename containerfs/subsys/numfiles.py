"""numfiles: BeanCounters' numfile counter (seed 004): open descriptors per container.

`numfiles.current` counts the open file descriptors of the processes with a
thread in the container or below it (threads share one table, so a process
counts once). `numfiles.max` limits that count, as far as per-process
RLIMIT_NOFILE allows: userspace cannot refuse an open() in a group, but it
can set each member's descriptor ceiling.

RLIMIT_NOFILE is not a count: it is the lowest descriptor number a process
may no longer get (open, dup, fcntl(F_DUPFD), SCM_RIGHTS all hand out numbers
below it). So the daemon gives each member process a share of the budget
left in every limited container it is in (an equal share, rounded down),
and sets the process's soft and hard limit to the number under which exactly
that many descriptor numbers are free. A process keeps what it has (even
numbers above its new ceiling, which can only close) and can open no more
than its share: the container's total cannot pass max until the next
rebalance, except through fork (a child copies its parent's table and
limit) and moves in, which the kernel's pids controller does not refuse
either. The man page states the guarantee in full.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from containerfs.core.files import Caller, ControlFile, Placement
from containerfs.core.parse import parse_max_or_int
from containerfs.core.subsystem import Subsystem
from containerfs.tracking import procscan

if TYPE_CHECKING:
    from containerfs.core.container import Container
    from containerfs.core.hierarchy import Hierarchy
    from containerfs.core.registry import Registry
    from containerfs.core.task import Task

log = logging.getLogger(__name__)

#: the largest numfiles.max (INT_MAX, as the kernel's fs.nr_open ceiling); above it is EINVAL
MAX_LIMIT = 2**31 - 1
#: how often limited containers are rebalanced when nothing happens
SCAN_INTERVAL = 1.0
#: the least time between two rebalances, so a fork storm cannot keep the loop spinning
MIN_GAP = 0.02
#: processes one worker-thread call reads or limits
BATCH = 256

Limits = tuple[int, int]

CAP_SYS_RESOURCE = 24


def has_capability(cap: int) -> bool:
    """Whether this process holds `cap` in its effective set."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


#: Raising a hard limit back needs CAP_SYS_RESOURCE. Without it a lowered hard
#: limit could never be given back, so only the soft limit is clamped.
CLAMP_HARD = has_capability(CAP_SYS_RESOURCE)


@dataclass(slots=True)
class NumfilesState:
    """One container's limit (None is "max") and its events counter."""

    max: int | None = None
    events: int = 0


@dataclass(slots=True)
class Clamp:
    """A process whose RLIMIT_NOFILE the daemon set, and what to give back.

    `original` is the process's own limit before its first clamp (a child
    forked by a clamped process inherits its parent's); `applied` is what
    the daemon set last; `at_ceiling` is whether it was found with no
    descriptor left to open at the last rebalance.
    """

    start_time: int
    original: Limits
    applied: Limits | None = None
    at_ceiling: bool = False


@dataclass(frozen=True, slots=True)
class ProcFacts:
    start_time: int
    #: the open descriptor numbers, ascending
    fds: tuple[int, ...]
    limits: Limits


def count_fds(tgid: int) -> int:
    """Open descriptors of one process; 0 if it is gone.

    Since Linux 6.2 the size of /proc/PID/fd is the count, which costs no
    listing; an older kernel reports 0 and the directory is listed.
    """
    path = f"/proc/{tgid}/fd"
    try:
        size = os.stat(path).st_size
        return size if size else len(os.listdir(path))
    except OSError:
        return 0


def read_facts(tgids: Iterable[int]) -> dict[int, ProcFacts | None]:
    """Descriptor numbers and limits of a batch of processes; runs in a worker thread."""
    facts: dict[int, ProcFacts | None] = {}
    for tgid in tgids:
        info = procscan.read_task(tgid)
        try:
            if info is None:
                raise ProcessLookupError
            fds = tuple(sorted(int(name) for name in os.listdir(f"/proc/{tgid}/fd")))
            limits = resource.prlimit(tgid, resource.RLIMIT_NOFILE)
        except OSError:
            facts[tgid] = None
            continue
        facts[tgid] = ProcFacts(info.start_time, fds, limits)
    return facts


def set_limits(changes: Iterable[tuple[int, int, Limits]]) -> list[int]:
    """Apply (tgid, start_time, limits); the tgids done. Runs in a worker thread.

    prlimit has no pidfd form, so the start time is checked after the call,
    and a pid reused in between gets its old limit back at once.
    """
    done = []
    for tgid, start_time, limits in changes:
        try:
            old = resource.prlimit(tgid, resource.RLIMIT_NOFILE, limits)
        except (OSError, ValueError) as exc:
            if not isinstance(exc, ProcessLookupError):
                log.warning("numfiles: cannot set RLIMIT_NOFILE of %d to %s: %s", tgid, limits, exc)
            continue
        info = procscan.read_task(tgid)
        if info is None or info.start_time != start_time:
            with contextlib.suppress(OSError):
                resource.prlimit(tgid, resource.RLIMIT_NOFILE, old)
            continue
        done.append(tgid)
    return done


def ceiling(fds: Sequence[int], extra: int) -> int:
    """The largest RLIMIT_NOFILE under which exactly `extra` descriptor numbers are free.

    That is the number of the (extra+1)-th free slot: every number below it
    but `extra` of them is taken, and it is not reachable.
    """
    want = extra + 1
    nxt = 0
    for fd in fds:
        gap = fd - nxt
        if gap >= want:
            break
        want -= gap
        nxt = fd + 1
    return nxt + want - 1


def _clamp_item(clamp: Clamp) -> list:
    """A clamp as the journal keeps it."""
    return [clamp.start_time, list(clamp.original),
            list(clamp.applied) if clamp.applied is not None else None]


def _cap(value: int, limit: int) -> int:
    return limit if value == resource.RLIM_INFINITY else min(value, limit)


def _own_original(clamp: Clamp, seen: ProcFacts) -> Limits:
    """The limit to give back: the original, under any hard limit the process set itself.

    A process may lower its own hard limit below the daemon's (a sandbox
    dropping privileges, say); leaving the container must not raise it again.
    """
    if clamp.applied is None:
        return clamp.original
    hard = seen.limits[1]
    if _cap(hard, clamp.applied[1]) >= clamp.applied[1]:
        return clamp.original
    return _cap(clamp.original[0], hard), _cap(clamp.original[1], hard)


def _subsys(c: Container) -> NumfilesSubsystem:
    subsys = c.hierarchy.registry.subsystems[NumfilesSubsystem.name]
    assert isinstance(subsys, NumfilesSubsystem)
    return subsys


def _subtree_tgids(c: Container) -> set[int]:
    return {task.tgid for node in c.walk() for task in node.tasks}


def _read_current(c: Container) -> str:
    c.hierarchy.registry.refresh(c)
    return f"{sum(count_fds(tgid) for tgid in _subtree_tgids(c))}\n"


def _read_max(c: Container) -> str:
    limit = _subsys(c).state(c).max
    return "max\n" if limit is None else f"{limit}\n"


def _write_max(c: Container, data: bytes, caller: Caller) -> None:
    # pids.max's parser: stripped, "max", else a signed number (EINVAL out of range)
    _subsys(c).set_max(c, parse_max_or_int(data, 0, MAX_LIMIT))


def _read_events(c: Container) -> str:
    return f"max {_subsys(c).state(c).events}\n"


class NumfilesSubsystem(Subsystem):
    """Counts open descriptors per container and limits them through RLIMIT_NOFILE."""

    name = "numfiles"
    files = (
        ControlFile("current", _read_current, placement=Placement.NOT_ROOT),
        ControlFile("max", _read_max, _write_max, placement=Placement.NOT_ROOT),
        ControlFile("events", _read_events, placement=Placement.NOT_ROOT),
    )

    def __init__(self, registry: Registry) -> None:
        super().__init__(registry)
        #: containers with a limit set
        self.limited: set[Container] = set()
        #: pid -> the process's clamp: plain data, so the journal can keep it
        self.clamped: dict[int, Clamp] = {}
        self._wake = trio.Event()

    def create(self, container: Container) -> NumfilesState:
        return NumfilesState()

    def destroy(self, container: Container) -> None:
        self.limited.discard(container)

    def state(self, c: Container) -> NumfilesState:
        return c.state[self.name]

    def limited_at(self, c: Container) -> bool:
        return any(self.state(node).max is not None for node in c.ancestors())

    def set_max(self, c: Container, limit: int | None) -> None:
        self.state(c).max = limit
        if limit is None:
            self.limited.discard(c)
        else:
            self.limited.add(c)
        self._wake.set()

    # ------------------------------------------------------------ task hooks

    def fork(self, task: Task, container: Container) -> None:
        """A process born in a limited container: rebalance soon, and inherit the original.

        The child copied its parent's limit (the parent's clamp), so what it
        must get back on leaving is what its parent would.
        """
        if not task.is_leader or not self.limited_at(container):
            return
        info = procscan.read_task(task.tgid)
        parent = self.clamped.get(info.ppid) if info is not None else None
        if info is not None and parent is not None and task.tgid not in self.clamped:
            self.clamped[task.tgid] = Clamp(info.start_time, parent.original)
            self._journal(task.tgid)
        self._wake.set()

    def attach(self, dst: Container, tasks: Sequence[Task], sources: Sequence[Container]) -> None:
        if self.limited_at(dst) or any(self.limited_at(src) for src in sources):
            self._wake.set()

    def unbind(self, hierarchy: Hierarchy) -> None:
        self._restore_all()
        self.limited.clear()
        super().unbind(hierarchy)

    # ------------------------------------------------------------ journal

    def saved(self) -> dict[str, Any]:
        """The clamp set, one item per pid: [start time, original, applied].

        A daemon killed with processes clamped cannot give their limits back;
        the next one must know what it set, or it would take the clamp for
        the process's own limit and keep it forever. (`at_ceiling` only
        keeps numfiles.events from counting twice, and events restart at 0.)
        """
        return {str(tgid): _clamp_item(clamp) for tgid, clamp in self.clamped.items()}

    def saved_item(self, key: str) -> Any:
        clamp = self.clamped.get(int(key))
        return _clamp_item(clamp) if clamp is not None else None

    def restore_saved(self, data: dict[str, Any]) -> None:
        self.clamped = {
            int(tgid): Clamp(start, (original[0], original[1]),
                             (applied[0], applied[1]) if applied is not None else None)
            for tgid, (start, original, applied) in data.items()
        }

    def _journal(self, tgid: int) -> None:
        self.registry.subsystem_changed(self, str(tgid))

    # --------------------------------------------------------- service loop

    async def run(self) -> None:
        """Rebalance limited containers every SCAN_INTERVAL and after every change."""
        try:
            while True:
                wake = self._wake = trio.Event()
                if not self.limited and not self.clamped:
                    await wake.wait()
                    continue
                await self._rebalance()
                await trio.sleep(MIN_GAP)
                with trio.move_on_after(SCAN_INTERVAL - MIN_GAP):
                    await wake.wait()
        finally:
            # no daemon, no rebalancing: a stale share must not outlive it
            self._restore_all()

    async def _rebalance(self) -> None:
        self.registry.refresh()
        members = {c: _subtree_tgids(c) for c in self.limited if not c.removed}
        wanted = sorted(set().union(*members.values()) | set(self.clamped))
        facts: dict[int, ProcFacts | None] = {}
        for i in range(0, len(wanted), BATCH):
            facts.update(await trio.to_thread.run_sync(read_facts, wanted[i : i + BATCH]))
        for tgid in wanted:
            clamp, seen = self.clamped.get(tgid), facts[tgid]
            if clamp is not None and (seen is None or seen.start_time != clamp.start_time):
                del self.clamped[tgid]
                self._journal(tgid)
        extra = self._shares(members, facts)
        changes: list[tuple[int, int, Limits]] = []
        #: clamps dropped: journaled once their limits are given back, not before
        released: list[int] = []
        for tgid, seen in facts.items():
            if seen is None:
                continue
            if tgid in extra:
                before = _clamp_item(self.clamped[tgid]) if tgid in self.clamped else None
                limits = self._clamp(tgid, seen, extra[tgid])
                if _clamp_item(self.clamped[tgid]) != before:
                    self._journal(tgid)
            elif tgid in self.clamped:
                limits = _own_original(self.clamped.pop(tgid), seen)
                released.append(tgid)
            else:
                continue
            if limits != seen.limits:
                changes.append((tgid, seen.start_time, limits))
        for i in range(0, len(changes), BATCH):
            await trio.to_thread.run_sync(set_limits, changes[i : i + BATCH])
        for tgid in released:
            if tgid not in self.clamped:  # not clamped again (a fork hook) meanwhile
                self._journal(tgid)

    def _shares(
        self, members: dict[Container, set[int]], facts: dict[int, ProcFacts | None]
    ) -> dict[int, int]:
        """pid -> descriptors it may still open: the least of its limited containers' shares."""
        extra: dict[int, int] = {}
        for c, tgids in members.items():
            limit = self.state(c).max
            if c.removed or limit is None:
                continue
            live = [t for t in tgids if facts.get(t) is not None]
            used = sum(len(facts[t].fds) for t in live)  # type: ignore[union-attr]
            share = max(0, limit - used) // max(1, len(live))
            for tgid in live:
                extra[tgid] = min(extra.get(tgid, share), share)
        return extra

    def _clamp(self, tgid: int, seen: ProcFacts, extra: int) -> Limits:
        """The limits that leave `extra` free descriptors, never above the process's own."""
        clamp = self.clamped.get(tgid)
        if clamp is None:
            clamp = self.clamped[tgid] = Clamp(seen.start_time, seen.limits)
        else:
            clamp.original = _own_original(clamp, seen)
        target = ceiling(seen.fds, extra)
        soft = _cap(clamp.original[0], target)
        hard = _cap(clamp.original[1], target) if CLAMP_HARD else clamp.original[1]
        clamp.applied = (soft, hard)
        at_ceiling = extra == 0 and soft == target
        if at_ceiling and not clamp.at_ceiling:
            self._charge(tgid)
        clamp.at_ceiling = at_ceiling
        return soft, hard

    def _charge(self, tgid: int) -> None:
        """Count a process that reached its ceiling in the container of its main thread."""
        hierarchy = self.hierarchy
        if hierarchy is None:
            return
        tids = sorted(self.registry.threads.get(tgid, ()))
        task = self.registry.tasks.get(tgid) or (self.registry.tasks[tids[0]] if tids else None)
        c = task.cgroups.get(hierarchy.id) if task is not None else None
        if c is not None and not c.is_root:
            self.state(c).events += 1

    def _restore_all(self) -> None:
        """Give every clamped process its own limit back (synchronously: shutdown, unbind)."""
        changes = []
        for tgid, clamp in sorted(self.clamped.items()):
            facts = read_facts([tgid])[tgid]
            if facts is not None and facts.start_time == clamp.start_time:
                changes.append((tgid, clamp.start_time, _own_original(clamp, facts)))
        had = bool(self.clamped)
        self.clamped.clear()
        set_limits(changes)
        if had:  # journaled once given back: a crash before must not lose what to give
            self.registry.subsystem_changed(self)
