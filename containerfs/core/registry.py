"""The registry: every hierarchy, container, task and subsystem of one daemon.

One trio thread owns it, so it has no locks: every method runs to completion
before another request is looked at. It knows nothing of FUSE or netlink; the
tracker calls `fork`, `exit`, `exec` and `resync`, the filesystem calls
`mkdir`, `rmdir`, `rename` and `attach`, and listeners (the FUSE inode map,
the journal, the release agent runner, the event stream) hear what changed.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

from containerfs.core.container import Container
from containerfs.core.files import Caller
from containerfs.core.hierarchy import Hierarchy
from containerfs.core.options import MountOptions
from containerfs.core.task import Task
from containerfs.errors import CgroupError

if TYPE_CHECKING:
    from containerfs.core.subsystem import Subsystem

log = logging.getLogger(__name__)

#: hierarchy ids are allocated cyclically in [1, MAX_HIERARCHY_ID] like the kernel's idr
MAX_HIERARCHY_ID = 1 << 20


class TaskFacts(Protocol):
    """What the registry needs to know about a thread it has not seen yet."""

    tid: int
    tgid: int
    ppid: int
    start_time: int
    flags: int


class ProcSource(Protocol):
    """Reads of single /proc entries, done on the request path (bounded, small)."""

    def read_task(self, tid: int) -> TaskFacts | None: ...

    def read_ids(self, tid: int) -> tuple[int, int, int] | None: ...

    def exists(self, tid: int) -> bool: ...

    def is_unmovable(self, facts: TaskFacts) -> bool: ...

    def has_sys_admin(self, tid: int) -> bool: ...


class Listener:
    """Hears about changes. Every method is a no-op here; override what you need."""

    def hierarchy_created(self, h: Hierarchy) -> None: ...

    def hierarchy_destroyed(self, h: Hierarchy) -> None: ...

    def hierarchy_changed(self, h: Hierarchy) -> None: ...

    def container_created(self, c: Container) -> None: ...

    def container_removed(self, c: Container) -> None: ...

    def container_renamed(self, c: Container, old_path: str) -> None: ...

    def container_changed(self, c: Container) -> None: ...

    def populated_changed(self, c: Container) -> None: ...

    def release(self, c: Container) -> None: ...

    def tasks_moved(self, dst: Container, tasks: Sequence[Task]) -> None: ...

    def subsystem_changed(self, subsys: Subsystem, key: str | None) -> None: ...

    def task_added(self, task: Task) -> None: ...

    def task_removed(self, task: Task) -> None: ...


#: how many untracked generations above a task adopt() learns before it
MAX_ADOPT_DEPTH = 64


def _home(subsys: Subsystem, c: Container) -> Container:
    """The container `subsys` sees for `c`.

    A disabled subsystem (seed 000's <subsys>_enabled) gives new children no
    state of their own; they share their parent's, which is the root's, as
    the flag cannot change once the root has children. To that subsystem
    their tasks are in the root, and its hooks are told so.
    """
    return c if c.hierarchy.enabled.get(subsys.name, True) else c.hierarchy.root


class Registry:
    """All grouping state, and the rules that change it."""

    def __init__(
        self,
        subsystem_classes: Iterable[type[Subsystem]] = (),
        proc: ProcSource | None = None,
    ) -> None:
        if proc is None:
            from containerfs.tracking.procsource import LiveProc

            proc = LiveProc()
        self.proc = proc
        #: available subsystems, in the order listings print them
        self.subsystems: dict[str, Subsystem] = {cls.name: cls(self) for cls in subsystem_classes}
        self.hierarchies: dict[int, Hierarchy] = {}
        #: serial -> container, for every live container of every hierarchy
        self.containers: dict[int, Container] = {}
        self.tasks: dict[int, Task] = {}
        #: tgid -> tids of its live threads
        self.threads: dict[int, set[int]] = {}
        self.listeners: list[Listener] = []
        #: called before a read that must reflect every event received so far
        self.refresh_hook: Callable[[Container | None], None] | None = None
        #: True while the tracker applies every fork and exit the kernel reports:
        #: a known task is then moved without reading its /proc files again
        self.follows_events = False
        #: (tid, start time) -> containers, from a restored state: where a task
        #: goes when the first scan after a restart finds it
        self.placements: dict[tuple[int, int | None], dict[int, Container]] = {}
        self._next_serial = 1
        self._last_hid = 0

    # ------------------------------------------------------------------ events

    def _emit(self, method: str, *args: object) -> None:
        # a listener's bug must not leave a change half-made: log it and go on
        for listener in self.listeners:
            try:
                getattr(listener, method)(*args)
            except Exception:
                log.exception("listener %s failed in %s", type(listener).__name__, method)

    def refresh(self, container: Container | None = None) -> None:
        """Apply pending tracker events, so a read reflects every fork and exit seen."""
        if self.refresh_hook is not None:
            self.refresh_hook(container)

    # -------------------------------------------------------------- hierarchies

    def find_hierarchy(self, opts: MountOptions) -> Hierarchy | None:
        """The existing hierarchy a mount with `opts` shows, by spec 2.3's rules."""
        wanted = opts.wanted(self.subsystems)
        newest_first = sorted(self.hierarchies.values(), key=lambda h: h.id, reverse=True)
        if opts.name is not None:
            for h in newest_first:
                if h.name == opts.name:
                    if wanted is not None and frozenset(h.subsystem_names) != wanted:
                        raise CgroupError(
                            errno.EBUSY,
                            f"hierarchy name={opts.name} exists with subsystems "
                            f"{h.label!r}, not the ones asked for",
                        )
                    return h
            return None
        for h in newest_first:
            if frozenset(h.subsystem_names) == wanted:
                return h
        return None

    def mount(self, opts: MountOptions) -> tuple[Hierarchy, bool]:
        """Find or create the hierarchy for `opts`; True when it was created."""
        h = self.find_hierarchy(opts)
        if h is not None:
            return h, False
        wanted = opts.wanted(self.subsystems)
        if wanted is None:
            raise CgroupError(
                errno.EINVAL,
                f"no hierarchy name={opts.name} exists, and no subsystem list or 'none' "
                "was given to create one",
            )
        return self.create_hierarchy(opts, wanted), True

    def create_hierarchy(
        self, opts: MountOptions, wanted: frozenset[str], hid: int | None = None
    ) -> Hierarchy:
        for name in wanted:
            owner = self.subsystems[name].hierarchy
            if owner is not None:
                raise CgroupError(
                    errno.EBUSY,
                    f"subsystem {name} is already bound to hierarchy {owner.id} ({owner.label})",
                )
        subsystems = [s for n, s in self.subsystems.items() if n in wanted]
        h = Hierarchy(
            self,
            hid if hid is not None else self._alloc_hierarchy_id(),
            opts.name,
            subsystems,
            noprefix=opts.noprefix,
            extended=opts.extended,
            release_agent=opts.release_agent or "",
            enabled=not opts.default_disabled,
        )
        root = self._new_container(h, None, "", uid=0, gid=0, mode=0o555)
        root.clone_children = opts.clone_children
        h.root = root
        root.tasks = set(self.tasks.values())
        root.nr_subtree_tasks = len(root.tasks)
        for task in root.tasks:
            task.cgroups[h.id] = root
        self.hierarchies[h.id] = h
        for subsys in subsystems:
            root.state[subsys.name] = subsys.create(root)
            subsys.bind(h)
        self._emit("hierarchy_created", h)
        return h

    def destroy_hierarchy(self, h: Hierarchy) -> None:
        """Tear down a hierarchy that has no child containers (spec 2.5)."""
        if h.has_children():
            raise CgroupError(errno.EBUSY, f"hierarchy {h.id} still has child containers")
        for subsys in reversed(h.subsystems):
            subsys.destroy(h.root)
            subsys.unbind(h)
        for task in h.root.tasks:
            task.cgroups.pop(h.id, None)
        h.root.tasks.clear()
        h.root.removed = True
        del self.containers[h.root.serial]
        del self.hierarchies[h.id]
        self._emit("hierarchy_destroyed", h)

    def rebind(self, h: Hierarchy, wanted: frozenset[str]) -> None:
        """Add and remove subsystems on a live hierarchy (the roadmap seed, 002).

        An added subsystem gets state in every container, parents first, and
        every container's tasks are attached to it; if it refuses any of them,
        everything it was given is taken back and nothing changes. A removed
        subsystem's state is dropped; containers and tasks stay where they are.
        """
        current = set(h.subsystem_names)
        unknown = wanted - set(self.subsystems)
        if unknown:
            raise CgroupError(errno.EINVAL, f"unknown subsystem {sorted(unknown)[0]!r}")
        add = [s for n, s in self.subsystems.items() if n in wanted and n not in current]
        remove = [s for s in h.subsystems if s.name not in wanted]
        for subsys in add:
            owner = subsys.hierarchy
            if owner is not None:
                raise CgroupError(
                    errno.EBUSY,
                    f"subsystem {subsys.name} is already bound to hierarchy {owner.id} "
                    f"({owner.label})",
                )
        containers = list(h.root.walk())
        populated = [c for c in containers if c.tasks]
        done: list[tuple[Subsystem, Container]] = []
        agreed: list[tuple[Subsystem, Container]] = []
        try:
            for subsys in add:
                for c in containers:
                    c.state[subsys.name] = subsys.create(c)
                    done.append((subsys, c))
                subsys.bind(h)
                for c in populated:
                    subsys.can_attach(c, sorted(c.tasks, key=lambda t: t.tid))
                    agreed.append((subsys, c))
        except CgroupError as exc:
            for subsys, c in reversed(agreed):
                subsys.cancel_attach(c, sorted(c.tasks, key=lambda t: t.tid))
            for subsys, c in reversed(done):
                subsys.destroy(c)
                del c.state[subsys.name]
            for subsys in add:
                if subsys.hierarchy is h:
                    subsys.unbind(h)
            raise CgroupError(
                exc.errno, f"cannot add {subsys.name} to hierarchy {h.id}: {exc.message}"
            ) from None
        order = list(self.subsystems)
        h.subsystems = sorted(
            [s for s in h.subsystems if s not in remove] + add, key=lambda s: order.index(s.name)
        )
        for subsys in add:
            h.enabled[subsys.name] = True
            for c in populated:
                tasks = sorted(c.tasks, key=lambda t: t.tid)
                subsys.attach(c, tasks, [c] * len(tasks))
        for subsys in remove:
            for c in reversed(containers):
                subsys.destroy(c)
                c.state.pop(subsys.name, None)
            subsys.unbind(h)
            h.enabled.pop(subsys.name, None)
        h.invalidate_files()
        self._emit("hierarchy_changed", h)

    def _alloc_hierarchy_id(self) -> int:
        hid = self._last_hid
        for _ in range(MAX_HIERARCHY_ID):
            hid = hid % MAX_HIERARCHY_ID + 1
            if hid not in self.hierarchies:
                self._last_hid = hid
                return hid
        raise CgroupError(errno.ENOSPC, "no hierarchy id left")

    # --------------------------------------------------------------- containers

    def _new_container(
        self, h: Hierarchy, parent: Container | None, name: str, *, uid: int, gid: int, mode: int
    ) -> Container:
        c = Container(h, parent, name, self._next_serial, uid=uid, gid=gid, mode=mode)
        self._next_serial += 1
        self.containers[c.serial] = c
        return c

    def mkdir(self, parent: Container, name: str, *, uid: int, gid: int, mode: int) -> Container:
        """Create child `name` of `parent` (spec 5.1)."""
        if parent.removed:
            raise CgroupError(errno.ENODEV, f"{parent.path} has been removed")
        if "\n" in name:
            raise CgroupError(errno.EINVAL, "a container name cannot contain a newline")
        if name in parent.children or name in parent.hierarchy.files(parent):
            raise CgroupError(errno.EEXIST, f"{name!r} exists in {parent.path}")
        h = parent.hierarchy
        c = self._new_container(h, parent, name, uid=uid, gid=gid, mode=mode)
        created: list[Subsystem] = []
        try:
            for subsys in h.subsystems:
                if h.enabled[subsys.name]:
                    c.state[subsys.name] = subsys.create(c)
                    created.append(subsys)
                else:  # disabled: share the parent's state (seed 000)
                    c.state[subsys.name] = parent.state[subsys.name]
        except BaseException:
            for subsys in reversed(created):
                subsys.destroy(c)
            del self.containers[c.serial]
            raise
        parent.children[name] = c
        self._emit("container_created", c)
        return c

    def rmdir(self, c: Container) -> None:
        """Remove an empty, childless container (spec 5.2)."""
        if c.removed:
            raise CgroupError(errno.ENOENT, f"{c.path} has been removed")
        if c.is_root:
            raise CgroupError(errno.EBUSY, "the root of a hierarchy cannot be removed")
        if c.populated:
            raise CgroupError(errno.EBUSY, f"{c.path} or a descendant still has tasks")
        if c.children:
            raise CgroupError(errno.EBUSY, f"{c.path} has child containers")
        for subsys in reversed(c.hierarchy.subsystems):
            if c.hierarchy.enabled[subsys.name]:
                subsys.destroy(c)
        parent = c.parent
        assert parent is not None
        del parent.children[c.name]
        c.removed = True
        del self.containers[c.serial]
        self._emit("container_removed", c)
        self._check_release(parent)

    def rename(self, c: Container, new_parent: Container, new_name: str) -> None:
        """Rename in place only (spec 5.3)."""
        if "\n" in new_name:
            raise CgroupError(errno.EINVAL, "a container name cannot contain a newline")
        if c.removed or new_parent.removed:
            raise CgroupError(errno.ENODEV, "the container has been removed")
        if c.is_root:
            raise CgroupError(errno.EBUSY, "the root of a hierarchy cannot be renamed")
        if new_parent is not c.parent:
            raise CgroupError(errno.EIO, "containers can only be renamed within their parent")
        if new_name == c.name:
            return
        if new_name in new_parent.children:
            raise CgroupError(errno.EEXIST, f"{new_name!r} exists in {new_parent.path}")
        if new_name in new_parent.hierarchy.files(new_parent):
            raise CgroupError(errno.ENOTDIR, f"{new_name!r} is a control file")
        old_path = c.path
        del new_parent.children[c.name]
        c.name = new_name
        new_parent.children[new_name] = c
        self._emit("container_renamed", c, old_path)

    def changed(self, c: Container) -> None:
        """A setting of `c` changed (a control file write); listeners persist it."""
        self._emit("container_changed", c)

    def hierarchy_changed(self, h: Hierarchy) -> None:
        """Something about `h` itself changed (its views, its subsystems)."""
        self._emit("hierarchy_changed", h)

    def subsystem_changed(self, subsys: Subsystem, key: str | None = None) -> None:
        """Item `key` of `subsys.saved()` changed (None: any of it); listeners persist it."""
        self._emit("subsystem_changed", subsys, key)

    # -------------------------------------------------------- populated counts

    def _join(self, task: Task, c: Container) -> None:
        c.tasks.add(task)
        task.cgroups[c.hierarchy.id] = c
        for node in c.ancestors():
            node.nr_subtree_tasks += 1
            if node.nr_subtree_tasks == 1:
                self._emit("populated_changed", node)

    def _leave(self, task: Task, c: Container) -> None:
        c.tasks.discard(task)
        emptied = []
        for node in c.ancestors():
            node.nr_subtree_tasks -= 1
            if node.nr_subtree_tasks == 0:
                emptied.append(node)
        for node in emptied:
            self._emit("populated_changed", node)
            self._check_release(node)

    def recheck_emptied(self, containers: Iterable[Container]) -> None:
        """After a restart: the containers that held tasks when the daemon died.

        Those found empty now lost their tasks while nothing watched; their
        depopulation (spec 6.1, moment 1) is seen now, for them and for every
        ancestor left empty, as it would have been at the time.
        """
        seen: set[Container] = set()
        for c in containers:
            for node in c.ancestors():
                if node in seen:
                    break
                seen.add(node)
                if not node.removed and not node.populated:
                    self._emit("populated_changed", node)
                    self._check_release(node)

    def _check_release(self, c: Container) -> None:
        """Evaluate the release condition R(C) of spec 6.1 at one of its moments."""
        if c.notify_on_release and not c.removed and not c.children and not c.populated:
            self._emit("release", c)

    # -------------------------------------------------------------------- tasks

    def _inheritance(self, tid: int, tgid: int, parent_tid: int, parent_tgid: int) -> Task | None:
        """The task whose containers a new task starts in.

        A new thread joins its process's containers (the leader's, or any
        thread's once the leader is gone): the fork event of a thread names
        the process's parent, not the creating thread. A new process starts
        where the forking thread is.
        """
        if tid != tgid:
            leader = self.tasks.get(tgid)
            if leader is not None:
                return leader
            for other in self.threads.get(tgid, ()):
                if other != tid:
                    return self.tasks[other]
            return None
        for candidate in (parent_tid, parent_tgid):
            task = self.tasks.get(candidate)
            if task is not None and task.tgid == parent_tgid:
                return task
        for other in self.threads.get(parent_tgid, ()):
            return self.tasks[other]
        return None

    def add_task(
        self,
        tid: int,
        tgid: int,
        *,
        like: Task | None = None,
        start_time: int | None = None,
        placement: dict[int, Container] | None = None,
        restored: bool = False,
    ) -> Task:
        """Start tracking a task in `placement`, else where `like` is, else the roots.

        A `restored` task is one the daemon knew before a restart, back where
        it was: its subsystems hear `restore`, not `fork`, since it is no new task.
        """
        old = self.tasks.get(tid)
        if old is not None:
            self.remove_task(tid)
        task = Task(tid, tgid, start_time)
        self.tasks[tid] = task
        self.threads.setdefault(tgid, set()).add(tid)
        for h in self.hierarchies.values():
            c = None
            if placement is not None:
                c = placement.get(h.id)
            elif like is not None:
                c = like.cgroups.get(h.id)
            if c is None or c.removed:
                c = h.root
            self._join(task, c)
            for subsys in h.subsystems:
                if restored:
                    subsys.restore(task, _home(subsys, c))
                else:
                    subsys.fork(task, _home(subsys, c))
        self._emit("task_added", task)
        return task

    def fork(self, parent_tid: int, parent_tgid: int, child_tid: int, child_tgid: int) -> Task:
        """A fork or clone event: the child starts in its parent's containers."""
        like = self._inheritance(child_tid, child_tgid, parent_tid, parent_tgid)
        return self.add_task(child_tid, child_tgid, like=like)

    def remove_task(self, tid: int) -> Task | None:
        """An exit: the task leaves every container (zombies are not members)."""
        task = self.tasks.pop(tid, None)
        if task is None:
            return None
        tids = self.threads.get(task.tgid)
        if tids is not None:
            tids.discard(tid)
            if not tids:
                del self.threads[task.tgid]
        for hid, c in list(task.cgroups.items()):
            for subsys in self.hierarchies[hid].subsystems:
                subsys.exit(task, _home(subsys, c))
            self._leave(task, c)
        task.cgroups.clear()
        self._emit("task_removed", task)
        return task

    def exec(self, tid: int, tgid: int) -> None:
        """An exec event: de_thread() may have given the exec-ing thread the leader's tid.

        The kernel sends no exit event for the exec-ing thread's old tid, and
        an exit event for the old leader; what is left of the group in the
        table besides `tgid` is that old tid, which now is `tgid`. Then every
        subsystem hears of the exec (the ns subsystem looks for new namespaces).
        """
        others = [t for t in self.threads.get(tgid, ()) if t != tgid]
        if tgid in self.tasks:
            for other in others:
                self.remove_task(other)
        elif others:
            for other in others[1:]:
                self.remove_task(other)
            self._retid(self.tasks[others[0]], tgid)
        else:
            self.adopt_tid(tid)
        task = self.tasks.get(tgid)
        if task is None:
            return
        for hid, c in task.cgroups.items():
            for subsys in self.hierarchies[hid].subsystems:
                subsys.exec(task, _home(subsys, c))

    def _retid(self, task: Task, tid: int) -> None:
        """The same thread under a new tid (de_thread): it never left its containers.

        Re-adding it would empty its containers for an instant, and an empty
        container is released. de_thread also gives it the leader's start time,
        which is read again when needed.
        """
        self._emit("task_removed", task)
        self.tasks.pop(task.tid, None)
        self.threads[task.tgid].discard(task.tid)
        task.tid, task.start_time = tid, None
        self.tasks[tid] = task
        self.threads[task.tgid].add(tid)
        self._emit("task_added", task)

    def adopt(self, facts: TaskFacts, depth: int = 0) -> Task:
        """Track a thread found in /proc: where a restored state had it, else by ancestry.

        Its ancestry must be known first: a thread's leader, or a process's
        parent, forked since the last scan is adopted before it (up to
        MAX_ADOPT_DEPTH generations), or the task would land in the roots.
        """
        placement = self.placements.pop((facts.tid, facts.start_time), None)
        if placement is not None:
            return self.add_task(facts.tid, facts.tgid, placement=placement,
                                 start_time=facts.start_time, restored=True)
        kin = facts.tgid if facts.tid != facts.tgid else facts.ppid
        if kin > 0 and kin not in self.tasks and depth < MAX_ADOPT_DEPTH:
            self.adopt_tid(kin, depth + 1)
        like = self._inheritance(facts.tid, facts.tgid, facts.ppid, facts.ppid)
        return self.add_task(facts.tid, facts.tgid, like=like, start_time=facts.start_time)

    def adopt_tid(self, tid: int, depth: int = 0) -> Task | None:
        facts = self.proc.read_task(tid)
        return self.adopt(facts, depth) if facts is not None else None

    def known_task(self, tid: int) -> Task | None:
        """The tracked task `tid`, learning it from /proc if the tracker has not yet."""
        task = self.tasks.get(tid)
        if task is None:
            self.refresh()
            task = self.tasks.get(tid) or self.adopt_tid(tid)
        return task

    def resync(
        self, live: dict[int, TaskFacts], skip: set[int] | frozenset[int] = frozenset()
    ) -> int:
        """Make the table match a /proc scan; return how many tasks were misplaced.

        Tasks gone from /proc exit; new ones are placed by ancestry, parents
        first (ordered by start time); a tid whose start time changed was
        reused and is a new task. `skip` holds tids that changed after the scan
        began (the tracker knows them from events), which the scan cannot judge.
        """
        fixed = 0
        for tid in [t for t in self.tasks if t not in live and t not in skip]:
            self.remove_task(tid)
            fixed += 1
        new = []
        for tid, facts in live.items():
            if tid in skip:
                continue
            task = self.tasks.get(tid)
            if task is None:
                new.append(facts)
            elif task.start_time is None:
                task.start_time = facts.start_time
            elif task.start_time != facts.start_time:
                self.remove_task(tid)
                new.append(facts)
        for facts in sorted(new, key=lambda f: (f.start_time, f.tgid != f.tid, f.tid)):
            if facts.tid not in self.tasks:  # not learned already as an ancestor of another
                self.adopt(facts)
        return fixed + len(new)

    # ------------------------------------------------------------------ attach

    def attach(self, dst: Container, tid: int, *, threadgroup: bool, caller: Caller) -> None:
        """Move a thread (tasks) or a whole process (cgroup.procs) into `dst` (spec 4.2)."""
        if dst.removed:
            raise CgroupError(errno.ENODEV, f"{dst.path} has been removed")
        if tid == 0:
            tid = caller.tid
        self.refresh()
        task = self.known_task(tid)
        if task is None:
            if self.proc.exists(tid):
                return  # a zombie: found, and attaching it moves nothing
            raise CgroupError(errno.ESRCH, f"no task with id {tid}")
        checked = task
        if threadgroup:
            checked = self.tasks.get(task.tgid, task)
        if checked.movable is None or not self.follows_events:
            facts = self.proc.read_task(checked.tid)
            if facts is None:
                raise CgroupError(errno.ESRCH, f"task {checked.tid} exited")
            checked.movable = not self.proc.is_unmovable(facts)
            if checked.start_time is None:
                checked.start_time = facts.start_time
        elif not self.proc.exists(checked.tid):
            raise CgroupError(errno.ESRCH, f"task {checked.tid} exited")
        if not checked.movable:
            raise CgroupError(errno.EINVAL, f"kernel thread {checked.tid} cannot be moved")
        if not caller.is_root:
            ids = self.proc.read_ids(checked.tid)
            if ids is None:
                raise CgroupError(errno.ESRCH, f"task {checked.tid} exited")
            ruid, _euid, suid = ids
            if caller.uid not in (ruid, suid):
                raise CgroupError(
                    errno.EACCES,
                    f"uid {caller.uid} may not move task {checked.tid} (uid {ruid})",
                )
        if threadgroup:
            members = [self.tasks[t] for t in sorted(self.threads.get(task.tgid, ()))]
        else:
            members = [task]
        for subsys in dst.hierarchy.subsystems:
            subsys.may_move(dst, members, caller)
        self.move(dst, members)

    def move(self, dst: Container, tasks: Sequence[Task]) -> None:
        """All-or-nothing move of `tasks` into `dst` across its subsystems."""
        hid = dst.hierarchy.id
        moving = [t for t in tasks if t.cgroups.get(hid) is not dst]
        if not moving:
            return
        sources = [t.cgroups[hid] for t in moving]
        # what each subsystem sees: a disabled one's children are its root
        seen: list[tuple[Subsystem, Container, list[Task], list[Container]]] = []
        for subsys in dst.hierarchy.subsystems:
            home = _home(subsys, dst)
            pairs = [(t, _home(subsys, src)) for t, src in zip(moving, sources, strict=True)]
            pairs = [(t, src) for t, src in pairs if src is not home]
            if pairs:
                seen.append((subsys, home, [t for t, _ in pairs], [src for _, src in pairs]))
        agreed: list[tuple[Subsystem, Container, list[Task]]] = []
        try:
            for subsys, home, its_tasks, _ in seen:
                subsys.can_attach(home, its_tasks)
                agreed.append((subsys, home, its_tasks))
        except BaseException:
            for subsys, home, its_tasks in reversed(agreed):
                subsys.cancel_attach(home, its_tasks)
            raise
        for task, src in zip(moving, sources, strict=True):
            # join first: moving between a container and its ancestor must not
            # make the ancestor look empty for an instant
            self._join(task, dst)
            self._leave(task, src)
        for subsys, home, its_tasks, its_sources in seen:
            subsys.attach(home, its_tasks, its_sources)
        self._emit("tasks_moved", dst, moving)
