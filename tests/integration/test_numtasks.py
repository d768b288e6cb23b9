"""numtasks on real mounts: pids-style files, hierarchical limits, a real fork storm."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from tests.conftest import read_ids, wait_for, write
from tests.integration.test_cpuacct import journaled
from tests.integration.test_persistence import crash, served


@pytest.fixture
def nt(cfs):
    return cfs.mount("numtasks,name=nt")


def test_files_and_defaults(nt):
    assert not any(n.startswith("numtasks.") for n in os.listdir(nt))
    os.mkdir(nt / "a")
    names = {n for n in os.listdir(nt / "a") if n.startswith("numtasks.")}
    assert names == {"numtasks.max", "numtasks.current", "numtasks.peak", "numtasks.events"}
    assert (nt / "a" / "numtasks.max").read_text() == "max\n"
    assert (nt / "a" / "numtasks.current").read_text() == "0\n"
    assert (nt / "a" / "numtasks.events").read_text() == "max 0\n"
    assert oct(os.stat(nt / "a" / "numtasks.current").st_mode & 0o777) == "0o444"


@pytest.mark.parametrize(
    "data, err, shown",
    [
        (b"max", 0, "max"),
        (b" max\n", 0, "max"),
        (b"20", 0, "20"),
        (b" 20 \n", 0, "20"),
        (b"0x10", 0, "16"),
        (b"010", 0, "8"),
        (b"+5", 0, "5"),
        (b"0", 0, "0"),
        (b"4194304", 0, "4194304"),
        (b"4194305", errno.EINVAL, None),
        (b"-1", errno.EINVAL, None),
        (b"MAX", errno.EINVAL, None),
        (b"max1", errno.EINVAL, None),
        (b"1 2", errno.EINVAL, None),
        (b"abc", errno.EINVAL, None),
        (b"\n", errno.EINVAL, None),
        (b"08", errno.EINVAL, None),
        (b"9223372036854775808", errno.ERANGE, None),
        (b"99999999999999999999", errno.ERANGE, None),
        (b"1" * 4097, errno.E2BIG, None),
    ],
)
def test_max_parsing(cfs, nt, data, err, shown):
    os.mkdir(nt / "a")
    assert write(nt / "a" / "numtasks.max", b"7") == 0
    assert write(nt / "a" / "numtasks.max", data) == err
    assert (nt / "a" / "numtasks.max").read_text() == (shown or "7") + "\n"
    assert cfs.daemon_alive()


def test_read_only_files_refuse_writes(nt):
    os.mkdir(nt / "a")
    for name in ("current", "peak", "events"):
        assert write(nt / "a" / f"numtasks.{name}", b"0") == errno.EINVAL


def test_current_counts_threads_of_the_subtree(nt, procs):
    os.makedirs(nt / "a" / "b")
    code = "import threading,time\n"
    code += "[threading.Thread(target=time.sleep, args=(100,)).start() for _ in range(3)]\n"
    code += "print(flush=True); time.sleep(100)"
    p = procs.spawn(sys.executable, "-c", code, stdout=subprocess.PIPE)
    p.stdout.readline()
    assert write(nt / "a" / "b" / "cgroup.procs", str(p.pid).encode()) == 0
    q = procs.sleeper()
    assert write(nt / "a" / "tasks", str(q.pid).encode()) == 0
    assert (nt / "a" / "b" / "numtasks.current").read_text() == "4\n"
    assert (nt / "a" / "numtasks.current").read_text() == "5\n"
    assert (nt / "a" / "numtasks.peak").read_text() == "5\n"


def test_moves_may_exceed_the_limit(nt, procs):
    os.mkdir(nt / "a")
    assert write(nt / "a" / "numtasks.max", b"1") == 0
    ps = [procs.sleeper() for _ in range(3)]
    for p in ps:
        assert write(nt / "a" / "tasks", str(p.pid).encode()) == 0
    assert (nt / "a" / "numtasks.current").read_text() == "3\n"
    assert all(p.poll() is None for p in ps)
    assert write(nt / "a" / "numtasks.max", b"0") == 0  # lowering kills nothing
    assert all(p.poll() is None for p in ps)
    assert (nt / "a" / "numtasks.events").read_text() == "max 0\n"


STORM = r"""
read go
i=0
while [ $i -lt {n} ]; do
    sleep 1000 &
    i=$((i+1))
