"""The release agent runner, and the auto-delete of empty flagged containers.

The core fires `release(c)` exactly at spec 6.1's moments; this service
turns that into the kernel's usermode-helper contract (spec 6.2): the
hierarchy's agent, read at launch, is exec'd without a shell with argv
[agent, path-from-the-hierarchy-root], the environment exactly HOME=/ and
PATH=/sbin:/bin:/usr/sbin:/usr/bin, cwd /, stdin, stdout and stderr on
/dev/null, no other descriptors, and its own session. It runs as the
daemon's user (root), which is why only root may set the agent.

Beyond the kernel: at most `max_agents` agents run at once (the others wait
their turn, in trigger order, and all run); an agent still running after
`timeout` seconds is killed with its whole process group; every agent is
reaped; each run is logged to the daemon's log as
"release agent AGENT PATH exited STATUS in MS ms", or, when the exec
failed, "release agent AGENT PATH failed to start in MS ms: ERROR".

One pending slot per container: triggers that come before the agent is
launched collapse into one launch. A container removed before its launch
gets none (the kernel cancels that work too).
"""

from __future__ import annotations

import logging
import math
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Any

import trio

from containerfs.core.container import Container
from containerfs.core.extended import Extended, Publish
from containerfs.core.registry import Listener, Registry
from containerfs.errors import CgroupError

log = logging.getLogger(__name__)

DEFAULT_MAX_AGENTS = 8
DEFAULT_AGENT_TIMEOUT = 30.0
#: the kernel's usermode-helper environment (spec 6.2), and nothing else
AGENT_ENV = {"HOME": "/", "PATH": "/sbin:/bin:/usr/sbin:/usr/bin"}


@dataclass
class Job:
    """The one pending slot of a container: what its next turn must do."""

    container: Container
    #: the release condition held at a trigger: run the agent
    agent: bool = False
    #: the container is flagged cgroup.auto_delete and became empty
    delete: bool = False


@dataclass
class Running:
    """One launched agent: its process, the path it was given and when it started."""

    proc: trio.Process
    path: str
    started: float


@dataclass
class Counters:
    triggers: int = 0
    coalesced: int = 0
    started: int = 0
    failed: int = 0
    timed_out: int = 0
    auto_deleted: int = 0
    running: int = 0
    most_running: int = 0


