"""numtasks: the seeds' ResGroups task-count controller, with the kernel's pids files.

numtasks.current counts threads, as pids.current does: every task in the
container and its descendants (the core keeps that count per container).
Limits are hierarchical: a new task is over the limit when any non-root
ancestor of its container holds more tasks than its numtasks.max.

Userspace cannot make fork fail. What it can do is see the fork (a netlink
event, applied on the registry's thread) and kill the new task's whole
thread group at once, because a signal takes a process: the newest task is
the one whose creation the kernel would have refused. The kill goes through
a pidfd after checking the process's start time (the one recorded for it
when known, so a reused pid is not hit), never to the daemon, its ancestors
or pid 1. The container the fork came from counts it in numtasks.events and
is the one the log names, as in the kernel. Tasks of a group already killed
are not counted against the limit while they die, so one fork costs one
kill. Moving tasks in may exceed the limit, and lowering the limit kills
nothing, as in the kernel. Peaks and events are counters the journal keeps
at most once a second, so a restart keeps all but the last second's.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from containerfs import signals
from containerfs.core.container import Container
from containerfs.core.files import Caller, ControlFile, Placement
from containerfs.core.parse import parse_max_or_int
from containerfs.core.subsystem import PerContainerItems
from containerfs.core.task import Task
from containerfs.tracking import procscan

if TYPE_CHECKING:
    from collections.abc import Sequence

    from containerfs.core.hierarchy import Hierarchy
    from containerfs.core.registry import Registry

log = logging.getLogger(__name__)

NAME = "numtasks"
#: PID_MAX_LIMIT: the largest limit the kernel's pids.max accepts
PID_MAX_LIMIT = 4194304
#: peaks and events are journaled at most this often (a fork storm changes them per fork)
PERSIST_PERIOD = 1.0


@dataclass(slots=True)
class NumtasksState:
    limit: int | None = None  # None: "max"
    peak: int = 0
    events: int = 0
    warned: bool = False
    #: tasks in the subtree whose group was killed and has not exited yet
    dying: int = 0


def _state(c: Container) -> NumtasksState:
    return c.state[NAME]


def _read_max(c: Container) -> str:
    limit = _state(c).limit
    return "max\n" if limit is None else f"{limit}\n"


def _write_max(c: Container, data: bytes, caller: Caller) -> None:
    """pids_max_write(): "max", or kstrtoll in [0, PID_MAX_LIMIT]; else EINVAL or ERANGE."""
    _state(c).limit = parse_max_or_int(data, 0, PID_MAX_LIMIT)


def _read_current(c: Container) -> str:
    c.hierarchy.registry.refresh(c)
    return f"{c.nr_subtree_tasks}\n"


def _read_peak(c: Container) -> str:
    return f"{_state(c).peak}\n"


def _read_events(c: Container) -> str:
    return f"max {_state(c).events}\n"


_FILES = (
    ControlFile("max", _read_max, _write_max, placement=Placement.NOT_ROOT),
    ControlFile("current", _read_current, placement=Placement.NOT_ROOT),
    ControlFile("peak", _read_peak, placement=Placement.NOT_ROOT),
    ControlFile("events", _read_events, placement=Placement.NOT_ROOT),
)


class Numtasks(PerContainerItems):
    """Task-count limits, enforced by killing the thread group of a task forked over one."""

    name = NAME
    files = _FILES

    def __init__(self, registry: Registry) -> None:
        super().__init__(registry)
        #: tgid -> start time of thread groups killed and not yet gone
        self.killed: dict[int, int | None] = {}
        #: their tasks still tracked, counted in the ancestors' `dying`
        self.dying: set[Task] = set()
        self.kills = 0
        self.refused_kills = 0
        self._wake: trio.Event | None = None

    def create(self, container: Container) -> NumtasksState | None:
        if container.is_root:
            return None
        state = NumtasksState()
        state.peak, state.events = self.take_restored(container) or (0, 0)
        return state

    def destroy(self, container: Container) -> None:
        """Its journaled counts go too: a container made later at its path starts at 0."""
        if not container.is_root:
            state = _state(container)
            state.peak = state.events = 0
            self.journal_now(container)

    def _bump_peaks(self, c: Container) -> None:
        for node in c.ancestors():
            if node.is_root:
                break
            state = _state(node)
            if node.nr_subtree_tasks > state.peak:
                state.peak = node.nr_subtree_tasks
                self._journal_soon(node)

    def _count_dying(self, task: Task, c: Container, delta: int) -> None:
        """Keep each ancestor's count of dying tasks, so a fork costs O(depth), not O(kills)."""
        for node in c.ancestors():
            if node.is_root:
                break
            _state(node).dying += delta

    def _mark_dying(self, task: Task, c: Container) -> None:
        if task not in self.dying:
            self.dying.add(task)
            self._count_dying(task, c, 1)

    def _over_limit(self, c: Container) -> Container | None:
        """The first ancestor (not the root) whose live, unkilled tasks exceed its limit."""
        for node in c.ancestors():
            if node.is_root:
                return None
            limit = _state(node).limit
            if limit is not None and node.nr_subtree_tasks - _state(node).dying > limit:
                return node
        return None

    def fork(self, task: Task, container: Container) -> None:
        if container.is_root:
            return
        self._bump_peaks(container)
        if task.tgid in self.killed:
            self._mark_dying(task, container)  # a thread of a group already on its way out
            return
        over = self._over_limit(container)
        if over is None:
            return
        state = _state(container)
        state.events += 1
        self._journal_soon(container)
        if not state.warned:  # pids_event(): once, naming the cgroup the fork came from
            state.warned = True
            log.warning("cgroup: fork rejected by numtasks controller in %s", container.path)
        start_time = self._process_start(task, container)
        if start_time is None:
            return  # gone already
        if signals.signal_process(task.tgid, signal.SIGKILL, start_time):
            self.killed[task.tgid] = start_time
            self.kills += 1
            h = container.hierarchy
            for tid in self.registry.threads.get(task.tgid, ()):
                member = self.registry.tasks[tid]
                self._mark_dying(member, member.cgroups[h.id])
        else:
            self.refused_kills += 1

    def _process_start(self, task: Task, container: Container) -> int | None:
        """The start time of the new task's process, to kill that process and no other.

        The one recorded for its leader is used when known: /proc, read now,
        may already show another process under a reused pid. Read from /proc
        otherwise, once the task is checked to be still a member (its exit
        not yet seen), which leaves only a reuse faster than the exit event.
        """
        h = container.hierarchy
        if self.registry.tasks.get(task.tid) is not task or task.cgroups.get(h.id) is None:
            return None
        leader = self.registry.tasks.get(task.tgid)
        if leader is not None and leader.start_time is not None:
            return leader.start_time
        facts = procscan.read_task(task.tgid)
        if facts is None:
            return None
        if leader is not None:
            leader.start_time = facts.start_time  # known now: the journal need not read it
        return facts.start_time

    def restore(self, task: Task, container: Container) -> None:
        """Back after a restart: counted, never killed (it may be there by a move)."""
        if not container.is_root:
            self._bump_peaks(container)

    def attach(self, dst: Container, tasks: Sequence[Task], sources: Sequence[Container]) -> None:
        for task, src in zip(tasks, sources, strict=True):
            if task in self.dying:
                self._count_dying(task, src, -1)
                self._count_dying(task, dst, 1)
        if not dst.is_root:
            self._bump_peaks(dst)

    def exit(self, task: Task, container: Container) -> None:
        if task in self.dying:
            self.dying.discard(task)
            self._count_dying(task, container, -1)
        if task.tgid in self.killed and not self.registry.threads.get(task.tgid):
            del self.killed[task.tgid]

    def unbind(self, hierarchy: Hierarchy) -> None:
        super().unbind(hierarchy)
        self.killed.clear()
        self.dying.clear()

    # ------------------------------------------------------------ persistence

    def item_of(self, c: Container) -> list[int] | None:
        """[peak, events]: counters, not settings; none at zero."""
        state = _state(c)
        return [state.peak, state.events] if state.peak or state.events else None

    def _journal_soon(self, c: Container) -> None:
        self.changed.add(c)
        if self._wake is not None:
            self._wake.set()

    async def run(self) -> None:
        """Journal peaks and events after they change, at most once per PERSIST_PERIOD."""
        # the restore is over: a container not made again by now is gone with its counts
        self.restoring.clear()
        self._wake = trio.Event()
        try:
            while True:
                await self._wake.wait()
                self._wake = trio.Event()  # what changes from here is journaled next time
                self.journal_changed()
                await trio.sleep(PERSIST_PERIOD)
        finally:
            self.journal_changed()  # a clean stop: the journal is still open
