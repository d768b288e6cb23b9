"""Keeps the registry's task table true to the system.

Layered, as DESIGN.md section 4 says: netlink proc-connector events where the
kernel gives them (root, initial namespaces), applied before every read that
must reflect them; a /proc scan at start and after any lost events (ENOBUFS);
and where netlink is unavailable, a periodic scan plus a liveness check of a
container's own members when it is read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass

import trio

from containerfs.core.container import Container
from containerfs.core.registry import Registry
from containerfs.tracking import procscan
from containerfs.tracking.events import Exec, Exit, Fork
from containerfs.tracking.netlink import EventsLost, ProcConnector

log = logging.getLogger(__name__)

#: Tests only: a netlink receive buffer (bytes) small enough that a fork storm
#: overflows it, to prove lost events end in a correct resync.
RCVBUF_ENV = "CONTAINERFS_NETLINK_RCVBUF"


@dataclass
class Counters:
    events: int = 0
    forks: int = 0
    exits: int = 0
    execs: int = 0
    losses: int = 0
    resyncs: int = 0
    misplaced_found: int = 0
    scans: int = 0


class Tracker:
    """Applies fork, exec and exit to the registry; resyncs from /proc when needed."""

    def __init__(self, registry: Registry, mode: str = "auto", scan_interval: float = 1.0) -> None:
        if mode not in ("auto", "netlink", "scan"):
            raise ValueError(f"unknown tracker mode {mode!r}")
        self.registry = registry
        self.requested = mode
        self.mode = "scan"
        self.scan_interval = scan_interval
        self.counters = Counters()
        self.conn: ProcConnector | None = None
        self._resync_needed = False
        #: tids changed by events while a scan runs; the scan cannot judge them
        self._touched: set[int] | None = None

    # ----------------------------------------------------------------- start

    def start(self) -> None:
        """Subscribe to events (unless told not to), then place every live task."""
        if self.requested != "scan":
            rcvbuf = os.environ.get(RCVBUF_ENV)
            conn = ProcConnector(int(rcvbuf)) if rcvbuf else ProcConnector()
            try:
                conn.open()
            except OSError as exc:
                if self.requested == "netlink":
                    raise
                log.warning("netlink proc connector unavailable (%s); scanning /proc", exc)
            else:
                self.conn = conn
                self.mode = "netlink"
        self.registry.refresh_hook = self.refresh
        self._apply_scan(procscan.scan_tasks())
        self.registry.follows_events = self.conn is not None
        log.info("tracking %d tasks in %s mode", len(self.registry.tasks), self.mode)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def stats(self) -> dict[str, object]:
        return {"mode": self.mode, "tasks": len(self.registry.tasks), **asdict(self.counters)}

    # ---------------------------------------------------------------- events

    def refresh(self, container: Container | None) -> None:
        """The registry's refresh hook: make a read reflect what happened before it."""
        if self.conn is not None:
            self.drain()
        elif container is not None:
            self._check_members(container)

    def drain(self) -> None:
        """Apply every event waiting in the socket (non-blocking)."""
        assert self.conn is not None
        try:
            events = self.conn.read_events()
        except EventsLost:
            self.counters.losses += 1
            self._resync_needed = True
            self.registry.follows_events = False  # until the resync puts every task right
            log.warning("netlink lost events (ENOBUFS); resyncing from /proc")
            return
        reg = self.registry
        touched = self._touched
        for ev in events:
            self.counters.events += 1
            if isinstance(ev, Fork):
                self.counters.forks += 1
                reg.fork(ev.parent_tid, ev.parent_tgid, ev.child_tid, ev.child_tgid)
                tid = ev.child_tid
            elif isinstance(ev, Exit):
                self.counters.exits += 1
                reg.remove_task(ev.tid)
                tid = ev.tid
            elif isinstance(ev, Exec):
                self.counters.execs += 1
                reg.exec(ev.tid, ev.tgid)
                tid = ev.tgid
            else:
                continue
            if touched is not None:
                touched.add(tid)

    def _check_members(self, container: Container) -> None:
        """Without events: drop the container's members that have exited (or are zombies)."""
        proc = self.registry.proc
        for task in list(container.tasks):
            facts = proc.read_task(task.tid)
            if (
                facts is None
                or facts.tgid != task.tgid
                or (task.start_time is not None and facts.start_time != task.start_time)
            ):
                self.registry.remove_task(task.tid)
                self.counters.exits += 1

    # ----------------------------------------------------------------- scans

    def _apply_scan(self, live: dict[int, procscan.TaskInfo]) -> None:
        skip = self._touched or set()
        misplaced = self.registry.resync(live, skip)
        self.counters.scans += 1
        if self.counters.scans > 1:
            self.counters.misplaced_found += misplaced

    async def resync(self) -> None:
        """A full /proc scan in a worker thread, applied back on the trio thread."""
        self._resync_needed = False
        self._touched = set()
        try:
            live = await trio.to_thread.run_sync(procscan.scan_tasks)
            if self.conn is not None:
                self.drain()
            self._apply_scan(live)
            self.counters.resyncs += 1
            self.registry.follows_events = self.conn is not None and not self._resync_needed
        finally:
            self._touched = None

    async def run(self) -> None:
        """Follow events (or poll /proc) until cancelled."""
        if self.conn is None:
            while True:
                await trio.sleep(self.scan_interval)
                await self.resync()
        fd = self.conn.fileno()
        while True:
            await trio.lowlevel.wait_readable(fd)
            self.drain()
            if self._resync_needed:
                await self.resync()
