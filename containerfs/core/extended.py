"""containerfs's own control files, listed only under the `extended` mount option.

Default listings stay exactly cgroup v1's; with `extended`, every container
but the root also has:

- `cgroup.auto_delete` (0644): the seeds' auto_delete flag. Read "0\\n" or
  "1\\n"; written like notify_on_release (kstrtoull: EINVAL, ERANGE), copied
  from the parent at mkdir. When a flagged container becomes empty (its last
  task leaves its subtree, or its last child is removed: the moments of spec
  6.1), the daemon removes it, after starting its release agent if
  notify_on_release asks for one; the parent then follows if flagged too.
- `cgroup.events` (0444): "populated 0\\n" or "populated 1\\n", cgroup v2's
  format. v2's "frozen" line is left out: v1 hierarchies have no
  cgroup.freeze, and a line that always read 0 would lie. Changes are
  announced on the control socket's event stream, not by inotify, since
  FUSE cannot notify on changes the filesystem makes itself.
- `cgroup.kill` (0200): writing "1" SIGKILLs every process with a task in the
  subtree (kstrtoint after whitespace stripping: other integers ERANGE,
  non-numbers EINVAL, as cgroup v2), and every process they forked that the
  tracker has not placed yet: each is SIGSTOPped first, so that its children
  can all be found (`stop_and_kill`).

The flag lives here and not on Container so that the core model stays
cgroup v1's; `Extended.of(registry)` finds the one store of a registry.
"""

from __future__ import annotations

import errno
import logging
import math
import signal
import time
from collections.abc import Callable
from typing import Any

import trio

from containerfs import signals
from containerfs.core.container import Container
from containerfs.core.files import Caller, ControlFile, Placement
from containerfs.core.parse import kstrtoint, parse_flag, strip
from containerfs.core.registry import Listener, Registry
from containerfs.errors import CgroupError
from containerfs.tracking import procscan

log = logging.getLogger(__name__)

AUTO_DELETE = "cgroup.auto_delete"
#: how long cgroup.kill keeps sweeping a subtree whose processes keep forking
KILL_TIMEOUT = 10.0
#: the first and the longest pause between two sweeps
KILL_PAUSE = (0.002, 0.05)
#: how long a sweep waits for the processes it stopped to be seen stopped
STOP_WAIT = 0.5
#: the pause between two looks at processes not yet seen stopped
STOP_POLL = 0.001

Publish = Callable[..., Any]


