"""virt: the roadmap's virtualization subsystem (seeds 002 and 003).

A container with `virt.lock` set to 1 confines every process in it or below
it, as a cgroup namespace rooted there would ("a bit like doing a bind mount
of a subtree of the main hierarchy, but automatically enforced"). For a
process under a locked container (the nearest one, if locks nest):

* a view of the hierarchy it mounts is a bind of that container's directory,
  so it sees the container as `/` and cannot reach above it through the view;
* it may not change `virt.lock` of that container or of any container not
  strictly below it (EPERM), so it cannot unlock itself;
* it may only move a task that is, and into a container that is, at or below
  that container (ENOENT otherwise, the kernel's rule for cgroup-namespace
  migrations), so it cannot pull a process in from outside;
* it may not remount the hierarchy, nor give `release_agent=` to a mount of it
  (EPERM; see daemon.op_remount and op_mount);
* `containerfs membership` prints paths relative to that container, as
  /proc/PID/cgroup does inside a cgroup namespace.

The lock of the hierarchy's root confines nothing: the root is everything.
A root process inside can still reach the daemon's runtime directory on the
host directly (it is every view's source); nothing here can prevent that.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from containerfs.core.container import Container
from containerfs.core.files import Caller, ControlFile
from containerfs.core.hierarchy import Hierarchy
from containerfs.core.parse import parse_flag
from containerfs.core.subsystem import Subsystem
from containerfs.core.task import Task
from containerfs.errors import CgroupError

if TYPE_CHECKING:
    from containerfs.core.registry import Registry

NAME = "virt"


@dataclass
class VirtState:
    locked: bool = False


def _subsys(h: Hierarchy) -> Virt:
    subsys = h.registry.subsystems[NAME]
    assert isinstance(subsys, Virt)
    return subsys


def confinement(h: Hierarchy, tid: int | None) -> Container | None:
    """The locked container task `tid` is confined to in `h`; None if it is free.

    None for `tid` is the daemon itself (a restore writes settings back). A
    task the daemon cannot find (it exited: its open file or connected socket
    is used by another process now) is refused outright while anything in the
    hierarchy is locked, since where it was cannot be checked any more.
    """
    if tid is None or NAME not in h.subsystem_names or not _subsys(h).locked:
        return None  # nothing locked: nothing to look up, on every write to tasks
    task = h.registry.known_task(tid)
    if task is None:
        raise CgroupError(errno.EPERM, f"virt: task {tid} is gone; its place is unknown")
    for c in task.cgroups[h.id].ancestors():
        if c.parent is not None and c.state[NAME].locked:
            return c
    return None


def caller_tid(caller: Caller) -> int | None:
    """The opener's thread; tid 0 is the daemon's own write (state.ROOT at a restore)."""
    return caller.tid or None


def view_root(h: Hierarchy, tid: int) -> Container:
    """The container a view mounted by task `tid` shows as its root."""
    return confinement(h, tid) or h.root


def within(c: Container, top: Container) -> bool:
    """Whether `c` is `top` or below it."""
    return any(node is top for node in c.ancestors())


def relative_path(c: Container, root: Container) -> str:
    """`c`'s path seen from `root`, as the kernel's kernfs_path_from_node writes it.

    A container outside `root` gets one "/.." per level from `root` up to the
    common ancestor, then the names down to it (as /proc/PID/cgroup shows a
    task outside the reader's cgroup namespace).
    """
    above = list(root.ancestors())
    down: list[str] = []
    node = c
    while not any(node is a for a in above):
        down.append(node.name)
        assert node.parent is not None  # the hierarchy root is in `above`
        node = node.parent
    ups = next(i for i, a in enumerate(above) if a is node)
    parts = [".."] * ups + list(reversed(down))
    return "/" + "/".join(parts)


def _check_move(dst: Container, tasks: Sequence[Task], caller: Caller) -> None:
    """A confined writer moves only tasks inside its container, and only into it (ENOENT)."""
    h = dst.hierarchy
    top = confinement(h, caller_tid(caller))
    if top is None:
        return
    if not within(dst, top):
        raise CgroupError(errno.ENOENT, f"virt: {dst.path} is outside {top.path}")
    for task in tasks:
        if not within(task.cgroups[h.id], top):
            raise CgroupError(errno.ENOENT, f"virt: task {task.tid} is outside {top.path}")


def _read_lock(c: Container) -> str:
    return "1\n" if c.state[NAME].locked else "0\n"


def _write_lock(c: Container, data: bytes, caller: Caller) -> None:
    """kstrtoull rules; a confined writer may change locks strictly below its container only."""
    locked = parse_flag(data)
    top = confinement(c.hierarchy, caller_tid(caller))
    if top is not None and (c is top or not within(c, top)):
        raise CgroupError(
            errno.EPERM, f"virt: a task confined to {top.path} cannot change the lock of {c.path}"
        )
    c.state[NAME].locked = locked
    subsys = _subsys(c.hierarchy)
    if locked and not c.is_root:
        subsys.locked.add(c)
    else:
        subsys.locked.discard(c)


class Virt(Subsystem):
    name = NAME
    files = (ControlFile("lock", _read_lock, _write_lock),)

    def __init__(self, registry: Registry) -> None:
        super().__init__(registry)
        #: the locked containers but the root: while there is none, nothing is confined
        self.locked: set[Container] = set()

    def may_move(self, dst: Container, tasks: Sequence[Task], caller: Caller) -> None:
        """A writer inside a locked container moves nothing across its edge."""
        _check_move(dst, tasks, caller)

    def create(self, container: Container) -> VirtState:
        return VirtState()

    def destroy(self, container: Container) -> None:
        self.locked.discard(container)

    def unbind(self, hierarchy: Hierarchy) -> None:
        self.locked.clear()
        super().unbind(hierarchy)
