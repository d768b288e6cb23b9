"""A hierarchy: one tree of containers and the subsystems bound to it."""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from containerfs.core.container import Container
from containerfs.core.files import Caller, ControlFile, Placement
from containerfs.core.parse import parse_flag
from containerfs.errors import CgroupError

if TYPE_CHECKING:
    from containerfs.core.registry import Registry
    from containerfs.core.subsystem import Subsystem


class Hierarchy:
    """Hierarchy state: id, name, subsystems, root, release agent, flags, views.

    The file table of a container depends only on whether it is the root and
    on the bound subsystems, so it is computed once per hierarchy and kept
    until the subsystems change.
    """

    def __init__(
        self,
        registry: Registry,
        hid: int,
        name: str | None,
        subsystems: list[Subsystem],
        *,
        noprefix: bool = False,
        extended: bool = False,
        release_agent: str = "",
        enabled: bool = True,
    ) -> None:
        self.registry = registry
        self.id = hid
        self.name = name
        self.subsystems = subsystems
        self.noprefix = noprefix
        self.extended = extended
        self.release_agent = release_agent
        self.root: Container
        #: mount points showing this hierarchy, as the daemon's mount table has them
        #: mount point -> (the path in the hierarchy it shows, read-only), from
        #: the mount table: what a restart needs to bind each view again as it was
        self.views: dict[str, tuple[str, bool]] = {}
        #: the seeds' <subsys>_enabled: a disabled subsystem creates no state for
        #: new children, which share their parent's
        self.enabled: dict[str, bool] = {sub.name: enabled for sub in subsystems}
        self._tables: dict[bool, dict[str, ControlFile]] = {}

    @property
    def subsystem_names(self) -> list[str]:
        return [s.name for s in self.subsystems]

    @property
    def label(self) -> str:
        """The controller list of /proc/PID/cgroup: subsystems, then name=."""
        parts = self.subsystem_names
        if self.name:
            parts = [*parts, f"name={self.name}"]
        return ",".join(parts)

    def has_children(self) -> bool:
        return bool(self.root.children)

    def find(self, path: str) -> Container | None:
        """The container at `path` ("/a/b"), if there is one."""
        c = self.root
        for part in [p for p in path.split("/") if p]:
            c = c.children.get(part)
            if c is None:
                return None
        return c

    def find_key(self, key: str) -> Container | None:
        """The container a Container.key names, if it is in this hierarchy."""
        hid, _, path = key.partition(":")
        return self.find(path) if hid == str(self.id) else None

    def files(self, container: Container) -> dict[str, ControlFile]:
        """Name -> control file for `container`, prefixes applied."""
        table = self._tables.get(container.is_root)
        if table is None:
            table = self._build_table(container.is_root)
            self._tables[container.is_root] = table
        return table

    def invalidate_files(self) -> None:
        """Forget the cached tables after the bound subsystems changed."""
        self._tables.clear()

    def _build_table(self, is_root: bool) -> dict[str, ControlFile]:
        from containerfs.core.corefiles import CORE_FILES
        from containerfs.core.extended import EXTENDED_FILES

        table: dict[str, ControlFile] = {}
        for cf in CORE_FILES:
            if cf.present_in(is_root, self.extended):
                table[cf.name] = cf
        for cf in EXTENDED_FILES:
            if cf.present_in(is_root, self.extended):
                table[cf.name] = cf
        for subsys in self.subsystems:
            prefix = "" if self.noprefix else f"{subsys.name}."
            shares_root = not is_root and not self.enabled[subsys.name]
            for cf in subsys.files:
                if shares_root and cf.placement is Placement.NOT_ROOT:
                    continue  # children share the root's state, which has no such file
                if cf.present_in(is_root, self.extended):
                    table[prefix + cf.name] = cf
            if is_root and self.extended:
                table[f"{subsys.name}_enabled"] = _enabled_file(subsys.name)
        return table

    def __repr__(self) -> str:
        return f"Hierarchy({self.id}, {self.label or '-'})"


def _enabled_file(name: str) -> ControlFile:
    """`<subsys>_enabled` in the root (seed 000), writable only without children."""

    def read(c: Container) -> str:
        return "1\n" if c.hierarchy.enabled[name] else "0\n"

    def write(c: Container, data: bytes, caller: Caller) -> None:
        value = parse_flag(data)
        if c.children:
            raise CgroupError(errno.EBUSY, f"{name}_enabled can change only without children")
        c.hierarchy.enabled[name] = value
        c.hierarchy.invalidate_files()

    return ControlFile(f"{name}_enabled", read, write, placement=Placement.ROOT_ONLY, extended=True)