class ReleaseRunner(Listener):
    """Hears release and emptying, and runs agents and auto-deletes as a trio service."""

    def __init__(
        self,
        registry: Registry,
        publish: Publish | None = None,
        max_agents: int = DEFAULT_MAX_AGENTS,
        timeout: float = DEFAULT_AGENT_TIMEOUT,
    ) -> None:
        if max_agents < 1:
            raise ValueError("max_agents must be at least 1")
        if not timeout > 0:
            raise ValueError("the agent timeout must be positive")
        self.registry = registry
        self.publish = publish
        self.max_agents = max_agents
        self.timeout = timeout
        self.limiter = trio.CapacityLimiter(max_agents)
        self.counters = Counters()
        #: serial -> pending job; a container has at most one
        self._pending: dict[int, Job] = {}
        self._jobs_in, self._jobs_out = trio.open_memory_channel[int](math.inf)

    def stats(self) -> dict[str, Any]:
        return {
            "max_agents": self.max_agents,
            "timeout": self.timeout,
            "pending": len(self._pending),
            **vars(self.counters),
        }

    # ---------------------------------------------------------------- triggers

    def release(self, c: Container) -> None:
        self._trigger(c, agent=True)

    def populated_changed(self, c: Container) -> None:
        if not c.populated:
            self._check_auto_delete(c)

    def container_removed(self, c: Container) -> None:
        if c.parent is not None:
            self._check_auto_delete(c.parent)

    def _check_auto_delete(self, c: Container) -> None:
        if (
            not c.removed
            and not c.is_root
            and not c.populated
            and not c.children
            and Extended.of(self.registry).is_auto_delete(c)
        ):
            self._trigger(c, delete=True)

    def _trigger(self, c: Container, *, agent: bool = False, delete: bool = False) -> None:
        """Fill the container's pending slot, or merge into the one already there.

        Called from registry callbacks: it only records, never acts, so the
        registry is never re-entered from inside one of its own methods.
        """
        self.counters.triggers += 1
        job = self._pending.get(c.serial)
        if job is not None:
            job.agent |= agent
            job.delete |= delete
            self.counters.coalesced += 1
            return
        self._pending[c.serial] = Job(c, agent, delete)
        self._jobs_in.send_nowait(c.serial)

    # ----------------------------------------------------------------- service

    async def run(self) -> None:
        """Run every job in its own task; the limiter queues agents in order."""
        async with trio.open_nursery() as nursery:
            async for serial in self._jobs_out:
                nursery.start_soon(self._run_job, serial)

    async def _run_job(self, serial: int) -> None:
        job = self._pending[serial]
        c = job.container
        if not (job.agent and c.hierarchy.release_agent):
            del self._pending[serial]
            if job.delete:
                self._auto_delete(c)
            return
        async with self.limiter:
            # from the launch on, a new trigger needs a new run
            job = self._pending.pop(serial)
            agent = c.hierarchy.release_agent
            proc = None
            if agent and not c.removed:
                proc = await self._launch(agent, c)
            if job.delete:
                self._auto_delete(c)
            if proc is not None:
                await self._reap(proc, agent, c)

    def _auto_delete(self, c: Container) -> None:
        """Remove `c` if it is still flagged, empty and childless (else it was reprieved)."""
        if c.removed or c.populated or c.children:
            return
        if not Extended.of(self.registry).is_auto_delete(c):
            return
        if self.publish is not None:
            self.publish("auto_delete", c)
        try:
            self.registry.rmdir(c)
        except CgroupError as exc:
            log.info("auto-delete of %d:%s: %s", c.hierarchy.id, c.path, exc.message)
            return
        self.counters.auto_deleted += 1
        log.info("auto-deleted %d:%s", c.hierarchy.id, c.path)

    # ------------------------------------------------------------------ agents

    async def _launch(self, agent: str, c: Container) -> Running | None:
        path = c.path
        started = time.monotonic()
        try:
            proc = await trio.lowlevel.open_process(
                [agent, path],
                # no PATH search, ever: a relative agent resolves against the cwd, /
                executable=agent if "/" in agent else "/" + agent,
                env=AGENT_ENV,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                close_fds=True,
                start_new_session=True,
            )
        except OSError as exc:
            self.counters.failed += 1
            ms = (time.monotonic() - started) * 1000
            # fixed fields first, like "exited": the error text is free-form
            log.warning("release agent %s %s failed to start in %.0f ms: %s", agent, path, ms, exc)
            if self.publish is not None:
                self.publish("agent_failed", c, agent=agent, error=str(exc))
            return None
        self.counters.started += 1
        self.counters.running += 1
        self.counters.most_running = max(self.counters.most_running, self.counters.running)
        if self.publish is not None:
            self.publish("agent_started", c, agent=agent, pid=proc.pid)
        return Running(proc, path, started)

    async def _reap(self, run: Running, agent: str, c: Container) -> None:
        """Wait for the agent, kill its process group at the timeout, and always reap it."""
        proc = run.proc
        timed_out = False
        try:
            # cancelled only when the daemon stops: the agent is then left running,
            # in its own session, for init to reap, as a kernel agent would be
            with trio.move_on_after(self.timeout):
                await proc.wait()
            if proc.returncode is None:
                timed_out = True
                self.counters.timed_out += 1
                # the unreaped leader keeps its pid, so its group id cannot be reused yet
                os.killpg(proc.pid, signal.SIGKILL)
            status = await proc.wait()
        finally:
            self.counters.running -= 1
        ms = (time.monotonic() - run.started) * 1000
        shown = f"signal {-status}" if status < 0 else str(status)
        if timed_out:
            shown += f" (killed after the {self.timeout:g} s timeout)"
        log.info("release agent %s %s exited %s in %.0f ms", agent, run.path, shown, ms)
        if self.publish is not None:
            self.publish(
                "agent_finished",
                c,
                agent=agent,
                pid=proc.pid,
                status=status,
                duration_ms=round(ms, 3),
                timed_out=timed_out,
            )
