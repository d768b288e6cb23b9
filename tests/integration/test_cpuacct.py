"""cpuacct on real mounts: formats, reset, and usage against CPU time really burned."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from containerfs.subsys import sysinfo
from tests.conftest import wait_for, write
from tests.integration.test_persistence import crash, served

NCPU = sysinfo.nr_cpu_ids()

#: Burns the CPU seconds it is told, reports its own CPU time burned since "go", exits on "quit".
BURNER = r"""
import os, sys, time
for line in sys.stdin:
    if line.startswith("burn"):
        start = time.process_time()
        end = start + float(line.split()[1])
        x = 0
        while time.process_time() < end:
            for _ in range(10000):
                x += 1
        print(time.process_time() - start, flush=True)
    elif line.startswith("quit"):
        break
"""


def runtime_ns(pid: int) -> int:
    """The kernel's sum_exec_runtime of a (single-threaded) process: what it really ran."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


class Burner:
    """A process that burns CPU on request; `used()` is its CPU time since `joined()`."""

    def __init__(self, procs) -> None:
        self.proc = procs.spawn(
            sys.executable, "-c", BURNER, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.pid = self.proc.pid
        self.base = 0
        self.final: int | None = None

    def joined(self) -> None:
        """Call right after attaching it (it is idle, waiting for a command)."""
        self.base = runtime_ns(self.pid)

    def burn(self, seconds: float) -> float:
        self.proc.stdin.write(f"burn {seconds}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def used(self) -> float:
        """Seconds of CPU since joining (idle, or exited and reaped by quit())."""
        end = self.final if self.final is not None else runtime_ns(self.pid)
        return (end - self.base) / 1e9

    def quit(self) -> None:
        """Let it exit and reap it, keeping its total CPU time from the kernel."""
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        _, _, ru = os.wait4(self.pid, 0)
        self.final = round((ru.ru_utime + ru.ru_stime) * 1e9)
        self.proc.returncode = 0


@pytest.fixture
def ca(cfs):
    return cfs.mount("cpuacct,name=ca")


def usage(path) -> int:
    return int((path / "cpuacct.usage").read_text())


def test_files_and_formats(ca):
    files = {
        "usage",
        "usage_user",
        "usage_sys",
        "usage_percpu",
        "usage_percpu_user",
        "usage_percpu_sys",
        "usage_all",
        "stat",
    }
    assert {n for n in os.listdir(ca) if n.startswith("cpuacct.")} == {
        f"cpuacct.{n}" for n in files
    }
    os.mkdir(ca / "a")
    assert (ca / "a" / "cpuacct.usage").read_text() == "0\n"
    assert (ca / "a" / "cpuacct.usage_percpu").read_text() == "0 " * NCPU + "\n"
    assert (ca / "a" / "cpuacct.usage_all").read_text() == "cpu user system\n" + "".join(
        f"{cpu} 0 0\n" for cpu in range(NCPU)
    )
    assert (ca / "a" / "cpuacct.stat").read_text() == "user 0\nsystem 0\n"
    root = (ca / "cpuacct.usage_percpu").read_text()
    assert root.endswith(" \n") and len(root.split()) == NCPU
    assert int((ca / "cpuacct.usage").read_text()) > 0
    stat = (ca / "cpuacct.stat").read_text().split("\n")
    assert stat[0].startswith("user ") and stat[1].startswith("system ") and stat[2] == ""
    for name in files - {"usage"}:
        assert oct(os.stat(ca / "a" / f"cpuacct.{name}").st_mode & 0o777) == "0o444"


def test_usage_follows_cpu_time_burned(ca, procs):
    os.mkdir(ca / "a")
    b = Burner(procs)
    assert write(ca / "a" / "cgroup.procs", str(b.pid).encode()) == 0
    b.joined()
    b.burn(0.6)
    burned = b.used()
    got = usage(ca / "a")
    assert abs(got - burned * 1e9) <= 0.1 * burned * 1e9, (got, burned)
    per_cpu = [int(x) for x in (ca / "a" / "cpuacct.usage_percpu").read_text().split()]
    assert sum(per_cpu) == got
    user = int((ca / "a" / "cpuacct.usage_user").read_text())
    system = int((ca / "a" / "cpuacct.usage_sys").read_text())
    assert user + system == got
    rows = (ca / "a" / "cpuacct.usage_all").read_text().splitlines()[1:]
    assert sum(int(r.split()[1]) for r in rows) == user
    ticks = (ca / "a" / "cpuacct.stat").read_text().split()
    assert int(ticks[1]) == user // 10**7 and int(ticks[3]) == system // 10**7


def test_usage_survives_exit_and_parent_sums_children(ca, procs):
    os.makedirs(ca / "a" / "x")
    os.makedirs(ca / "a" / "y")
    burned = {}
    for name in ("x", "y"):
        b = Burner(procs)
        assert write(ca / "a" / name / "tasks", str(b.pid).encode()) == 0
        b.joined()
        b.burn(0.4)
        b.quit()
        burned[name] = b.used()
    for name in ("x", "y"):
        wait_for(lambda n=name: (ca / "a" / n / "tasks").read_text() == "", 20)
        got = usage(ca / "a" / name)
        assert abs(got - burned[name] * 1e9) <= 0.1 * burned[name] * 1e9, (name, got)
    assert usage(ca / "a") == usage(ca / "a" / "x") + usage(ca / "a" / "y")


def test_usage_survives_moves(ca, procs):
    os.mkdir(ca / "x")
    os.mkdir(ca / "y")
    b = Burner(procs)
    assert write(ca / "x" / "tasks", str(b.pid).encode()) == 0
    b.joined()
    b.burn(0.3)
    first = b.used()
    assert write(ca / "y" / "tasks", str(b.pid).encode()) == 0
    b.joined()
    b.burn(0.3)
    second = b.used()
    in_x, in_y = usage(ca / "x"), usage(ca / "y")
    assert abs(in_x - first * 1e9) <= 0.1 * first * 1e9
    assert abs(in_y - second * 1e9) <= 0.1 * second * 1e9
    assert write(ca / "tasks", str(b.pid).encode()) == 0
    b.burn(0.2)
    assert usage(ca / "y") == in_y  # time spent in the root is not charged to y


def test_reset_clears_only_the_container_written(ca, procs):
    os.makedirs(ca / "a" / "b")
    b = Burner(procs)
    assert write(ca / "a" / "b" / "tasks", str(b.pid).encode()) == 0
    b.burn(0.2)
    parent = usage(ca / "a")
    assert parent > 0
    assert write(ca / "a" / "b" / "cpuacct.usage", b"0\n") == 0
    assert usage(ca / "a" / "b") < 0.01e9  # whatever ran since the reset, nowhere near 0.2 s
    assert (ca / "a" / "b" / "cpuacct.stat").read_text() == "user 0\nsystem 0\n"
    assert usage(ca / "a") >= parent
    assert write(ca / "cpuacct.usage", b"0") == 0  # accepted, the global counters stay
    assert usage(ca) > 0


@pytest.mark.parametrize(
    "data, err",
    [
        (b"1", errno.EINVAL),
        (b" 0", errno.EINVAL),
        (b"0 ", errno.EINVAL),
        (b"0\n\n", errno.EINVAL),
        (b"-0", errno.EINVAL),
        (b"x", errno.EINVAL),
        (b"\n", errno.EINVAL),
        (b"18446744073709551616", errno.ERANGE),
        (b"0" * 4097, errno.E2BIG),
        (b"+0", 0),
        (b"0x0", 0),
        (b"00", 0),
    ],
)
def test_usage_write_errors(cfs, ca, procs, data, err):
    os.mkdir(ca / "a")
    b = Burner(procs)
    assert write(ca / "a" / "tasks", str(b.pid).encode()) == 0
    b.burn(0.05)
    before = usage(ca / "a")
    assert write(ca / "a" / "cpuacct.usage", data) == err
    if err:
        assert usage(ca / "a") >= before > 0
    assert cfs.daemon_alive()


def test_read_only_files_refuse_writes(ca):
    os.mkdir(ca / "a")
    for name in ("usage_user", "usage_percpu", "usage_all", "stat", "usage_percpu_sys"):
        assert write(ca / "a" / f"cpuacct.{name}", b"0") == errno.EINVAL


#: Two threads burning at once: one in user mode, one in the kernel (reads of /dev/zero);
#: then both stay, idle, so every nanosecond is charged by sampling them.
SPLIT = r"""
import os, sys, threading, time
go, burned = threading.Event(), threading.Barrier(3)
def user():
    go.wait(); end = time.thread_time() + 0.5; x = 0
    while time.thread_time() < end:  # a syscall: rarely
        for _ in range(100000):
            x += 1
    burned.wait(); time.sleep(1000)
def system():
    buf = bytearray(1 << 20); fd = os.open("/dev/zero", os.O_RDONLY)
    go.wait(); end = time.thread_time() + 0.5
    while time.thread_time() < end:
        os.readv(fd, [buf])
    burned.wait(); time.sleep(1000)
threads = [threading.Thread(target=f, daemon=True) for f in (user, system)]
[t.start() for t in threads]
print(*(t.native_id for t in threads), flush=True)
sys.stdin.readline(); go.set()
burned.wait()
print(flush=True)
sys.stdin.readline()
"""


def test_user_and_system_split_is_each_threads_own(ca, procs):
    """Two threads of one process in two containers: each gets its own split, not the
    process's (which /proc/TID/stat gives for any thread)."""
    os.mkdir(ca / "u")
    os.mkdir(ca / "s")
    p = procs.spawn(sys.executable, "-c", SPLIT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    text=True)
    user_tid, system_tid = map(int, p.stdout.readline().split())
    assert write(ca / "u" / "tasks", str(user_tid).encode()) == 0
    assert write(ca / "s" / "tasks", str(system_tid).encode()) == 0
    p.stdin.write("go\n")
    p.stdin.flush()
    p.stdout.readline()  # both burned their 0.5 s and wait
    for name in ("u", "s"):
        assert usage(ca / name) >= 0.45e9, name
    u_sys = int((ca / "u" / "cpuacct.usage_sys").read_text())
    s_user = int((ca / "s" / "cpuacct.usage_user").read_text())
    assert u_sys < 0.05 * usage(ca / "u"), u_sys
    assert s_user < 0.2 * usage(ca / "s"), s_user


def _journaled(cfs, path: str) -> int:
    """The cpuacct usage of container `path` as the daemon's journal holds it now."""
    user, system = journaled(cfs, "cpuacct", path) or ([], [])
    return sum(user) + sum(system)


def test_usage_survives_a_daemon_crash(cfs, ca, procs):
    """kill -9 the daemon: a restart keeps what was journaled (at most a second old)."""
    os.makedirs(ca / "a" / "b")
    b = Burner(procs)
    assert write(ca / "a" / "b" / "tasks", str(b.pid).encode()) == 0
    b.joined()
    b.burn(0.5)
    burned = b.used()
    before = usage(ca / "a" / "b")
    wait_for(lambda: _journaled(cfs, "/a/b") >= before, 20)
    crash(cfs)
    cfs.start()
    wait_for(lambda: served(ca), timeout=10)
    after = usage(ca / "a" / "b")
    assert abs(after - burned * 1e9) <= 0.1 * burned * 1e9, (after, before, burned)
    assert usage(ca / "a") == after  # the parent's count came back too
    b.burn(0.2)  # and counting goes on from there
    assert usage(ca / "a" / "b") >= after + 0.15e9


def journaled(cfs, subsystem: str, path: str):
    """The item a subsystem journaled for container `path` (keys are "HID:/path"): the
    last full record of it, updated by the item records after it, as a restart reads it."""
    lines = []
    for name in ("snapshot", "journal"):
        try:
            lines += (cfs.rt / "state" / name).read_bytes().splitlines()
        except FileNotFoundError:
            continue
    items: dict = {}
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("name") != subsystem:
            continue
        if rec.get("op") == "s":
            items = dict(rec.get("data") or {})
        elif rec.get("op") == "si":
            items[rec["key"]] = rec["value"]
    return next((v for k, v in items.items() if k.endswith(":" + path) and v is not None), None)


def test_usage_follows_a_renamed_container_through_a_crash(cfs, ca, procs):
    """Usage is journaled by container; a rename carries it along, charged since or not."""
    os.mkdir(ca / "old")
    b = Burner(procs)
    assert write(ca / "old" / "tasks", str(b.pid).encode()) == 0
    b.joined()
    b.burn(0.3)
    before = usage(ca / "old")
    wait_for(lambda: _journaled(cfs, "/old") >= before, 20)
    assert write(ca / "tasks", str(b.pid).encode()) == 0  # idle from now on
    os.rename(ca / "old", ca / "new")
    crash(cfs)
    cfs.start()
    wait_for(lambda: served(ca), timeout=10)
    assert usage(ca / "new") >= before
