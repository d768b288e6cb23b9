"""A container (a cgroup): a node of one hierarchy with its member tasks."""

from __future__ import annotations

import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from containerfs.core.hierarchy import Hierarchy
    from containerfs.core.task import Task


@dataclass(slots=True)
class Attrs:
    """Mode, owner and times of one directory or control file.

    cgroup v1 delegates a subtree by chown and chmod, so these are state,
    kept per node, not derived.
    """

    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


class Container:
    """One cgroup: its place in the tree, its tasks and its subsystem states."""

    __slots__ = (
        "attrs",
        "children",
        "clone_children",
        "creator",
        "file_attrs",
        "hierarchy",
        "name",
        "notify_on_release",
        "nr_subtree_tasks",
        "parent",
        "removed",
        "serial",
        "state",
        "tasks",
    )

    def __init__(
        self,
        hierarchy: Hierarchy,
        parent: Container | None,
        name: str,
        serial: int,
        *,
        uid: int = 0,
        gid: int = 0,
        mode: int = 0o755,
    ) -> None:
        now = time.time_ns()
        self.hierarchy = hierarchy
        self.parent = parent
        self.name = name
        self.serial = serial
        self.children: dict[str, Container] = {}
        self.tasks: set[Task] = set()
        #: live tasks in this container and all its descendants ("populated")
        self.nr_subtree_tasks = 0
        #: subsystem name -> that subsystem's state for this container
        self.state: dict[str, Any] = {}
        self.notify_on_release = parent.notify_on_release if parent else False
        self.clone_children = parent.clone_children if parent else False
        self.removed = False
        self.attrs = Attrs(stat.S_IFDIR | (mode & 0o7777), uid, gid, now, now, now)
        #: control files belong to the creator of the directory (spec 3.1)
        self.creator = (uid, gid)
        #: per-file attributes, created when a file is first chmod-ed or chown-ed
        self.file_attrs: dict[str, Attrs] = {}

    @property
    def is_root(self) -> bool:
        return self.parent is None

    @property
    def populated(self) -> bool:
        return self.nr_subtree_tasks > 0

    @property
    def path(self) -> str:
        """Path from the hierarchy root, "/" for the root, as /proc/PID/cgroup shows it."""
        parts = []
        node: Container | None = self
        while node is not None and node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return "/" + "/".join(reversed(parts))

    @property
    def key(self) -> str:
        """"hierarchy id:path": how the journal names a container's subsystem items.

        A restart recreates containers at their paths, and the journal renames
        these keys along with their containers, so a subsystem that keys its
        saved items by container finds them again.
        """
        return f"{self.hierarchy.id}:{self.path}"

    def ancestors(self) -> Iterator[Container]:
        """This container, then its parent, up to the root."""
        node: Container | None = self
        while node is not None:
            yield node
            node = node.parent

    def walk(self) -> Iterator[Container]:
        """This container and all its descendants, parents before children."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def file_attr(self, name: str, mode: int) -> Attrs:
        """The attributes of control file `name`, default from its table mode."""
        attrs = self.file_attrs.get(name)
        if attrs is None:
            uid, gid = self.creator
            t = self.attrs.ctime_ns
            attrs = Attrs(stat.S_IFREG | mode, uid, gid, t, t, t)
        return attrs

    def __repr__(self) -> str:
        return f"Container({self.hierarchy.id}:{self.path})"
