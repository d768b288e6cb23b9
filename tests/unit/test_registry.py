"""The core without FUSE: hierarchies, containers, tasks, moves and their rules."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest

from containerfs.core.container import Container
from containerfs.core.files import Caller, ControlFile
from containerfs.core.options import parse_options
from containerfs.core.registry import Listener, Registry
from containerfs.core.subsystem import Subsystem
from containerfs.errors import CgroupError

ROOT = Caller(0, 0, os.getpid())


class Recorder(Subsystem):
    """Records every hook call, so tests can see the order of a move."""

    name = "rec"
    files = (ControlFile("value", lambda c: f"{c.state['rec']['value']}\n"),)

    def __init__(self, registry):
        super().__init__(registry)
        self.calls: list[tuple] = []

    def create(self, container):
        self.calls.append(("create", container.path))
        return {"value": 0}

    def destroy(self, container):
        self.calls.append(("destroy", container.path))

    def can_attach(self, dst, tasks):
        self.calls.append(("can_attach", dst.path, len(tasks)))

    def cancel_attach(self, dst, tasks):
        self.calls.append(("cancel_attach", dst.path))

    def attach(self, dst, tasks, sources):
        self.calls.append(("attach", dst.path, tuple(s.path for s in sources)))

    def fork(self, task, container):
        self.calls.append(("fork", task.tid, container.path))

    def exit(self, task, container):
        self.calls.append(("exit", task.tid, container.path))


class Veto(Subsystem):
    """Refuses moves into any container named 'closed' (like cpuset's ENOSPC)."""

    name = "veto"

    def can_attach(self, dst, tasks):
        if dst.name == "closed":
            raise CgroupError(errno.ENOSPC, "closed")


class Events(Listener):
    def __init__(self):
        self.released: list[str] = []
        self.populated: list[tuple[str, bool]] = []

    def release(self, c):
        self.released.append(c.path)

    def populated_changed(self, c):
        self.populated.append((c.path, c.populated))


@pytest.fixture
def reg() -> Registry:
    r = Registry([Recorder, Veto])
    r.add_task(os.getpid(), os.getpid())
    return r


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "1000"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def mount(reg: Registry, options: str):
    h, _created = reg.mount(parse_options(options.split(","), reg.subsystems))
    return h


def mkdir(reg: Registry, parent: Container, name: str) -> Container:
    return reg.mkdir(parent, name, uid=0, gid=0, mode=0o755)


def test_new_hierarchy_holds_every_task_in_its_root(reg):
    reg.add_task(12345678, 12345678)
    h = mount(reg, "none,name=a")
    assert {t.tid for t in h.root.tasks} == {os.getpid(), 12345678}
    assert h.root.nr_subtree_tasks == 2
    assert reg.tasks[12345678].cgroups[h.id] is h.root


def test_same_options_reuse_the_hierarchy_and_ids_grow(reg):
    a = mount(reg, "none,name=a")
    assert mount(reg, "none,name=a") is a
    assert mount(reg, "name=a") is a  # name alone reuses whatever its subsystems
    b = mount(reg, "rec")
    assert b.id == a.id + 1
    assert mount(reg, "rec") is b


def test_subsystem_bound_elsewhere_is_ebusy_naming_the_hierarchy(reg):
    h = mount(reg, "rec")
    with pytest.raises(CgroupError) as exc:
        mount(reg, "rec,veto")
    assert exc.value.errno == errno.EBUSY
    assert f"hierarchy {h.id}" in exc.value.message


def test_name_with_other_subsystems_is_ebusy(reg):
    mount(reg, "rec,name=x")
    with pytest.raises(CgroupError) as exc:
        mount(reg, "veto,name=x")
    assert exc.value.errno == errno.EBUSY


def test_unknown_name_alone_is_einval(reg):
    with pytest.raises(CgroupError) as exc:
        mount(reg, "name=nothing")
    assert exc.value.errno == errno.EINVAL


def test_mkdir_inherits_flags_and_creates_state(reg):
    h = mount(reg, "rec,name=a")
    h.root.notify_on_release = True
    a = mkdir(reg, h.root, "a")
    h.root.notify_on_release = False
    b = mkdir(reg, h.root, "b")
    assert a.notify_on_release and not b.notify_on_release
    assert a.state["rec"] == {"value": 0}
    assert ("create", "/a") in reg.subsystems["rec"].calls


def test_mkdir_rules(reg):
    h = mount(reg, "rec,name=a")
    mkdir(reg, h.root, "a")
    for name, err in (
        ("a", errno.EEXIST),
        ("tasks", errno.EEXIST),
        ("rec.value", errno.EEXIST),
        ("x\ny", errno.EINVAL),
    ):
        with pytest.raises(CgroupError) as exc:
            mkdir(reg, h.root, name)
        assert exc.value.errno == err, name
    assert set(h.root.children) == {"a"}


def test_rmdir_rules_and_release_on_child_removal(reg):
    events = Events()
    reg.listeners.append(events)
    h = mount(reg, "none,name=a")
    a = mkdir(reg, h.root, "a")
    b = mkdir(reg, a, "b")
    a.notify_on_release = True
    with pytest.raises(CgroupError) as exc:
        reg.rmdir(a)
    assert exc.value.errno == errno.EBUSY  # has a child
    reg.move(b, [reg.tasks[os.getpid()]])
    with pytest.raises(CgroupError) as exc:
        reg.rmdir(b)
    assert exc.value.errno == errno.EBUSY  # populated
    reg.move(h.root, [reg.tasks[os.getpid()]])
    reg.rmdir(b)
    assert b.removed and "b" not in a.children
    assert events.released == ["/a"]  # the parent, once its last child went
    with pytest.raises(CgroupError) as exc:
        reg.rmdir(h.root)
    assert exc.value.errno == errno.EBUSY


def test_release_fires_on_depopulation_only_with_notify(reg):
    events = Events()
    reg.listeners.append(events)
    h = mount(reg, "none,name=a")
    quiet = mkdir(reg, h.root, "quiet")
    loud = mkdir(reg, h.root, "loud")
    loud.notify_on_release = True
    me = reg.tasks[os.getpid()]
    reg.move(quiet, [me])
    reg.move(loud, [me])
    assert events.released == []  # loud is populated now; quiet has no notify
    reg.move(h.root, [me])
    assert events.released == ["/loud"]


def test_move_to_descendant_does_not_depopulate_the_ancestor(reg):
    events = Events()
    reg.listeners.append(events)
    h = mount(reg, "none,name=a")
    a = mkdir(reg, h.root, "a")
    a.notify_on_release = True
    b = mkdir(reg, a, "b")
    me = reg.tasks[os.getpid()]
    reg.move(a, [me])
    reg.move(b, [me])
    reg.move(a, [me])
    assert events.released == ["/a/b"]  # b inherited notify_on_release; a never emptied
    assert ("/a", False) not in events.populated


def test_veto_moves_nothing_and_cancels_the_others(reg):
    h = mount(reg, "rec,veto")
    closed = mkdir(reg, h.root, "closed")
    me = reg.tasks[os.getpid()]
    with pytest.raises(CgroupError) as exc:
        reg.move(closed, [me])
    assert exc.value.errno == errno.ENOSPC
    assert me.cgroups[h.id] is h.root
    calls = [
        c[0]
        for c in reg.subsystems["rec"].calls
        if c[0] in ("can_attach", "cancel_attach", "attach")
    ]
    assert calls == ["can_attach", "cancel_attach"]


def test_attach_by_pid_with_real_processes(reg, sleeper):
    h = mount(reg, "rec,name=a")
    a = mkdir(reg, h.root, "a")
    reg.attach(a, sleeper.pid, threadgroup=True, caller=ROOT)
    assert {t.tid for t in a.tasks} == {sleeper.pid}
    assert h.root.nr_subtree_tasks == len(reg.tasks)
    reg.attach(a, 0, threadgroup=False, caller=ROOT)  # 0 is the opener's thread
    assert os.getpid() in {t.tid for t in a.tasks}


def test_attach_errors(reg, sleeper):
    h = mount(reg, "none,name=a")
    a = mkdir(reg, h.root, "a")
    with pytest.raises(CgroupError) as exc:
        reg.attach(a, 2**31 - 1, threadgroup=False, caller=ROOT)
    assert exc.value.errno == errno.ESRCH
    nobody = Caller(65534, 65534, os.getpid())
    with pytest.raises(CgroupError) as exc:
        reg.attach(a, sleeper.pid, threadgroup=False, caller=nobody)
    assert exc.value.errno == errno.EACCES
    reg.rmdir(a)
    with pytest.raises(CgroupError) as exc:
        reg.attach(a, sleeper.pid, threadgroup=False, caller=ROOT)
    assert exc.value.errno == errno.ENODEV


def test_unmovable_kernel_thread_is_einval(reg):
    from containerfs.tracking import procscan

    kthreads = [t for t in procscan.scan_tasks().values() if procscan.is_unmovable_kthread(t)]
    if not kthreads:
        pytest.skip("no per-CPU kernel thread visible here")
    h = mount(reg, "none,name=a")
    a = mkdir(reg, h.root, "a")
    reg.follows_events = True  # the second try answers from what the first one learned
    for _ in range(2):
        with pytest.raises(CgroupError) as exc:
            reg.attach(a, kthreads[0].tid, threadgroup=False, caller=ROOT)
        assert exc.value.errno == errno.EINVAL


def test_a_known_task_that_exited_is_esrch_when_following_events(reg):
    """With events, a known task is moved without rereading /proc, but never a dead one."""
    h = mount(reg, "none,name=a")
    a = mkdir(reg, h.root, "a")
    child = subprocess.Popen(["sleep", "100"])
    reg.follows_events = True
    try:
        reg.attach(a, child.pid, threadgroup=False, caller=ROOT)
        assert reg.tasks[child.pid].movable is True
        assert reg.tasks[child.pid].start_time is not None
    finally:
        child.kill()
        child.wait()
    with pytest.raises(CgroupError) as exc:  # its exit event never came: /proc decides
        reg.attach(h.root, child.pid, threadgroup=False, caller=ROOT)
    assert exc.value.errno == errno.ESRCH


def test_fork_inherits_and_threads_join_the_leader(reg):
    h = mount(reg, "rec,name=a")
    a = mkdir(reg, h.root, "a")
    reg.add_task(500, 500)
    reg.move(a, [reg.tasks[500]])
    child = reg.fork(500, 500, 501, 501)
    thread = reg.fork(1, 1, 502, 500)  # a thread's event names the process's parent
    assert child.cgroups[h.id] is a and thread.cgroups[h.id] is a
    assert ("fork", 501, "/a") in reg.subsystems["rec"].calls
    reg.remove_task(501)
    assert ("exit", 501, "/a") in reg.subsystems["rec"].calls
    assert {t.tid for t in a.tasks} == {500, 502}


def test_exec_by_a_thread_takes_the_leader_tid(reg):
    h = mount(reg, "none,name=a")
    a = mkdir(reg, h.root, "a")
    reg.add_task(700, 700)
    reg.fork(1, 1, 701, 700)
    reg.move(a, [reg.tasks[701]])
    a.notify_on_release = True
    events = Events()
    reg.listeners.append(events)
    reg.remove_task(700)  # de_thread(): the old leader's exit event
    reg.exec(700, 700)
    assert 701 not in reg.tasks and reg.tasks[700].cgroups[h.id] is a
    assert reg.threads[700] == {700} and a.tasks == {reg.tasks[700]}
    # the thread never left `a`: no emptied moment, no release (spec 6.1)
    assert events.populated == [] and events.released == []


def test_rename_rules(reg):
    h = mount(reg, "none,name=a")
    a = mkdir(reg, h.root, "a")
    b = mkdir(reg, h.root, "b")
    c = mkdir(reg, a, "c")
    reg.rename(a, h.root, "a2")
    assert a.path == "/a2" and c.path == "/a2/c"
    for args, err in (
        ((b, h.root, "a2"), errno.EEXIST),
        ((b, a, "b"), errno.EIO),
        ((b, h.root, "x\n"), errno.EINVAL),
        ((b, h.root, "tasks"), errno.ENOTDIR),
    ):
        with pytest.raises(CgroupError) as exc:
            reg.rename(*args)
        assert exc.value.errno == err


def test_destroy_hierarchy_only_without_children(reg):
    h = mount(reg, "rec")
    mkdir(reg, h.root, "a")
    with pytest.raises(CgroupError):
        reg.destroy_hierarchy(h)
    reg.rmdir(h.root.children["a"])
    reg.destroy_hierarchy(h)
    assert reg.subsystems["rec"].hierarchy is None
    assert all(h.id not in t.cgroups for t in reg.tasks.values())
    assert mount(reg, "rec").id != h.id  # ids are cyclic, not reused at once


def test_resync_places_new_tasks_by_ancestry_and_drops_the_dead(reg):
    from containerfs.tracking.procscan import TaskInfo

    h = mount(reg, "none,name=a")
    a = mkdir(reg, h.root, "a")
    reg.add_task(800, 800, start_time=10)
    reg.move(a, [reg.tasks[800]])
    reg.add_task(900, 900, start_time=5)
    live = {
        os.getpid(): TaskInfo(os.getpid(), os.getpid(), 1, 1, "R", 0),
        800: TaskInfo(800, 800, 1, 10, "S", 0),
        802: TaskInfo(802, 802, 801, 13, "S", 0),  # grandchild, listed first on purpose
        801: TaskInfo(801, 801, 800, 12, "S", 0),
        803: TaskInfo(803, 801, 800, 14, "S", 0),  # a thread of 801
    }
    fixed = reg.resync(live)
    assert 900 not in reg.tasks
    assert {t.tid for t in a.tasks} == {800, 801, 802, 803}
    assert fixed == 4
    # a reused tid (new start time) is a new task, placed by its own ancestry
    live[800] = TaskInfo(800, 800, 1, 99, "S", 0)
    reg.resync(live)
    assert reg.tasks[800].cgroups[h.id] is h.root


def test_rebind_adds_a_subsystem_to_a_live_hierarchy(reg):
    h = mount(reg, "none,name=live")
    a = mkdir(reg, h.root, "a")
    reg.move(a, [reg.tasks[os.getpid()]])
    reg.rebind(h, frozenset({"rec"}))
    rec = reg.subsystems["rec"]
    assert h.subsystem_names == ["rec"] and rec.hierarchy is h
    assert a.state["rec"] == {"value": 0} and h.root.state["rec"] == {"value": 0}
    assert ("attach", "/a", ("/a",)) in rec.calls  # existing tasks attached
    assert "rec.value" in h.files(a)
    reg.rebind(h, frozenset())
    assert h.subsystem_names == [] and rec.hierarchy is None and "rec" not in a.state
    assert reg.tasks[os.getpid()].cgroups[h.id] is a  # tasks stay where they are
    assert "rec.value" not in h.files(a)


def test_rebind_refused_changes_nothing(reg):
    h = mount(reg, "none,name=live")
    closed = mkdir(reg, h.root, "closed")
    reg.move(closed, [reg.tasks[os.getpid()]])
    with pytest.raises(CgroupError) as exc:
        reg.rebind(h, frozenset({"rec", "veto"}))
    assert exc.value.errno == errno.ENOSPC and "cannot add veto" in exc.value.message
    assert h.subsystem_names == [] and closed.state == {}
    assert reg.subsystems["rec"].hierarchy is None and reg.subsystems["veto"].hierarchy is None
    other = mount(reg, "rec")
    with pytest.raises(CgroupError) as exc:
        reg.rebind(h, frozenset({"rec"}))
    assert exc.value.errno == errno.EBUSY and f"hierarchy {other.id}" in exc.value.message
