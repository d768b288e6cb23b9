"""freezer: the kernel's v1 freezer (spec 7.4), enforced with SIGSTOP and SIGCONT.

Userspace has no freezer, only job-control stops, and a stop signal acts on a
whole process, not on one thread. So freezing a container stops every
process that has a thread in it or below it; a process with threads in
several containers is stopped while any of them is freezing. The container
reads FREEZING until every thread of its subtree is seen stopped in /proc,
then FROZEN; a fork that races with the freeze is stopped as soon as its
event arrives, and the service loop keeps stopping whatever it finds running
until the subtree is quiet.

Thawing sends SIGCONT to exactly the processes this subsystem stopped
(`stopped`, keyed by pid and start time so a reused pid is never continued):
a process that was already stopped when the freeze reached it is left as it
was. Never the daemon, its ancestors, pid 1 or kernel threads
(`containerfs.signals`); a container holding one of them stays FREEZING.
"""

from __future__ import annotations

import errno
import logging
import signal
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from containerfs import signals
from containerfs.core.files import Caller, ControlFile, Placement
from containerfs.core.parse import ParseError, strip
from containerfs.core.subsystem import Subsystem
from containerfs.tracking import procscan
from containerfs.tracking.procscan import thread_children, thread_state

if TYPE_CHECKING:
    from containerfs.core.container import Container
    from containerfs.core.hierarchy import Hierarchy
    from containerfs.core.registry import Registry
    from containerfs.core.task import Task

log = logging.getLogger(__name__)

#: /proc states of a thread that is not running: job-control stop and ptrace stop
STOPPED_STATES = frozenset("Tt")
#: states of a thread that has exited; it needs no stopping
DEAD_STATES = frozenset("ZX")
#: pause between passes while a freezing subtree still has running threads
FREEZING_INTERVAL = 0.02
#: how often a frozen subtree is re-checked for processes someone else continued (a
#: read re-checks a subtree of at most READ_CHECK_LIMIT threads itself)
FROZEN_INTERVAL = 1.0
#: threads whose state one worker-thread call reads
BATCH = 512
#: a read of freezer.state checks the threads itself up to this many, else the loop decides
READ_CHECK_LIMIT = 64


@dataclass(slots=True)
class FreezerState:
    """One container's freezer state.

    `self_freezing` is what was written; whether the container is freezing
    also depends on its ancestors. `frozen` means every thread of the subtree
    was seen stopped since the last change (it is only meaningful, and only
    ever True, while the container is freezing).
    """

    self_freezing: bool = False
    frozen: bool = False


def read_states(
    members: Iterable[tuple[int, int]],
) -> tuple[dict[tuple[int, int], str | None], set[int]]:
    """(tgid, tid) -> state letter for a batch of threads, and their children's pids.

    Runs in a worker thread.
    """
    states: dict[tuple[int, int], str | None] = {}
    children: set[int] = set()
    for member in members:
        states[member] = thread_state(*member)
        children.update(thread_children(*member))
    return states, children


def _subsys(c: Container) -> FreezerSubsystem:
    subsys = c.hierarchy.registry.subsystems[FreezerSubsystem.name]
    assert isinstance(subsys, FreezerSubsystem)
    return subsys


def _read_state(c: Container) -> str:
    return _subsys(c).state_of(c) + "\n"


def _write_state(c: Container, data: bytes, caller: Caller) -> None:
    # freezer_write(): strstrip, then exactly one of two words; FREEZING is not one
    word = strip(data)
    if word == b"FROZEN":
        _subsys(c).freeze(c)
    elif word == b"THAWED":
        _subsys(c).thaw(c)
    else:
        raise ParseError(errno.EINVAL, f"freezer.state takes FROZEN or THAWED, not {word!r}")


def _saved_state(c: Container) -> str:
    """The intent, not the progress: FROZEN only where FROZEN was written to `c` itself."""
    return "FROZEN\n" if _subsys(c).state(c).self_freezing else "THAWED\n"


def _read_self_freezing(c: Container) -> str:
    return "1\n" if _subsys(c).state(c).self_freezing else "0\n"


def _read_parent_freezing(c: Container) -> str:
    return "1\n" if c.parent is not None and _subsys(c).freezing(c.parent) else "0\n"


