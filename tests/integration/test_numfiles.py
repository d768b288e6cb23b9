"""numfiles on a real mount: descriptor counts of real processes, and the limit enforced."""

from __future__ import annotations

import errno
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import wait_for, write
from tests.integration.test_persistence import crash, served

#: holds N extra descriptors once told; on "fill" opens until refused and reports why
HOLDER = r"""
import os, sys
held = []
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "open":
        held += [os.open("/dev/null", os.O_RDONLY) for _ in range(int(cmd[1]))]
        print("ok", flush=True)
    elif cmd[0] == "fill":
        try:
            while True:
                held.append(os.open("/dev/null", os.O_RDONLY))
        except OSError as exc:
            print("refused", exc.errno, flush=True)
"""


class Holder:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.pid = proc.pid

    def ask(self, line: str) -> list[str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().decode().split()


@pytest.fixture
def holders(procs):
    def spawn() -> Holder:
        proc = procs.spawn(
            sys.executable, "-c", HOLDER, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        return Holder(proc)

    return spawn


@pytest.fixture
def nf(cfs) -> Path:
    return cfs.mount("numfiles,name=nf")


def nfds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def current(c: Path) -> int:
    return int((c / "numfiles.current").read_text())


def test_files_modes_and_defaults(nf):
    assert not [n for n in os.listdir(nf) if n.startswith("numfiles.")]
    os.mkdir(nf / "a")
    modes = {
        n: stat.S_IMODE(os.stat(nf / "a" / n).st_mode)
        for n in os.listdir(nf / "a")
        if n.startswith("numfiles.")
    }
    assert modes == {"numfiles.current": 0o444, "numfiles.max": 0o644, "numfiles.events": 0o444}
    assert (nf / "a" / "numfiles.current").read_bytes() == b"0\n"
    assert (nf / "a" / "numfiles.max").read_bytes() == b"max\n"
    assert (nf / "a" / "numfiles.events").read_bytes() == b"max 0\n"


def test_max_parser(cfs, nf):
    """pids.max's parser family: stripped, "max" or a number in [0, 2147483647]."""
    a = nf / "a"
    os.mkdir(a)
    f = a / "numfiles.max"
    for good, shown in (
        (b"10", b"10\n"),
        (b" 12\n", b"12\n"),
        (b"+7", b"7\n"),
        (b"0x10", b"16\n"),
        (b"010", b"8\n"),
        (b"0", b"0\n"),
        (b"2147483647", b"2147483647\n"),
        (b"9\0junk", b"9\n"),
        (b"\tmax \n", b"max\n"),
    ):
        assert write(f, good) == 0, good
        assert f.read_bytes() == shown
    assert write(f, b"5") == 0
    for bad, err in (
        (b"-1", errno.EINVAL),
        (b"2147483648", errno.EINVAL),
        (b"99999999999999999999", errno.ERANGE),
        (b"abc", errno.EINVAL),
        (b"5 5", errno.EINVAL),
        (b"MAX", errno.EINVAL),
        (b"08", errno.EINVAL),
        (b"\n", errno.EINVAL),
        (b" " * 4096, errno.EINVAL),
        (b"1" * 4097, errno.E2BIG),
    ):
        assert write(f, bad) == err, bad
        assert f.read_bytes() == b"5\n"
    assert write(a / "numfiles.current", b"1") == errno.EINVAL
    assert write(a / "numfiles.events", b"1") == errno.EINVAL
    assert cfs.stats()["ok"]


def test_current_counts_open_descriptors_hierarchically(nf, holders):
    a, b = nf / "a", nf / "a" / "b"
    os.makedirs(b)
    h1, h2 = holders(), holders()
    assert write(a / "cgroup.procs", str(h1.pid).encode()) == 0
    assert write(b / "cgroup.procs", str(h2.pid).encode()) == 0
    assert current(b) == nfds(h2.pid)
    assert h2.ask("open 25") == ["ok"]
    assert current(b) == nfds(h2.pid)
    assert h1.ask("open 7") == ["ok"]
    assert current(a) == nfds(h1.pid) + nfds(h2.pid)
    # threads share one table: a process counts once however many threads it has
    assert current(nf / "a") == sum(nfds(p) for p in (h1.pid, h2.pid))


def test_max_refuses_opens_with_emfile_and_is_restored(nf, holders):
    c = nf / "c"
    os.mkdir(c)
    h = holders()
    original = resource.prlimit(h.pid, resource.RLIMIT_NOFILE)
    assert write(c / "cgroup.procs", str(h.pid).encode()) == 0
    limit = current(c) + 20
    assert write(c / "numfiles.max", str(limit).encode()) == 0
    wait_for(lambda: resource.prlimit(h.pid, resource.RLIMIT_NOFILE) != original, timeout=30)
    assert h.ask("fill") == ["refused", str(errno.EMFILE)]
    assert current(c) == nfds(h.pid) == limit
    wait_for(lambda: (c / "numfiles.events").read_text() == "max 1\n", timeout=30)
    # removing the limit gives the process its own limit back
    assert write(c / "numfiles.max", b"max") == 0
    wait_for(lambda: resource.prlimit(h.pid, resource.RLIMIT_NOFILE) == original, timeout=30)
    assert h.ask("open 5") == ["ok"]
    assert current(c) == limit + 5


def test_members_share_the_limit(nf, holders):
    c = nf / "c"
    os.mkdir(c)
    h1, h2 = holders(), holders()
    for h in (h1, h2):
        assert write(c / "cgroup.procs", str(h.pid).encode()) == 0
    start = current(c)
    limit = start + 30
    assert write(c / "numfiles.max", str(limit).encode()) == 0
    wait_for(
        lambda: all(resource.prlimit(h.pid, resource.RLIMIT_NOFILE)[0] < 1000 for h in (h1, h2)),
        timeout=30,
    )
    assert h1.ask("fill") == ["refused", str(errno.EMFILE)]
    assert h2.ask("fill") == ["refused", str(errno.EMFILE)]
    # equal shares, rebalanced as they are used: never above max, short of it by
    # at most what rounding and a rebalance between the two fills left unhanded
    assert start < current(c) <= limit


def test_limit_of_an_ancestor_applies_and_moving_out_restores(nf, holders):
    a, b = nf / "a", nf / "a" / "b"
    os.makedirs(b)
    h = holders()
    original = resource.prlimit(h.pid, resource.RLIMIT_NOFILE)
    assert write(b / "cgroup.procs", str(h.pid).encode()) == 0
    limit = current(b) + 10
    assert write(a / "numfiles.max", str(limit).encode()) == 0
    wait_for(lambda: resource.prlimit(h.pid, resource.RLIMIT_NOFILE) != original, timeout=30)
    assert h.ask("fill") == ["refused", str(errno.EMFILE)]
    assert current(a) == limit
    # the event is counted where the process is
    wait_for(lambda: (b / "numfiles.events").read_text() == "max 1\n", timeout=30)
    assert (a / "numfiles.events").read_text() == "max 0\n"
    assert write(nf / "cgroup.procs", str(h.pid).encode()) == 0
    wait_for(lambda: resource.prlimit(h.pid, resource.RLIMIT_NOFILE) == original, timeout=30)


def test_a_lower_limit_than_the_count_stops_every_open(nf, holders):
    c = nf / "c"
    os.mkdir(c)
    h = holders()
    assert h.ask("open 10") == ["ok"]
    assert write(c / "cgroup.procs", str(h.pid).encode()) == 0
    held = current(c)
    assert write(c / "numfiles.max", b"2") == 0
    wait_for(lambda: (c / "numfiles.events").read_text() == "max 1\n", timeout=30)
    assert h.ask("fill") == ["refused", str(errno.EMFILE)]
    # nothing is taken away, and nothing more was handed out
    assert current(c) == held


def test_a_clamp_survives_a_daemon_crash_and_is_given_back(cfs, nf, holders):
    """The clamp set is journaled: a new daemon knows the clamp is not the process's own."""
    c = nf / "c"
    os.mkdir(c)
    h = holders()
    original = resource.prlimit(h.pid, resource.RLIMIT_NOFILE)
    assert write(c / "cgroup.procs", str(h.pid).encode()) == 0
    assert write(c / "numfiles.max", str(current(c) + 10).encode()) == 0
    wait_for(lambda: resource.prlimit(h.pid, resource.RLIMIT_NOFILE) != original, timeout=30)
    clamped = resource.prlimit(h.pid, resource.RLIMIT_NOFILE)
    limit = (c / "numfiles.max").read_text()
    crash(cfs)
    assert resource.prlimit(h.pid, resource.RLIMIT_NOFILE) == clamped  # nobody gave it back
    cfs.start()
    wait_for(lambda: served(nf), timeout=10)
    assert (c / "numfiles.max").read_text() == limit
    assert write(c / "numfiles.max", b"max") == 0
    wait_for(lambda: resource.prlimit(h.pid, resource.RLIMIT_NOFILE) == original, timeout=30)
    assert h.ask("open 5") == ["ok"]
