"""ns: the namespace container subsystem of seed 004 (Serge Hallyn's ns_container).

A container stands for a set of namespaces. As in the seed's can_attach, a
task may only be attached to an empty child of the container it is in
(EPERM otherwise). A task seen at fork or exec in namespaces other than its
container's is moved into a new child container made for it, the seed's
container_clone(); such a child removes itself once it is empty.

The namespaces are read from /proc/TID/ns after the event, in a worker
thread, in batches: a task that changes namespaces and exits within one
batch period (50 ms) is not cloned. Kernel threads are never cloned (some,
as kdevtmpfs, have a mount namespace of their own).

Across a daemon restart, each clone's namespaces and its removing itself
are kept (saved(), one item per clone, by path). A task placed back where it
was (the `restore` hook) is not looked at: it is no fork or exec, and it was
judged at its last one; a change of namespaces it made while the daemon was
down is seen at its next fork or exec, as any setns(2) is.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from containerfs.core.container import Container
from containerfs.core.files import ControlFile
from containerfs.core.hierarchy import Hierarchy
from containerfs.core.subsystem import PerContainerItems
from containerfs.core.task import Task
from containerfs.errors import CgroupError
from containerfs.tracking import procscan

if TYPE_CHECKING:
    from containerfs.core.registry import Registry

log = logging.getLogger(__name__)

NAME = "ns"
NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")
BATCH = 50e-3
BATCH_SIZE = 512

NsKey = tuple[int, ...]


def read_key(tid: int) -> NsKey | None:
    """The inode of each namespace of `tid` (0 where the kernel lacks the type)."""
    key = []
    for kind in NAMESPACES:
        try:
            link = os.readlink(f"/proc/{tid}/ns/{kind}")
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{tid}"):
                return None
            key.append(0)
            continue
        except (ProcessLookupError, PermissionError):
            return None
        key.append(int(link[link.index("[") + 1 : -1]))
    return tuple(key)


def read_user_key(tid: int) -> NsKey | None:
    """read_key() for a user task; None for a kernel thread, which is never cloned."""
    info = procscan.read_task(tid)
    if info is None or info.flags & procscan.PF_KTHREAD:
        return None
    return read_key(tid)


@dataclass
class NsState:
    #: the namespaces this container stands for
    key: NsKey | None
    #: made by container_clone: removes itself when empty
    auto: bool = False


def _state(c: Container) -> NsState:
    return c.state[NAME]


def _read_namespaces(c: Container) -> str:
    """One line per namespace type: the type, then the distinct inodes of the members."""
    seen: dict[str, set[int]] = {kind: set() for kind in NAMESPACES}
    for task in c.tasks:
        key = read_key(task.tid)
        if key is None:
            continue
        for kind, inode in zip(NAMESPACES, key, strict=True):
            if inode:
                seen[kind].add(inode)
    return "".join(
        f"{kind} {' '.join(str(i) for i in sorted(inodes))}\n"
        for kind, inodes in seen.items()
        if inodes
    )


class Ns(PerContainerItems):
    name = NAME
    files = (ControlFile("namespaces", _read_namespaces),)

    def __init__(self, registry: Registry) -> None:
        super().__init__(registry)
        #: tids to look at: their namespaces may differ from their container's
        self._pending: set[int] = set()
        #: containers container_clone made, removed once empty
        self._clones: set[Container] = set()
        #: what saved() last reported, to journal only the clones that changed
        self._journaled: dict[str, list] = {}

    def create(self, container: Container) -> NsState:
        if container.parent is None:
            return NsState(read_key(os.getpid()))
        saved = self.take_restored(container)
        if saved is not None:
            key, auto = saved
            self._clones.add(container)
            return NsState(tuple(key), auto)
        return NsState(_state(container.parent).key)

    def destroy(self, container: Container) -> None:
        self._clones.discard(container)

    def holders(self) -> Iterable[Container]:
        """Only clones have an item: _journal() looks at them every batch, not at the tree."""
        return [c for c in self._clones if not c.removed]

    def item_of(self, c: Container) -> list | None:
        """A clone's namespaces and auto flag.

        Without them a restarted daemon gives a clone its parent's key, so
        the clone's next fork makes a clone inside it.
        """
        if c not in self._clones:
            return None
        return [list(_state(c).key or ()), _state(c).auto]

    def restore_saved(self, data: dict[str, Any]) -> None:
        super().restore_saved(data)
        self._journaled = dict(data)

    def _journal(self) -> None:
        """Journal the clones made, removed or renamed since the last look (one item each)."""
        now = self.saved()
        for item in sorted(now.keys() | self._journaled.keys()):
            if now.get(item) != self._journaled.get(item):
                self.registry.subsystem_changed(self, item)
        self._journaled = now

    def can_attach(self, dst: Container, tasks: Sequence[Task]) -> None:
        hid = dst.hierarchy.id
        if dst.tasks:
            raise CgroupError(errno.EPERM, f"ns: {dst.path} is not empty")
        for task in tasks:
            if task.cgroups[hid] is not dst.parent:
                raise CgroupError(
                    errno.EPERM,
                    f"ns: task {task.tid} may only move into an empty child of "
                    f"{task.cgroups[hid].path}",
                )

    def fork(self, task: Task, container: Container) -> None:
        if task.is_leader:
            self._pending.add(task.tid)

    def exec(self, task: Task, container: Container) -> None:
        self._pending.add(task.tid)

    def unbind(self, hierarchy: Hierarchy) -> None:
        super().unbind(hierarchy)
        self._pending.clear()
        self._clones.clear()
        self._journaled = {}  # the unbind journaled that nothing is left

    async def run(self) -> None:
        # the restore is over: what it did not recreate is gone
        self.restoring.clear()
        self._journal()
        while True:
            if self.hierarchy is None:  # unbound: nothing to watch, stay cheap
                self._pending.clear()
                await trio.sleep(1.0)
                continue
            await trio.sleep(BATCH)
            if self._pending:
                batch = [self._pending.pop() for _ in range(min(BATCH_SIZE, len(self._pending)))]
                keys = await trio.to_thread.run_sync(
                    lambda b=batch: [read_user_key(t) for t in b]
                )
                for tid, key in zip(batch, keys, strict=True):
                    if key is not None:
                        self._check(tid, key)
            self._remove_empty_clones()
            self._journal()

    def _check(self, tid: int, key: NsKey) -> None:
        h = self.hierarchy
        task = self.registry.tasks.get(tid)
        if h is None or task is None:
            return
        c = task.cgroups[h.id]
        if _state(c).key == key:
            return
        name = f"ns-{task.tgid}"
        n = 1
        while name in c.children or name in h.files(c):
            n += 1
            name = f"ns-{task.tgid}.{n}"
        try:
            child = self.registry.mkdir(c, name, uid=0, gid=0, mode=0o755)
            _state(child).key = key
            _state(child).auto = True
            threads = [self.registry.tasks[t] for t in sorted(self.registry.threads[task.tgid])
                       if self.registry.tasks[t].cgroups[h.id] is c]
            self.registry.move(child, threads)
        except CgroupError as exc:
            log.warning("ns: cannot clone a container for task %d: %s", tid, exc)
            return
        self._clones.add(child)
        log.info("ns: task %d entered new namespaces; moved to %s", tid, child.path)

    def _remove_empty_clones(self) -> None:
        for c in list(self._clones):
            if c.removed:
                self._clones.discard(c)
            elif not c.populated and not c.children:
                try:
                    self.registry.rmdir(c)
                except CgroupError as exc:
                    log.warning("ns: cannot remove %s: %s", c.path, exc)
                self._clones.discard(c)
