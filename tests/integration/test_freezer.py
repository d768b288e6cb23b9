"""freezer (spec 7.4) on a real mount: real processes stopped, counted and continued."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import read_ids, wait_for, write

#: forks a child every 20 ms up to a cap once told to start; every child forks a
#: grandchild, and all of them then sleep until killed (bounded: 1 + 2 * cap processes)
FORK_LOOP = r"""
import os, signal, sys, time
cap = int(sys.argv[1])
sys.stdin.readline()
for _ in range(cap):
    if os.fork() == 0:
        if os.fork() == 0:
            while True:
                signal.pause()
        while True:
            signal.pause()
    time.sleep(0.02)
while True:
    signal.pause()
"""

CAP = 150


def proc_state(pid: int) -> str | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text[text.rindex(")") + 2]


def thread_states(pid: int) -> set[str]:
    states = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        text = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        states.add(text[text.rindex(")") + 2])
    return states


def session(sid: int) -> dict[int, str]:
    """pid -> state of every process of session `sid`, found in /proc, not asked of the daemon."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            text = Path(f"/proc/{name}/stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[3]) == sid:  # state, ppid, pgrp, session
            found[int(name)] = fields[0]
    return found


def state(c: Path) -> str:
    return (c / "freezer.state").read_text()


@pytest.fixture
def fz(cfs) -> Path:
    return cfs.mount("freezer,name=fz")


def test_files_modes_and_defaults(fz):
    assert not [n for n in os.listdir(fz) if n.startswith("freezer.")]
    os.mkdir(fz / "a")
    names = {n for n in os.listdir(fz / "a") if n.startswith("freezer.")}
    assert names == {"freezer.state", "freezer.self_freezing", "freezer.parent_freezing"}
    modes = {n: stat.S_IMODE(os.stat(fz / "a" / n).st_mode) for n in names}
    assert modes == {
        "freezer.state": 0o644,
        "freezer.self_freezing": 0o444,
        "freezer.parent_freezing": 0o444,
    }
    assert state(fz / "a") == "THAWED\n"
    assert (fz / "a" / "freezer.self_freezing").read_bytes() == b"0\n"
    assert (fz / "a" / "freezer.parent_freezing").read_bytes() == b"0\n"


def test_bad_writes_are_einval_and_change_nothing(cfs, fz):
    a = fz / "a"
    os.mkdir(a)
    for junk in (
        b"FREEZING",
        b"frozen",
        b"Frozen",
        b"FROZEN X",
        b"FROZE",
        b"FROZENN",
        b"THAWED\n\nX",
        b"1",
        b"\n",
        b"+FROZEN",
    ):
        assert write(a / "freezer.state", junk) == errno.EINVAL, junk
        assert state(a) == "THAWED\n"
    assert write(a / "freezer.state", b"F" * 4097) == errno.E2BIG
    assert write(a / "freezer.state", b" " * 4096) == errno.EINVAL
    assert write(a / "freezer.self_freezing", b"1") == errno.EINVAL
    assert write(a / "freezer.parent_freezing", b"1") == errno.EINVAL
    assert state(a) == "THAWED\n"
    # stripped like the kernel's strstrip(); a NUL ends the string
    assert write(a / "freezer.state", b" \tFROZEN\n ") == 0
    assert state(a) == "FROZEN\n"
    assert write(a / "freezer.state", b"THAWED\0junk") == 0
    assert state(a) == "THAWED\n"
    assert cfs.stats()["ok"]


