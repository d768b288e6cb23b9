"""The subsystem interface: the seeds' plug-in API, refined by later practice.

A subsystem keeps one state object per container of the hierarchy it is bound
to, declares its control files as data, may veto a move (can_attach), and
hears about attaches, forks and exits. Moves are all-or-nothing: every bound
subsystem's can_attach runs first; if one refuses, the ones that agreed get
cancel_attach and nothing moves (gVisor's PrepareMigrate/Abort/Commit).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from containerfs.core.files import Caller, ControlFile

if TYPE_CHECKING:
    from containerfs.core.container import Container
    from containerfs.core.hierarchy import Hierarchy
    from containerfs.core.registry import Registry
    from containerfs.core.task import Task


class Subsystem:
    """Base class: every hook does nothing, so a subsystem overrides only what it needs."""

    name: ClassVar[str]
    files: ClassVar[tuple[ControlFile, ...]] = ()

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.hierarchy: Hierarchy | None = None

    def create(self, container: Container) -> Any:
        """Return the state of a new container; its parent's state is in container.parent."""
        return None

    def destroy(self, container: Container) -> None:
        """The container is going away; release what its state holds."""

    def may_move(self, dst: Container, tasks: Sequence[Task], caller: Caller) -> None:
        """Raise CgroupError to refuse a writer's move on the writer's account.

        Called for moves asked through tasks and cgroup.procs only, with the
        opener (virt confines a writer inside a locked container); can_attach
        judges every move, whoever asked.
        """

    def can_attach(self, dst: Container, tasks: Sequence[Task]) -> None:
        """Raise CgroupError to refuse moving `tasks` into `dst`."""

    def cancel_attach(self, dst: Container, tasks: Sequence[Task]) -> None:
        """A later subsystem refused a move this one had agreed to."""

    def attach(self, dst: Container, tasks: Sequence[Task], sources: Sequence[Container]) -> None:
        """Commit a move; `sources[i]` is where `tasks[i]` was. Must not fail."""

    def fork(self, task: Task, container: Container) -> None:
        """A new task appeared in `container` (fork, new thread, or first seen by a scan)."""

    def restore(self, task: Task, container: Container) -> None:
        """After a restart, a task the daemon knew is back in `container`.

        It is not new: it must not count as a fork (numtasks kills over-limit
        forks), and what it ran before this moment is not this daemon's to charge.
        """

    def exec(self, task: Task, container: Container) -> None:
        """Process `task` (its leader) completed an execve()."""

    def exit(self, task: Task, container: Container) -> None:
        """A task of `container` exited; it is still a member during this call."""

    def bind(self, hierarchy: Hierarchy) -> None:
        """The subsystem was bound to `hierarchy` (its root state already exists)."""
        self.hierarchy = hierarchy

    def unbind(self, hierarchy: Hierarchy) -> None:
        """The subsystem was released from `hierarchy`."""
        self.hierarchy = None

    def stats(self) -> dict[str, Any] | None:
        """Counters for `containerfs stats` (flat, JSON-able); None: nothing to show."""
        return None

    def saved(self) -> dict[str, Any] | None:
        """Subsystem-wide state to journal, beyond container settings; None: none.

        Items keyed by strings, with JSON-able values. When one item changes,
        call registry.subsystem_changed(self, key): the journal then keeps that
        item alone, so persisting costs what the change costs.
        """
        return None

    def saved_item(self, key: str) -> Any:
        """One item of saved() (None: it is gone); override where saved() is big."""
        data = self.saved()
        return data.get(key) if data is not None else None

    def restore_saved(self, data: dict[str, Any]) -> None:
        """Take back what saved() returned, before container settings are written back."""

    async def run(self) -> None:
        """A background service (an audit loop, say), run by the daemon until it stops.

        It runs on the trio thread that owns the registry; blocking /proc or
        syscall work belongs in trio.to_thread.run_sync, in bounded batches.
        """


class PerContainerItems(Subsystem):
    """A subsystem whose journaled state is one item per container, keyed by Container.key.

    A subclass says what a container's item is (`item_of`; None: nothing to
    keep), marks containers whose item changed in `changed` and journals them
    with `journal_changed` at its own pace, and takes a restored item back in
    create() with `take_restored`. The root and children sharing their
    parent's state (the subsystem disabled there) keep nothing of their own;
    the journal renames keys along with their containers.
    """

    def __init__(self, registry: Registry) -> None:
        super().__init__(registry)
        #: items journaled before a restart, until the restore makes their container again
        self.restoring: dict[str, Any] = {}
        #: containers whose item changed since it was last journaled
        self.changed: set[Container] = set()

    def item_of(self, container: Container) -> Any:
        """What to keep of a container of this subsystem's own; None: nothing."""
        return None

    def _item(self, c: Container) -> Any:
        if c.parent is None or c.state[self.name] is c.parent.state[self.name]:
            return None
        return self.item_of(c)

    def holders(self) -> Iterable[Container]:
        """The containers that may have an item: all of them, unless a subclass knows better."""
        return self.hierarchy.root.walk() if self.hierarchy is not None else ()

    def saved(self) -> dict[str, Any]:
        return {c.key: item for c in self.holders() if (item := self._item(c)) is not None}

    def saved_item(self, key: str) -> Any:
        c = self.hierarchy.find_key(key) if self.hierarchy is not None else None
        return self._item(c) if c is not None else None

    def restore_saved(self, data: dict[str, Any]) -> None:
        self.restoring = dict(data)

    def take_restored(self, container: Container) -> Any:
        """The item journaled for `container` before the restart, if any (once)."""
        return self.restoring.pop(container.key, None)

    def journal_changed(self) -> None:
        """Journal the item of every container marked changed, and only those."""
        changed, self.changed = self.changed, set()
        for c in changed:
            if not c.removed and c.hierarchy is self.hierarchy:
                self.registry.subsystem_changed(self, c.key)

    def journal_now(self, container: Container) -> None:
        """Journal `container`'s item at once (a reset or a removal: a crash must not
        bring the old one back)."""
        self.changed.discard(container)
        self.registry.subsystem_changed(self, container.key)

    def unbind(self, hierarchy: Hierarchy) -> None:
        super().unbind(hierarchy)
        self.changed.clear()
        self.registry.subsystem_changed(self)  # nothing left to keep
