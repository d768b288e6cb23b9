"""Bad input: random bytes of random lengths, written by several writers at once.

Every writable control file of a hierarchy gets them. After every step the
daemon still answers, every error was one the spec allows for that file, and
"every live task is in exactly one container of every hierarchy" holds.

Two hierarchies are fuzzed, with two different safety rules:
- the core files, on a hierarchy with no subsystems: fully random bytes, so a
  random number may move any task of the machine (pid 1, the test itself):
  harmless there, since such a hierarchy only groups.
- the files of every available subsystem, bound together: those enforce
  (affinity, freezing, limits), so `tasks` and `cgroup.procs` only ever name
  the test's own sandbox processes, and the root's files (which would reach
  every task of the machine) are left out.
release_agent's random bytes always follow a prefix naming a directory that
does not exist, so no random agent can ever be executed.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from containerfs.core.parse import ParseError, parse_pid
from containerfs.subsys import AVAILABLE
from tests.conftest import read_ids

AGENT_PREFIX = b"/nonexistent-containerfs-fuzz/"
PID_FILES = ("tasks", "cgroup.procs")
#: the errno values the spec allows, by file (section 3.4 for all: E2BIG past the limit)
CORE_ERRNO = {
    "tasks": {errno.EINVAL, errno.ESRCH, errno.E2BIG},
    "cgroup.procs": {errno.EINVAL, errno.ESRCH, errno.E2BIG},
    "notify_on_release": {errno.EINVAL, errno.ERANGE, errno.E2BIG},
    "cgroup.clone_children": {errno.EINVAL, errno.ERANGE, errno.E2BIG},
    "release_agent": {errno.E2BIG},
}
#: section 7: subsystem files parse numbers and lists (EINVAL, ERANGE, EOVERFLOW),
#: check rules (EACCES, EBUSY, ENOSPC, EPERM) and limits (E2BIG)
SUBSYS_ERRNO = {
    errno.EINVAL,
    errno.ERANGE,
    errno.EOVERFLOW,
    errno.E2BIG,
    errno.EACCES,
    errno.EBUSY,
    errno.ENOSPC,
    errno.EPERM,
}
#: a move into a subsystem hierarchy may also be vetoed (cpuset with no CPUs: ENOSPC)
SUBSYS_PID_ERRNO = {errno.EINVAL, errno.ESRCH, errno.E2BIG, errno.ENOSPC, errno.EBUSY}

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def random_bytes() -> st.SearchStrategy[bytes]:
    """Short junk, long junk around the 4 KiB limit, and number-like text."""
    numbers = st.integers(min_value=-(2**70), max_value=2**70).map(lambda i: str(i).encode())
    return st.one_of(
        st.binary(max_size=24),
        st.binary(min_size=4000, max_size=4200),
        numbers,
        st.tuples(st.sampled_from([b"", b" ", b"+", b"0x", b"0"]), numbers).map(b"".join),
        st.sampled_from([b"0", b"1", b"\n", b" 1", b"1\n", b"1\n\n", b"0x10", b"010", b"08"]),
        st.sampled_from([b"max", b"FROZEN", b"THAWED", b"0-1", b"0,1", b"1-0", b"0-1000000"]),
    )


def writable_files(view: Path, include_root: bool = True) -> list[Path]:
    """Every control file with a write bit, in every container of the view."""
    found = []
    for dirpath, _dirs, files in os.walk(view):
        if not include_root and Path(dirpath) == view:
            continue
        for name in sorted(files):
            path = Path(dirpath) / name
            if os.stat(path).st_mode & stat.S_IWUSR:
                found.append(path)
    return found


def one_write(path: Path, data: bytes) -> int:
    """open, one write(2), close; 0 or the errno."""
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError as exc:
        return exc.errno or -1
    try:
        os.write(fd, data)
        return 0
    except OSError as exc:
        return exc.errno or -1
    finally:
        os.close(fd)


def concurrently(writes: list[tuple[Path, bytes]]) -> list[int]:
    """All writes at once, one thread each, released together by a barrier."""
    results = [0] * len(writes)
    barrier = threading.Barrier(len(writes))

    def writer(i: int) -> None:
        barrier.wait()
        results[i] = one_write(*writes[i])

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(writes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "a write never returned"
    return results


def live_tasks() -> dict[int, int]:
    """tid -> start time of every live (non-zombie) thread of the machine."""
    tasks = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except (FileNotFoundError, ProcessLookupError):
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if fields[0] not in ("Z", "X"):
                tasks[int(tid)] = int(fields[19])
    return tasks


def check_every_task_in_exactly_one_container(view: Path) -> None:
    """No task listed twice; every task alive throughout the check listed once.

    Tasks of the whole machine come and go meanwhile, so only those alive
    (with the same start time) both before and after the listing are held to
    "listed"; "never listed twice" holds for all.
    """
    before = live_tasks()
    seen: Counter[int] = Counter()
    for dirpath, _dirs, _files in os.walk(view):
        seen.update(read_ids(Path(dirpath) / "tasks"))
    after = live_tasks()
    twice = sorted(t for t, n in seen.items() if n > 1)
    assert twice == [], f"tasks listed in two containers: {twice}"
    stable = {t for t, start in before.items() if after.get(t) == start}
    missing = sorted(stable - seen.keys())
    assert missing == [], f"live tasks in no container: {missing}"


def sandbox_tree(view: Path, procs, sandbox: set[int]) -> None:
    """Containers a and a/b, each holding sandbox sleepers."""
    (view / "a" / "b").mkdir(parents=True)
    for container in (view / "a", view / "a" / "b"):
        # a new cpuset has no CPUs and no nodes, and takes no task until given some
        for name in ("cpuset.cpus", "cpuset.mems"):
            if (view / name).exists():
                assert one_write(container / name, (view / name).read_bytes()) == 0
        for _ in range(2):
            proc = procs.sleeper()
            sandbox.add(proc.pid)
            assert one_write(container / "tasks", str(proc.pid).encode()) == 0


def test_random_writes_to_core_files(cfs, procs):
    view = cfs.mount("none,name=fuzz")
    sandbox: set[int] = set()
    sandbox_tree(view, procs, sandbox)
    files = writable_files(view)
    assert {f.name for f in files} == set(CORE_ERRNO)

    def data_for(path: Path, data: bytes) -> bytes:
        return AGENT_PREFIX + data if path.name == "release_agent" else data

    step = st.lists(st.tuples(st.sampled_from(files), random_bytes()), min_size=1, max_size=4)

    @SETTINGS
    @given(steps=st.lists(step, min_size=1, max_size=3))
    def run(steps):
        for writes in steps:
            writes = [(path, data_for(path, data)) for path, data in writes]
            results = concurrently(writes)
            for (path, data), rc in zip(writes, results, strict=True):
                assert rc == 0 or rc in CORE_ERRNO[path.name], (
                    f"{path.relative_to(view)} <- {data[:40]!r}...({len(data)} bytes): "
                    f"{errno.errorcode.get(rc, rc)}"
                )
            assert cfs.daemon_alive()
            check_every_task_in_exactly_one_container(view)

    run()
    agent = (view / "release_agent").read_bytes()
    assert agent == b"\n" or agent.startswith(AGENT_PREFIX)


def sandboxed(sandbox: set[int]) -> st.SearchStrategy[bytes]:
    """Random bytes for tasks and cgroup.procs that never name a task outside the sandbox.

    The kernel's own parser decides what a write names; `0` (the writer) is
    outside too.
    """
    pids = sorted(sandbox)

    def safe(data: bytes) -> bool:
        if len(data) > 4096:
            return True  # refused with E2BIG before it is parsed
        try:
            return parse_pid(data) in sandbox
        except ParseError:
            return True

    own = st.tuples(
        st.sampled_from([b"", b" ", b"+", b"\n"]),
        st.sampled_from(pids).map(lambda p: str(p).encode()),
        st.sampled_from([b"", b"\n", b" ", b"\n\n", b"x"]),
    ).map(b"".join)
    return st.one_of(own, random_bytes()).filter(safe)


@pytest.mark.skipif(not AVAILABLE, reason="no subsystem is available yet")
def test_random_writes_to_subsystem_files(cfs, procs):
    # ns has no writable file, and its attach rule (only into an empty child of
    # the task's container) does not fit the sandbox tree: it has tests of its own
    names = ",".join(cls.name for cls in AVAILABLE if cls.name != "ns")
    view = cfs.mount(names)
    sandbox: set[int] = set()
    sandbox_tree(view, procs, sandbox)
    files = writable_files(view, include_root=False)
    assert any(f.name not in CORE_ERRNO for f in files), "no subsystem file to fuzz"

    def allowed(path: Path) -> set[int]:
        if path.name in PID_FILES:
            return SUBSYS_PID_ERRNO
        return CORE_ERRNO.get(path.name, SUBSYS_ERRNO)

    def data_strategy(path: Path) -> st.SearchStrategy[bytes]:
        return sandboxed(sandbox) if path.name in PID_FILES else random_bytes()

    write_st = st.sampled_from(files).flatmap(lambda p: st.tuples(st.just(p), data_strategy(p)))
    step = st.lists(write_st, min_size=1, max_size=4)

    @SETTINGS
    @given(steps=st.lists(step, min_size=1, max_size=3))
    def run(steps):
        for writes in steps:
            results = concurrently(writes)
            for (path, data), rc in zip(writes, results, strict=True):
                assert rc == 0 or rc in allowed(path), (
                    f"{path.relative_to(view)} <- {data[:40]!r}...({len(data)} bytes): "
                    f"{errno.errorcode.get(rc, rc)}"
                )
            assert cfs.daemon_alive()
            check_every_task_in_exactly_one_container(view)

    run()