def test_self_and_parent_freezing_flags(fz):
    a, b = fz / "a", fz / "a" / "b"
    os.makedirs(b)
    assert write(a / "freezer.state", b"FROZEN") == 0
    # empty subtrees are frozen at once
    assert (state(a), state(b)) == ("FROZEN\n", "FROZEN\n")
    assert (a / "freezer.self_freezing").read_text() == "1\n"
    assert (a / "freezer.parent_freezing").read_text() == "0\n"
    assert (b / "freezer.self_freezing").read_text() == "0\n"
    assert (b / "freezer.parent_freezing").read_text() == "1\n"
    os.mkdir(a / "late")
    assert (a / "late" / "freezer.parent_freezing").read_text() == "1\n"
    assert state(a / "late") == "FROZEN\n"
    assert write(b / "freezer.state", b"FROZEN") == 0
    assert write(a / "freezer.state", b"THAWED") == 0
    assert state(a) == "THAWED\n"
    assert state(a / "late") == "THAWED\n"
    assert state(b) == "FROZEN\n"
    assert (b / "freezer.parent_freezing").read_text() == "0\n"
    assert write(a / "freezer.state", b"FROZEN") == 0
    assert write(b / "freezer.state", b"THAWED") == 0
    # an ancestor still freezes b
    assert state(b) == "FROZEN\n"
    assert (b / "freezer.self_freezing").read_text() == "0\n"
    assert (b / "freezer.parent_freezing").read_text() == "1\n"
    assert write(a / "freezer.state", b"THAWED") == 0
    assert state(b) == "THAWED\n"


@pytest.mark.parametrize("daemon", ["cfs", "cfs_scan"])
def test_fork_loop_frozen_and_thawed_none_lost_none_left(request, daemon, procs):
    """With netlink, and without it (forks found by /proc scans and children lists)."""
    fz = request.getfixturevalue(daemon).mount("freezer,name=fz")
    c = fz / "loop"
    os.mkdir(c)
    loop = procs.spawn(
        sys.executable,
        "-c",
        FORK_LOOP,
        str(CAP),
        stdin=subprocess.PIPE,
        start_new_session=True,
    )
    assert write(c / "cgroup.procs", str(loop.pid).encode()) == 0
    assert loop.stdin is not None
    loop.stdin.write(b"go\n")
    loop.stdin.flush()
    wait_for(lambda: len(read_ids(c / "cgroup.procs")) >= 3, timeout=30)
    assert write(c / "freezer.state", b"FROZEN") == 0
    wait_for(lambda: state(c) == "FROZEN\n", timeout=30)
    frozen = read_ids(c / "cgroup.procs")
    assert len(frozen) < 1 + 2 * CAP, "the loop finished before the freeze; nothing was tested"
    # not only what the daemon knows: every process of the loop's session is a member
    assert sorted(session(loop.pid)) == frozen
    assert all(proc_state(pid) == "T" for pid in frozen)
    assert all(thread_states(pid) == {"T"} for pid in frozen)
    # frozen means frozen: nothing forks, nothing runs, for as long as it lasts
    time.sleep(0.5)
    assert read_ids(c / "cgroup.procs") == frozen
    assert state(c) == "FROZEN\n"
    assert write(c / "freezer.state", b"THAWED") == 0
    assert state(c) == "THAWED\n"
    # none lost: every frozen process is alive and running again, and none of the
    # session is left stopped
    wait_for(lambda: all(proc_state(pid) not in (None, "T") for pid in frozen), timeout=30)
    wait_for(lambda: "T" not in session(loop.pid).values(), timeout=30)
    # and the loop goes on where it stopped
    wait_for(lambda: len(read_ids(c / "cgroup.procs")) > len(frozen), timeout=30)
    # a second freeze of the still-forking group works as well
    assert write(c / "freezer.state", b"FROZEN") == 0
    wait_for(lambda: state(c) == "FROZEN\n", timeout=30)
    again = read_ids(c / "cgroup.procs")
    assert set(frozen) <= set(again)
    assert sorted(session(loop.pid)) == again
    assert all(proc_state(pid) == "T" for pid in again)
    assert write(c / "freezer.state", b"THAWED") == 0
    wait_for(lambda: all(proc_state(pid) not in (None, "T") for pid in again), timeout=30)
    wait_for(lambda: "T" not in session(loop.pid).values(), timeout=30)


