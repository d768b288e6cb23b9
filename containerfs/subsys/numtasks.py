"""numtasks: the seeds' ResGroups task-count controller, with the kernel's pids files.

numtasks.current counts threads, as pids.current does: every task in the
container and its descendants (the core keeps that count per container).
Limits are hierarchical: a new task is over the limit when any non-root
ancestor of its container holds more tasks than its numtasks.max.

Userspace cannot make fork fail. What it can do is see the fork (a netlink
event, applied on the registry's thread) and kill the new task's whole
thread group at once, because a signal takes a process: the newest task is
the one whose creation the kernel would have refused. The kill goes through
a pidfd after checking the process's start time, never to the daemon, its
ancestors or pid 1, and the container the fork came from counts it in
numtasks.events. Tasks of a group already killed are not counted against
the limit while they die, so one fork costs one kill. Moving tasks in may
exceed the limit, and lowering the limit kills nothing, as in the kernel.
"""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

from containerfs import signals
from containerfs.core.container import Container
from containerfs.core.files import Caller, ControlFile, Placement
from containerfs.core.parse import parse_max_or_int
from containerfs.core.subsystem import Subsystem
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


class Numtasks(Subsystem):
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

    def create(self, container: Container) -> NumtasksState | None:
        return None if container.is_root else NumtasksState()

    def _bump_peaks(self, c: Container) -> None:
        for node in c.ancestors():
            if node.is_root:
                break
            state = _state(node)
            state.peak = max(state.peak, node.nr_subtree_tasks)

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
        if not state.warned:
            state.warned = True
            log.warning("fork rejected by numtasks controller in %s", over.path)
        facts = procscan.read_task(task.tgid)
        if facts is None:
            return  # already gone
        if task.is_leader and task.start_time is None:
            task.start_time = facts.start_time  # known now: the journal need not read it
        if signals.signal_process(task.tgid, signal.SIGKILL, facts.start_time):
            self.killed[task.tgid] = facts.start_time
            self.kills += 1
            h = container.hierarchy
            for tid in self.registry.threads.get(task.tgid, ()):
                member = self.registry.tasks[tid]
                self._mark_dying(member, member.cgroups[h.id])
        else:
            self.refused_kills += 1

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
