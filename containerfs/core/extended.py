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
  non-numbers EINVAL, as cgroup v2).

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

Publish = Callable[..., Any]


class Extended(Listener):
    """The state and background work behind the extended files of one registry.

    It remembers which containers carry the auto-delete flag (and copies the
    flag to new children), and it finishes what a cgroup.kill write starts:
    the write signals every process known at that moment, and `run` keeps
    sweeping until the subtree is empty, killing what was forked meanwhile.
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
        #: serial -> pids already signalled, for every subtree a kill is still sweeping
        self._killing: dict[int, set[int]] = {}
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
        """Signal every process of the subtree now; sweep again until it is empty."""
        started = time.monotonic()
        signalled = self._killing.get(c.serial, set())
        killed = self._sweep(c, signalled)
        log.info("cgroup.kill of %d:%s: %d processes signalled", c.hierarchy.id, c.path, killed)
        if not c.populated:
            self._finished(c, started, 0)
        elif c.serial not in self._killing:
            self._killing[c.serial] = signalled
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

    def _sweep(self, c: Container, signalled: set[int]) -> int:
        """Signal the subtree's processes not yet in `signalled`; return how many were."""
        count = 0
        for tgid, start in self._targets(c).items():
            if tgid in signalled:
                continue
            signalled.add(tgid)
            if _kill(tgid, start):
                count += 1
                self._announce(c, tgid)
        return count

    def _announce(self, c: Container, pid: int) -> None:
        if self.publish is not None:
            self.publish("killed", c, pid=pid)

    async def _follow(self, c: Container) -> None:
        """Sweep `c` until its subtree is empty, or until the timeout."""
        started = time.monotonic()
        deadline = started + self.kill_timeout
        signalled = self._killing[c.serial]
        killed = 0
        pause = KILL_PAUSE[0]
        try:
            while not c.removed and c.populated:
                targets = self._targets(c)
                if not c.populated:
                    break
                # a process that exited can come back as a new one with the same pid
                signalled &= targets.keys()
                fresh = {p: s for p, s in targets.items() if p not in signalled}
                signalled.update(fresh)
                for pid in await trio.to_thread.run_sync(_kill_all, fresh):
                    self._announce(c, pid)
                    killed += 1
                if targets.keys() <= signals.PROTECTED:
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
            self._finished(c, started, killed)
        finally:
            self._killing.pop(c.serial, None)

    def _finished(self, c: Container, started: float, killed: int) -> None:
        log.info(
            "cgroup.kill of %d:%s: subtree empty after %.1f ms (%d more processes killed)",
            c.hierarchy.id,
            c.path,
            (time.monotonic() - started) * 1000,
            killed,
        )

    async def run(self) -> None:
        """Finish every kill a write started, each in its own task."""
        async with trio.open_nursery() as nursery:
            async for c in self._kills_out:
                nursery.start_soon(self._follow, c)


def _kill(pid: int, start: int | None) -> bool:
    """SIGKILL one process through a pidfd, checking its identity by start time."""
    if start is None:
        info = procscan.read_task(pid)
        if info is None:
            return False
        start = info.start_time
    return signals.signal_process(pid, signal.SIGKILL, start)


def _kill_all(targets: dict[int, int | None]) -> list[int]:
    """Worker-thread half of a sweep: the pids that were signalled."""
    return [pid for pid, start in targets.items() if _kill(pid, start)]


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