class Extended(Listener):
    """The state and background work behind the extended files of one registry.

    It remembers which containers carry the auto-delete flag (and copies the
    flag to new children), and it carries out what a cgroup.kill write
    starts: `run` sweeps the subtree until it is empty, each sweep stopping,
    then killing, the processes it finds and every descendant they forked.
    """

    def __init__(
        self,
        registry: Registry,
        publish: Publish | None = None,
        kill_timeout: float = KILL_TIMEOUT,
    ) -> None:
        self.registry = registry
        self.publish = publish
        self.kill_timeout = kill_timeout
        #: serials of the containers whose auto-delete flag is set
        self.auto_delete: set[int] = set()
        #: serials of the containers whose subtree a kill is still sweeping
        self._killing: set[int] = set()
        self._kills_in, self._kills_out = trio.open_memory_channel[Container](math.inf)

    @classmethod
    def of(cls, registry: Registry) -> Extended:
        """The registry's store, installed on first use when no daemon installed one."""
        for listener in registry.listeners:
            if isinstance(listener, cls):
                return listener
        store = cls(registry)
        registry.listeners.append(store)
        return store

    # ---------------------------------------------------------------- listener

    def container_created(self, c: Container) -> None:
        if c.parent is not None and c.parent.serial in self.auto_delete:
            self.auto_delete.add(c.serial)

    def container_removed(self, c: Container) -> None:
        self.auto_delete.discard(c.serial)

    def is_auto_delete(self, c: Container) -> bool:
        return c.serial in self.auto_delete

    # -------------------------------------------------------------------- kill

    def kill(self, c: Container) -> None:
        """Start sweeping `c`'s subtree until it is empty (a write's part of cgroup.kill).

        The signals go from a worker thread, never from the write: stopping
        a process means waiting until it is seen stopped, and a process in
        the middle of a request to this very filesystem stops only once the
        daemon answered it. A second write while a sweep runs adds nothing.
        """
        if c.serial not in self._killing:
            self._killing.add(c.serial)
            self._kills_in.send_nowait(c)

    def _targets(self, c: Container) -> dict[int, int | None]:
        """tgid -> start time (None when unknown) of every process with a task in `c`'s subtree."""
        for node in c.walk():
            self.registry.refresh(node)
        targets: dict[int, int | None] = {}
        for node in c.walk():
            for task in node.tasks:
                if task.tgid not in targets:
                    leader = self.registry.tasks.get(task.tgid)
                    targets[task.tgid] = leader.start_time if leader is not None else None
        return targets

    def _outside(self, targets: dict[int, int | None]) -> dict[int, int | None]:
        """tgid -> start time (None when unknown) of every known process not in `targets`.

        A descendant of a target that is one of these was moved out of the
        subtree (a fork inherits its parent's container): the sweep spares it.
        """
        outside: dict[int, int | None] = {}
        for tgid in self.registry.threads.keys() - targets.keys():
            leader = self.registry.tasks.get(tgid)
            outside[tgid] = leader.start_time if leader is not None else None
        return outside

    def _announce(self, c: Container, pid: int) -> None:
        if self.publish is not None:
            self.publish("killed", c, pid=pid)

    async def _follow(self, c: Container) -> None:
        """Sweep `c` until its subtree is empty, or until the timeout."""
        started = time.monotonic()
        deadline = started + self.kill_timeout
        #: (pid, start time) of every process a sweep dealt with: a pid reused
        #: by a new process of the subtree is another key, and is killed too
        done: set[tuple[int, int]] = set()
        killed = 0
        pause = KILL_PAUSE[0]
        try:
            while not c.removed:
                targets = self._targets(c)
                if not c.populated:
                    break
                outside = self._outside(targets)
                tried, hit = await trio.to_thread.run_sync(stop_and_kill, targets, done, outside)
                done |= tried
                for pid, _start in hit:
                    self._announce(c, pid)
                killed += len(hit)
                if all(signals.is_protected(pid) for pid in targets):
                    log.warning(
                        "cgroup.kill of %d:%s: only protected processes remain: %s",
                        c.hierarchy.id,
                        c.path,
                        sorted(targets),
                    )
                    return
                if time.monotonic() > deadline:
                    log.warning(
                        "cgroup.kill of %d:%s: still populated after %.0f s; giving up",
                        c.hierarchy.id,
                        c.path,
                        self.kill_timeout,
                    )
                    return
                await trio.sleep(pause)
                pause = min(pause * 2, KILL_PAUSE[1])
            log.info(
                "cgroup.kill of %d:%s: subtree empty after %.1f ms (%d processes killed)",
                c.hierarchy.id,
                c.path,
                (time.monotonic() - started) * 1000,
                killed,
            )
        finally:
            self._killing.discard(c.serial)

    async def run(self) -> None:
        """Finish every kill a write started, each in its own task."""
        async with trio.open_nursery() as nursery:
            async for c in self._kills_out:
                nursery.start_soon(self._follow, c)