def test_a_process_stopped_before_the_freeze_stays_stopped(fz, procs):
    c = fz / "c"
    os.mkdir(c)
    runner, stopped = procs.sleeper(), procs.sleeper()
    for p in (runner, stopped):
        assert write(c / "cgroup.procs", str(p.pid).encode()) == 0
    os.kill(stopped.pid, signal.SIGSTOP)
    wait_for(lambda: proc_state(stopped.pid) == "T")
    assert write(c / "freezer.state", b"FROZEN") == 0
    wait_for(lambda: state(c) == "FROZEN\n", timeout=30)
    assert proc_state(runner.pid) == "T"
    assert write(c / "freezer.state", b"THAWED") == 0
    wait_for(lambda: proc_state(runner.pid) == "S", timeout=30)
    time.sleep(0.3)
    assert proc_state(stopped.pid) == "T"
    os.kill(stopped.pid, signal.SIGCONT)
    wait_for(lambda: proc_state(stopped.pid) == "S")


def test_moves_take_the_destination_state(fz, procs):
    frozen, thawed = fz / "frozen", fz / "thawed"
    os.mkdir(frozen)
    os.mkdir(thawed)
    assert write(frozen / "freezer.state", b"FROZEN") == 0
    p = procs.sleeper()
    assert write(frozen / "cgroup.procs", str(p.pid).encode()) == 0
    wait_for(lambda: state(frozen) == "FROZEN\n", timeout=30)
    assert proc_state(p.pid) == "T"
    assert write(thawed / "cgroup.procs", str(p.pid).encode()) == 0
    wait_for(lambda: proc_state(p.pid) == "S", timeout=30)
    # moving out of a frozen container to the root (never frozen) thaws as well
    assert write(frozen / "cgroup.procs", str(p.pid).encode()) == 0
    wait_for(lambda: proc_state(p.pid) == "T", timeout=30)
    assert write(fz / "cgroup.procs", str(p.pid).encode()) == 0
    wait_for(lambda: proc_state(p.pid) == "S", timeout=30)
    assert state(frozen) == "FROZEN\n"