done
echo done
read wait
"""


def test_fork_storm_ends_at_the_limit(cfs, nt, procs):
    os.makedirs(nt / "a" / "b")
    limit = 20
    assert write(nt / "a" / "numtasks.max", str(limit).encode()) == 0
    sh = procs.spawn(
        "sh",
        "-c",
        STORM.format(n=200),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert write(nt / "a" / "b" / "cgroup.procs", str(sh.pid).encode()) == 0
    sh.stdin.write("go\n")
    sh.stdin.flush()
    assert sh.stdout.readline() == "done\n"
    # the shell and 19 sleepers fit; every later fork was killed
    wait_for(lambda: int((nt / "a" / "numtasks.current").read_text()) <= limit, 30)
    current = int((nt / "a" / "numtasks.current").read_text())
    assert current == limit
    assert sh.poll() is None  # the shell itself came first and stays
    events = int((nt / "a" / "b" / "numtasks.events").read_text().split()[1])
    assert events == 200 - (limit - 1)
    assert (nt / "a" / "numtasks.events").read_text() == "max 0\n"  # counted where forked
    alive = [p for p in read_ids(nt / "a" / "b" / "cgroup.procs") if p != sh.pid]
    assert len(alive) == limit - 1
    assert cfs.daemon_alive()


def test_unlimited_child_of_limited_parent(nt, procs):
    os.makedirs(nt / "a" / "b")
    assert write(nt / "a" / "numtasks.max", b"2") == 0
    sh = procs.spawn(
        "sh",
        "-c",
        STORM.format(n=5),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert write(nt / "a" / "b" / "cgroup.procs", str(sh.pid).encode()) == 0
    sh.stdin.write("go\n")
    sh.stdin.flush()
    assert sh.stdout.readline() == "done\n"
    wait_for(lambda: (nt / "a" / "numtasks.current").read_text() == "2\n", 30)
    assert (nt / "a" / "b" / "numtasks.events").read_text() == "max 4\n"


#: Starts threads one by one on request; each line read starts one more.
THREADS = r"""
import sys, threading, time
for line in sys.stdin:
    threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()
    print(threading.active_count(), flush=True)
"""


def test_new_thread_over_the_limit_kills_its_process(nt, procs):
    """pthread_create is a clone like fork: over the limit, its process is killed."""
    os.mkdir(nt / "a")
    assert write(nt / "a" / "numtasks.max", b"2") == 0
    p = procs.spawn(sys.executable, "-c", THREADS, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    text=True)
    assert write(nt / "a" / "cgroup.procs", str(p.pid).encode()) == 0
    p.stdin.write("thread\n")
    p.stdin.flush()
    assert p.stdout.readline() == "2\n"  # two tasks: at the limit, allowed
    assert (nt / "a" / "numtasks.current").read_text() == "2\n"
    assert p.poll() is None
    p.stdin.write("thread\n")
    p.stdin.flush()
    assert p.wait(timeout=30) == -9  # the third task took its whole process
    assert (nt / "a" / "numtasks.events").read_text() == "max 1\n"
    wait_for(lambda: (nt / "a" / "numtasks.current").read_text() == "0\n", 30)


#: A fork storm that reports each child's pid as it forks it.
STORM_PIDS = r"""
read go
i=0
while [ $i -lt {n} ]; do
    sleep 1000 &
    echo $!
    i=$((i+1))
done
echo done
read wait
"""


def test_fork_storm_keeps_the_oldest(cfs, nt, procs):
    """The kernel refuses the forks past the limit, so the first children live on: the
    daemon kills the newest thread group each time, never an older one."""
    os.makedirs(nt / "a" / "b")
    limit = 10
    assert write(nt / "a" / "numtasks.max", str(limit).encode()) == 0
    sh = procs.spawn("sh", "-c", STORM_PIDS.format(n=60), stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert write(nt / "a" / "b" / "cgroup.procs", str(sh.pid).encode()) == 0
    sh.stdin.write("go\n")
    sh.stdin.flush()
    children = []
    for line in sh.stdout:
        if line == "done\n":
            break
        children.append(int(line))
    assert len(children) == 60
    wait_for(lambda: int((nt / "a" / "numtasks.current").read_text()) <= limit, 30)
    alive = sorted(p for p in read_ids(nt / "a" / "b" / "cgroup.procs") if p != sh.pid)
    assert alive == sorted(children[: limit - 1])
    assert sh.poll() is None
    # the kernel logs once per cgroup, naming the one the fork came from
    logged = [ln for ln in cfs.stderr().splitlines() if "fork rejected by numtasks" in ln]
    assert len(logged) == 1 and logged[0].endswith(" in /a/b"), logged


def _journaled(cfs, path: str) -> list[int] | None:
    """[peak, events] of container `path` as the daemon's journal holds it now."""
    return journaled(cfs, "numtasks", path)


def test_peak_and_events_survive_a_daemon_crash(cfs, nt, procs):
    os.mkdir(nt / "a")
    assert write(nt / "a" / "numtasks.max", b"3") == 0
    sh = procs.spawn("sh", "-c", STORM.format(n=6), stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert write(nt / "a" / "cgroup.procs", str(sh.pid).encode()) == 0
    sh.stdin.write("go\n")
    sh.stdin.flush()
    assert sh.stdout.readline() == "done\n"
    wait_for(lambda: (nt / "a" / "numtasks.current").read_text() == "3\n", 30)
    events = (nt / "a" / "numtasks.events").read_text()
    peak = (nt / "a" / "numtasks.peak").read_text()
    assert events == "max 4\n"
    wait_for(lambda: _journaled(cfs, "/a") == [int(peak), 4], 20)
    os.killpg(sh.pid, 9)  # while no daemon runs: the peak must not come from the count
    sh.wait()
    crash(cfs)
    cfs.start()
    wait_for(lambda: served(nt), timeout=10)
    assert (nt / "a" / "numtasks.events").read_text() == events
    assert (nt / "a" / "numtasks.peak").read_text() == peak
