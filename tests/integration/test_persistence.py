"""No state lost: kill -9 the daemon, start it again, find everything in place."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import CLI, read_ids, wait_for, write


def crash(cfs) -> None:
    cfs.daemon.send_signal(signal.SIGKILL)
    cfs.daemon.wait()


def served(view) -> bool:
    """True once the view answers again (readdir is never served from a cache)."""
    try:
        return "tasks" in os.listdir(view)
    except OSError:
        return False


def test_restart_restores_everything(cfs, procs):
    view = cfs.mount("none,name=keep")
    other = cfs.mount("none,name=other")
    os.makedirs(view / "a" / "b")
    os.mkdir(other / "x")
    (view / "a" / "notify_on_release").write_bytes(b"1")
    (view / "release_agent").write_bytes(b"/bin/true")
    os.chmod(view / "a" / "b", 0o700)
    os.chown(view / "a" / "tasks", 1234, 5678)
    os.rename(view / "a" / "b", view / "a" / "c")
    moved = procs.sleeper()
    write(view / "a" / "c" / "tasks", str(moved.pid).encode())
    write(other / "x" / "cgroup.procs", str(moved.pid).encode())
    parent = procs.spawn("sh", "-c", "read x; sleep 1000 & wait", stdin=subprocess.PIPE)
    write(view / "a" / "cgroup.procs", str(parent.pid).encode())

    crash(cfs)
    parent.stdin.write(b"go\n")  # forks while no daemon runs
    parent.stdin.flush()
    time.sleep(0.3)
    cfs.start()

    wait_for(lambda: served(view), timeout=10)  # the view is back
    assert (view / "a" / "notify_on_release").read_bytes() == b"1\n"
    assert (view / "release_agent").read_bytes() == b"/bin/true\n"
    assert os.stat(view / "a" / "c").st_mode & 0o777 == 0o700
    assert os.stat(view / "a" / "tasks").st_uid == 1234
    assert read_ids(view / "a" / "c" / "tasks") == [moved.pid]
    assert read_ids(other / "x" / "tasks") == [moved.pid]
    in_a = read_ids(view / "a" / "tasks")
    assert parent.pid in in_a and len(in_a) == 2  # the child forked while down, by ancestry
    rows = cfs.cli("membership", str(moved.pid)).stdout.splitlines()
    assert rows == ["2:name=other:/x", "1:name=keep:/a/c"]


def proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_frozen_set_survives_a_restart(cfs, procs):
    view = cfs.mount("freezer")
    os.mkdir(view / "ice")
    frozen, pre_stopped = procs.sleeper(), procs.sleeper()
    os.kill(pre_stopped.pid, signal.SIGSTOP)
    wait_for(lambda: proc_state(pre_stopped.pid) == "T")
    for p in (frozen, pre_stopped):
        write(view / "ice" / "cgroup.procs", str(p.pid).encode())
    (view / "ice" / "freezer.state").write_bytes(b"FROZEN")
    wait_for(lambda: (view / "ice" / "freezer.state").read_bytes() == b"FROZEN\n")
    crash(cfs)
    cfs.start()
    wait_for(lambda: served(view), timeout=10)
    assert (view / "ice" / "freezer.state").read_bytes() == b"FROZEN\n"
    (view / "ice" / "freezer.state").write_bytes(b"THAWED")
    wait_for(lambda: proc_state(frozen.pid) == "S")
    assert proc_state(pre_stopped.pid) == "T"  # stopped before the freeze: left stopped
    os.kill(pre_stopped.pid, signal.SIGCONT)



def test_a_freeze_in_progress_survives_a_restart(cfs):
    """A container still FREEZING at the crash is freezing after the restart.

    The test process is an ancestor of the daemon, which the freezer never
    stops, so the container stays FREEZING for as long as it is in it.
    """
    view = cfs.mount("freezer")
    os.mkdir(view / "ice")
    write(view / "ice" / "cgroup.procs", str(os.getpid()).encode())
    try:
        (view / "ice" / "freezer.state").write_bytes(b"FROZEN")
        assert (view / "ice" / "freezer.state").read_bytes() == b"FREEZING\n"
        crash(cfs)
        cfs.start()
        wait_for(lambda: served(view), timeout=10)
        assert (view / "ice" / "freezer.state").read_bytes() == b"FREEZING\n"
        assert (view / "ice" / "freezer.self_freezing").read_bytes() == b"1\n"
    finally:
        write(view / "cgroup.procs", str(os.getpid()).encode())


def test_freezer_keeps_its_intent_not_its_progress(cfs, procs):
    """A restart keeps where FROZEN was written, not what a read showed at the time.

    A child under a frozen parent reads FROZEN but was never frozen itself; a
    container caught FREEZING was. Two restarts in a row must not turn the
    child's inherited state into its own.
    """
    view = cfs.mount("freezer")
    os.makedirs(view / "top" / "kid")
    kid = procs.sleeper()
    write(view / "top" / "kid" / "cgroup.procs", str(kid.pid).encode())
    (view / "top" / "freezer.state").write_bytes(b"FROZEN")
    wait_for(lambda: (view / "top" / "kid" / "freezer.state").read_bytes() == b"FROZEN\n")
    for _ in range(2):
        crash(cfs)
        cfs.start()
        wait_for(lambda: served(view), timeout=10)
    assert (view / "top" / "freezer.self_freezing").read_bytes() == b"1\n"
    assert (view / "top" / "kid" / "freezer.self_freezing").read_bytes() == b"0\n"
    assert (view / "top" / "kid" / "freezer.parent_freezing").read_bytes() == b"1\n"
    (view / "top" / "freezer.state").write_bytes(b"THAWED")
    assert (view / "top" / "kid" / "freezer.state").read_bytes() == b"THAWED\n"
    wait_for(lambda: proc_state(kid.pid) == "S")


def test_a_restart_neither_kills_nor_recharges_what_it_restores(cfs, procs):
    """Restored tasks are no forks: numtasks kills none of those moved in over the
    limit (moves may exceed it), and cpuacct charges none of their earlier CPU time."""
    view = cfs.mount("numtasks,cpuacct")
    os.mkdir(view / "lim")
    (view / "lim" / "numtasks.max").write_bytes(b"1")
    burner = procs.spawn(sys.executable, "-c",
                         "import time\nt = time.process_time()\n"
                         "while time.process_time() - t < 0.5: pass\n"
                         "time.sleep(1000)")
    wait_for(lambda: proc_cpu_ns(burner.pid) >= 500_000_000, timeout=30)
    sleepers = [procs.sleeper() for _ in range(2)]
    for p in (burner, *sleepers):
        write(view / "lim" / "cgroup.procs", str(p.pid).encode())
    assert (view / "lim" / "numtasks.current").read_bytes() == b"3\n"
    crash(cfs)
    cfs.start()
    wait_for(lambda: served(view), timeout=10)
    time.sleep(0.5)
    assert all(p.poll() is None for p in (burner, *sleepers))
    assert sorted(read_ids(view / "lim" / "cgroup.procs")) == sorted(
        p.pid for p in (burner, *sleepers))
    assert (view / "lim" / "numtasks.events").read_bytes() == b"max 0\n"
    assert int((view / "lim" / "cpuacct.usage").read_bytes()) < 100_000_000


def proc_cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 10_000_000  # utime + stime, USER_HZ 100


def test_views_come_back_as_they_were(cfs, procs):
    """A restart binds each view again on the same subtree, read-only if it was:
    a view a virt-locked process mounted must not come back as the whole hierarchy."""
    view = cfs.mount("virt")
    ro = cfs.mount("virt,ro")
    os.makedirs(view / "box" / "inner")
    (view / "box" / "virt.lock").write_bytes(b"1")
    boxed = Path(tempfile.mkdtemp(prefix="boxed-", dir=cfs.rt.parent))
    helper = procs.spawn("sh", "-c", 'read x; exec "$@"', "sh", *CLI, "--runtime-dir",
                         str(cfs.rt), "x", str(boxed), "-o", "virt", stdin=subprocess.PIPE)
    write(view / "box" / "cgroup.procs", str(helper.pid).encode())
    helper.communicate(b"go\n", timeout=30)
    assert helper.returncode == 0
    assert "inner" in os.listdir(boxed) and "box" not in os.listdir(boxed)
    crash(cfs)
    cfs.start()
    for v in (view, ro, boxed):
        wait_for(lambda v=v: served(v), timeout=10)
    assert "inner" in os.listdir(boxed) and "box" not in os.listdir(boxed)
    assert "box" in os.listdir(ro)
    with pytest.raises(OSError) as exc:
        os.mkdir(ro / "nope")
    assert exc.value.errno == errno.EROFS