def test_a_process_stops_while_any_of_its_threads_is_frozen(fz, procs):
    """A signal stops a whole process: one thread in a frozen container stops them all."""
    script = (
        "import threading, signal\n"
        "threading.Thread(target=signal.pause, daemon=True).start()\n"
        "print('ready', flush=True)\n"
        "signal.pause()\n"
    )
    p = procs.spawn(sys.executable, "-c", script, stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    tids = sorted(int(t) for t in os.listdir(f"/proc/{p.pid}/task"))
    assert len(tids) == 2
    c = fz / "c"
    os.mkdir(c)
    assert write(c / "freezer.state", b"FROZEN") == 0
    assert write(c / "tasks", str(tids[1]).encode()) == 0
    wait_for(lambda: state(c) == "FROZEN\n", timeout=30)
    assert thread_states(p.pid) == {"T"}
    assert read_ids(c / "tasks") == [tids[1]]
    assert write(fz / "tasks", str(tids[1]).encode()) == 0
    wait_for(lambda: "T" not in thread_states(p.pid), timeout=30)


def test_nested_thaw_keeps_what_a_child_still_freezes(fz, procs):
    a, b = fz / "a", fz / "a" / "b"
    os.makedirs(b)
    pa, pb = procs.sleeper(), procs.sleeper()
    assert write(a / "cgroup.procs", str(pa.pid).encode()) == 0
    assert write(b / "cgroup.procs", str(pb.pid).encode()) == 0
    assert write(a / "freezer.state", b"FROZEN") == 0
    wait_for(lambda: state(a) == "FROZEN\n", timeout=30)
    assert state(b) == "FROZEN\n"
    assert (proc_state(pa.pid), proc_state(pb.pid)) == ("T", "T")
    assert write(b / "freezer.state", b"FROZEN") == 0
    assert write(a / "freezer.state", b"THAWED") == 0
    wait_for(lambda: proc_state(pa.pid) == "S", timeout=30)
    assert proc_state(pb.pid) == "T"
    assert state(b) == "FROZEN\n"
    assert write(b / "freezer.state", b"THAWED") == 0
    wait_for(lambda: proc_state(pb.pid) == "S", timeout=30)


def test_the_daemon_is_never_stopped(cfs, fz):
    c = fz / "c"
    os.mkdir(c)
    assert cfs.daemon is not None
    assert write(c / "cgroup.procs", str(cfs.daemon.pid).encode()) == 0
    assert write(c / "freezer.state", b"FROZEN") == 0
    for _ in range(5):
        assert state(c) == "FREEZING\n"
        time.sleep(0.05)
    assert proc_state(cfs.daemon.pid) != "T"
    assert cfs.stats()["ok"]
    assert write(c / "freezer.state", b"THAWED") == 0
    assert write(fz / "cgroup.procs", str(cfs.daemon.pid).encode()) == 0
    assert state(c) == "THAWED\n"


def test_frozen_threads_inside_one_process_all_stop(fz, procs):
    """A multi-threaded process in a frozen container reads FROZEN only with every thread T."""
    script = (
        "import threading, time\n"
        "def spin():\n"
        "    while True:\n"
        "        time.sleep(0.001)\n"
        "for _ in range(4):\n"
        "    threading.Thread(target=spin, daemon=True).start()\n"
        "print('ready', flush=True)\n"
        "spin()\n"
    )
    p = procs.spawn(sys.executable, "-c", script, stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    c = fz / "c"
    os.mkdir(c)
    assert write(c / "cgroup.procs", str(p.pid).encode()) == 0
    assert len(read_ids(c / "tasks")) == 5
    assert write(c / "freezer.state", b"FROZEN") == 0
    wait_for(lambda: state(c) == "FROZEN\n", timeout=30)
    assert thread_states(p.pid) == {"T"}
    assert write(c / "freezer.state", b"THAWED") == 0
    wait_for(lambda: "T" not in thread_states(p.pid), timeout=30)


def test_frozen_processes_can_be_killed_and_leave(fz, procs):
    c = fz / "c"
    os.mkdir(c)
    p = procs.sleeper()
    assert write(c / "cgroup.procs", str(p.pid).encode()) == 0
    assert write(c / "freezer.state", b"FROZEN") == 0
    wait_for(lambda: state(c) == "FROZEN\n", timeout=30)
    p.kill()
    p.wait(timeout=10)
    wait_for(lambda: read_ids(c / "cgroup.procs") == [], timeout=30)
    assert state(c) == "FROZEN\n"
    os.rmdir(c)


def test_pid_1_is_never_stopped(fz):
    c = fz / "c"
    os.mkdir(c)
    assert write(c / "cgroup.procs", b"1") == 0
    try:
        assert write(c / "freezer.state", b"FROZEN") == 0
        for _ in range(5):
            assert state(c) == "FREEZING\n"
            assert proc_state(1) != "T"
            time.sleep(0.05)
        assert write(c / "freezer.state", b"THAWED") == 0
    finally:
        assert write(fz / "cgroup.procs", b"1") == 0
    assert proc_state(1) != "T"
    assert state(c) == "THAWED\n"


def test_a_read_never_says_frozen_while_a_member_runs(fz, procs):
    """Someone continues a frozen member: the next read sees it, not the next loop pass."""
    c = fz / "c"
    os.mkdir(c)
    p = procs.sleeper()
    assert write(c / "cgroup.procs", str(p.pid).encode()) == 0
    assert write(c / "freezer.state", b"FROZEN") == 0
    for _ in range(3):
        wait_for(lambda: state(c) == "FROZEN\n", timeout=30)
        os.kill(p.pid, signal.SIGCONT)  # runs again as kill() returns
        # FROZEN is only right if the service loop stopped it again in between
        assert state(c) == "FREEZING\n" or proc_state(p.pid) == "T"
    wait_for(lambda: state(c) == "FROZEN\n", timeout=30)
    assert proc_state(p.pid) == "T"
    assert write(c / "freezer.state", b"THAWED") == 0
    wait_for(lambda: proc_state(p.pid) == "S", timeout=30)