class FreezerSubsystem(Subsystem):
    """Freezes containers by stopping their processes, and thaws exactly what it stopped."""

    name = "freezer"
    files = (
        ControlFile("state", _read_state, _write_state, placement=Placement.NOT_ROOT,
                    save=_saved_state),
        ControlFile("self_freezing", _read_self_freezing, placement=Placement.NOT_ROOT),
        ControlFile("parent_freezing", _read_parent_freezing, placement=Placement.NOT_ROOT),
    )

    def __init__(self, registry: Registry) -> None:
        super().__init__(registry)
        #: pid -> start time of every process this subsystem stopped and must continue.
        #: Plain data, so the journal can keep it across a daemon restart.
        self.stopped: dict[int, int] = {}
        #: containers FROZEN was written to (self_freezing), for the service loop
        self.self_freezing: set[Container] = set()
        #: protected processes (pid -> start time) already refused, so the log says it once
        self._refused: dict[int, int] = {}
        self._wake = trio.Event()

    # ---------------------------------------------------------------- state

    def create(self, container: Container) -> FreezerState:
        return FreezerState()

    def destroy(self, container: Container) -> None:
        self.self_freezing.discard(container)

    def state(self, c: Container) -> FreezerState:
        return c.state[self.name]

    def freezing(self, c: Container) -> bool:
        """True if FROZEN was written to `c` or to one of its ancestors."""
        return any(self.state(node).self_freezing for node in c.ancestors())

    def state_of(self, c: Container) -> str:
        """THAWED, FREEZING or FROZEN, evaluated now as the kernel does on read.

        A small subtree is looked at on every read, FROZEN or not: a member
        someone continued (kill -CONT) makes this read FREEZING and is
        stopped again at once, rather than at the next service-loop look.
        """
        if not self.freezing(c):
            return "THAWED"
        self.registry.refresh(c)
        self._check_now(c)
        return "FROZEN" if self.state(c).frozen else "FREEZING"

    def _check_now(self, c: Container) -> None:
        """Settle a small subtree on the spot; a big one is left to the service loop."""
        members = _members([c])
        if len(members) > READ_CHECK_LIMIT:
            return
        states, children = read_states(members)
        self._adopt(children)
        for tgid in _running(states):
            self._stop(tgid)
        self._settle(c, states)

    def _settle(self, c: Container, states: dict[tuple[int, int], str | None]) -> bool:
        """Mark `c` and its descendants frozen where every thread was seen stopped.

        A thread missing from `states` joined after they were read: not frozen yet.
        """
        frozen = all(self._settle(child, states) for child in list(c.children.values()))
        for task in c.tasks:
            state = states.get((task.tgid, task.tid), "R")
            if state is not None and state not in STOPPED_STATES | DEAD_STATES:
                frozen = False
        self.state(c).frozen = frozen
        return frozen

    def _adopt(self, children: set[int]) -> None:
        """Place children the tracker has not reported yet; the fork hook stops them."""
        for pid in sorted(children - self.registry.tasks.keys()):
            self.registry.adopt_tid(pid)

    def _unsettle(self, c: Container) -> None:
        """`c` gained a task: it and its freezing ancestors are FREEZING again."""
        for node in c.ancestors():
            self.state(node).frozen = False

    # --------------------------------------------------------- freeze, thaw

    def freeze(self, c: Container) -> None:
        self.state(c).self_freezing = True
        self.self_freezing.add(c)
        self._wake.set()

    def thaw(self, c: Container) -> None:
        """Clear self_freezing; continue what is no longer in any freezing container."""
        self.state(c).self_freezing = False
        self.self_freezing.discard(c)
        if self.freezing(c):
            return  # an ancestor still freezes it: nothing changes (spec 7.4)
        tgids: set[int] = set()
        for node in c.walk():
            if self.freezing(node):
                continue
            self.state(node).frozen = False
            tgids.update(task.tgid for task in node.tasks)
        for tgid in sorted(tgids):
            if not self._process_frozen(tgid):
                self._continue(tgid)

    def _process_frozen(self, tgid: int) -> bool:
        """A signal stops a whole process: it stays stopped while any thread is freezing."""
        hierarchy = self.hierarchy
        if hierarchy is None:
            return False
        for tid in self.registry.threads.get(tgid, ()):
            c = self.registry.tasks[tid].cgroups.get(hierarchy.id)
            if c is not None and self.freezing(c):
                return True
        return False

    def _stop(self, tgid: int) -> None:
        """SIGSTOP a running process and remember it; one already stopped is not ours."""
        info = procscan.read_task(tgid)
        if info is None or info.state in STOPPED_STATES:
            return
        if self._refused.get(tgid) == info.start_time:
            return
        if signals.is_protected(tgid):
            log.warning("freezer: pid %d is protected (daemon, ancestor, init); not stopped", tgid)
            self._refused[tgid] = info.start_time
            return
        if signals.signal_process(tgid, signal.SIGSTOP, info.start_time):
            self.stopped[tgid] = info.start_time
            self.registry.subsystem_changed(self, str(tgid))

    def _continue(self, tgid: int) -> None:
        start_time = self.stopped.pop(tgid, None)
        if start_time is not None:
            signals.signal_process(tgid, signal.SIGCONT, start_time)
            self.registry.subsystem_changed(self, str(tgid))

    def saved(self) -> dict[str, int]:
        """The stopped set, pid -> start time: a restarted daemon must know what it
        stopped to thaw it."""
        return {str(pid): start for pid, start in self.stopped.items()}

    def saved_item(self, key: str) -> int | None:
        return self.stopped.get(int(key))

    def restore_saved(self, data: dict) -> None:
        self.stopped = {int(pid): start for pid, start in data.items()}

    # ------------------------------------------------------------ task hooks

    def fork(self, task: Task, container: Container) -> None:
        """A task born in a freezing container: stop its process now, before it forks on."""
        if not self.freezing(container):
            return
        self._unsettle(container)
        if task.is_leader:
            self._stop(task.tgid)
        self._wake.set()

    def attach(self, dst: Container, tasks: Sequence[Task], sources: Sequence[Container]) -> None:
        """Moved tasks take the destination's state (kernels since 3.7)."""
        if self.freezing(dst):
            self._unsettle(dst)
            for tgid in sorted({task.tgid for task in tasks}):
                self._stop(tgid)
            self._wake.set()
        left = {t.tgid for t, src in zip(tasks, sources, strict=True) if self.freezing(src)}
        for tgid in sorted(left):
            if not self._process_frozen(tgid):
                self._continue(tgid)

    def unbind(self, hierarchy: Hierarchy) -> None:
        """Nothing can stay frozen in a hierarchy that is gone."""
        for tgid in sorted(self.stopped):
            self._continue(tgid)
        self.self_freezing.clear()
        super().unbind(hierarchy)

    # --------------------------------------------------------- service loop

    async def run(self) -> None:
        """Stop what runs in freezing subtrees until they are quiet, then keep watch."""
        while True:
            wake = self._wake = trio.Event()
            if not self.self_freezing and not self.stopped:
                await wake.wait()
                continue
            if await self._pass():
                await trio.sleep(FREEZING_INTERVAL)
            else:
                with trio.move_on_after(FROZEN_INTERVAL):
                    await wake.wait()

    async def _pass(self) -> bool:
        """One look at every freezing subtree; True while one of them is not yet frozen."""
        self.registry.refresh()
        tops = [c for c in self.self_freezing if c.parent is None or not self.freezing(c.parent)]
        members = _members(tops)
        states: dict[tuple[int, int], str | None] = {}
        children: set[int] = set()
        for i in range(0, len(members), BATCH):
            batch = await trio.to_thread.run_sync(read_states, members[i : i + BATCH])
            states.update(batch[0])
            children.update(batch[1])
        self._adopt(children)
        # the registry may have changed while the worker read: judge only what still holds
        tops = [c for c in tops if not c.removed and self.freezing(c)]
        for tgid in _running(states):
            if self._process_frozen(tgid):
                self._stop(tgid)
        self._release_strays()
        return not all([self._settle(c, states) for c in tops])

    def _release_strays(self) -> None:
        """Continue stopped processes no freezing container holds any more; forget dead ones."""
        for tgid, start_time in sorted(self.stopped.items()):
            if tgid in self.registry.threads:
                if not self._process_frozen(tgid):
                    self._continue(tgid)
                continue
            info = procscan.read_task(tgid)
            if info is None or info.start_time != start_time:
                del self.stopped[tgid]
                self.registry.subsystem_changed(self, str(tgid))
        for tgid, start_time in list(self._refused.items()):
            info = procscan.read_task(tgid)
            if info is None or info.start_time != start_time:
                del self._refused[tgid]


def _members(tops: Iterable[Container]) -> list[tuple[int, int]]:
    """(tgid, tid) of every thread in the subtrees of `tops`, sorted."""
    return sorted({(t.tgid, t.tid) for top in tops for c in top.walk() for t in c.tasks})


def _running(states: dict[tuple[int, int], str | None]) -> list[int]:
    """Processes with a thread seen neither stopped nor dead."""
    return sorted(
        {
            tgid
            for (tgid, _tid), state in states.items()
            if state is not None and state not in STOPPED_STATES | DEAD_STATES
        }
    )