def stop_and_kill(
    targets: dict[int, int | None],
    done: set[tuple[int, int]],
    outside: dict[int, int | None],
) -> tuple[set[tuple[int, int]], list[tuple[int, int]]]:
    """Worker-thread half of a sweep: (pid, start) of the processes it dealt with, and killed.

    Killing a parent first would let the children it forked since the
    tracker last looked (all of them, without netlink) be reparented to init
    and escape. So every target is stopped first, and once it is seen
    stopped its children list is complete (a stopped process forks no more):
    those children are stopped in turn, generation after generation, and
    only then is everyone SIGKILLed. A child the registry places outside the
    subtree (`outside`) was moved out and is neither stopped nor killed;
    processes in `done` were killed by an earlier sweep and are dying.

    Every signal goes through `signals` (pidfd, start time checked, never a
    protected process), with the start time read before the stop: a process
    that could not be stopped is never killed here, and one that was stopped
    is the one the kill then reaches, or it is gone. The kill comes in a
    `finally`, so an error cannot leave a stopped process behind either.
    """
    tried: set[tuple[int, int]] = set()
    stopped: dict[int, int] = {}
    try:
        generation = targets
        while generation:
            fresh = []
            for pid, start in generation.items():
                info = procscan.read_task(pid)
                if info is None or (start is not None and info.start_time != start):
                    continue  # gone, or the pid is another process's now
                key = (pid, info.start_time)
                if key in done or key in tried or _moved_out(outside, *key):
                    continue
                tried.add(key)
                if signals.signal_process(pid, signal.SIGSTOP, info.start_time):
                    stopped[pid] = info.start_time
                    fresh.append(pid)
            _wait_stopped(fresh)
            children = set().union(*map(procscan.process_children, fresh))
            generation = dict.fromkeys(children - stopped.keys())
    finally:
        hit: list[tuple[int, int]] = []
        for pid, start in stopped.items():
            try:  # one failure must not leave the others stopped
                if signals.signal_process(pid, signal.SIGKILL, start):
                    hit.append((pid, start))
            except OSError as exc:
                log.error("cgroup.kill: cannot kill stopped process %d: %s", pid, exc)
    return tried, hit


def _moved_out(outside: dict[int, int | None], pid: int, start: int) -> bool:
    """Whether the registry places this very process outside the subtree.

    Its start time must match when the registry has one: an entry the
    tracker has not yet dropped may name an earlier process with that pid.
    """
    return pid in outside and outside[pid] in (None, start)


def _wait_stopped(pids: list[int]) -> None:
    """Wait until every process of `pids` is seen stopped, for at most STOP_WAIT.

    A process in uninterruptible sleep stops only when it wakes; its
    children forked meanwhile are then left to the next sweep, which finds
    them if the tracker does (with netlink, always).
    """
    deadline = time.monotonic() + STOP_WAIT
    pending = pids
    while pending:
        pending = [pid for pid in pending if not procscan.process_stopped(pid)]
        if not pending or time.monotonic() > deadline:
            return
        time.sleep(STOP_POLL)


# ------------------------------------------------------------------- files


def _read_auto_delete(c: Container) -> str:
    return "1\n" if Extended.of(c.hierarchy.registry).is_auto_delete(c) else "0\n"


def _write_auto_delete(c: Container, data: bytes, caller: Caller) -> None:
    store = Extended.of(c.hierarchy.registry)
    if parse_flag(data):
        store.auto_delete.add(c.serial)
    else:
        store.auto_delete.discard(c.serial)


def _read_events(c: Container) -> str:
    c.hierarchy.registry.refresh(c)
    return f"populated {int(c.populated)}\n"


def _write_kill(c: Container, data: bytes, caller: Caller) -> None:
    value = kstrtoint(strip(data))  # EINVAL for junk, ERANGE past an int
    if value != 1:
        raise CgroupError(errno.ERANGE, f"cgroup.kill takes 1, not {value}")
    Extended.of(c.hierarchy.registry).kill(c)


EXTENDED_FILES: tuple[ControlFile, ...] = (
    ControlFile(
        AUTO_DELETE,
        _read_auto_delete,
        _write_auto_delete,
        placement=Placement.NOT_ROOT,
        extended=True,
    ),
    ControlFile("cgroup.events", _read_events, placement=Placement.NOT_ROOT, extended=True),
    ControlFile("cgroup.kill", write=_write_kill, placement=Placement.NOT_ROOT, extended=True),
)
