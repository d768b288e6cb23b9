"""cpuset on real mounts: the kernel's files, rules and errno, and real CPU affinity."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from containerfs.core.parse import parse_id_list
from containerfs.subsys import cpuset, sysinfo
from tests.conftest import wait_for, write

pytestmark = pytest.mark.skipif(
    len(sysinfo.online_cpus()) < 2, reason="cpuset affinity tests need two online CPUs"
)

CPUS = sorted(sysinfo.online_cpus())
ALL = ",".join(map(str, CPUS))
FIRST, SECOND = CPUS[0], CPUS[1]
NR_CPU_IDS = sysinfo.nr_cpu_ids()

CHILD_FILES = {
    "cpus",
    "mems",
    "effective_cpus",
    "effective_mems",
    "cpu_exclusive",
    "mem_exclusive",
    "mem_hardwall",
    "sched_load_balance",
    "sched_relax_domain_level",
    "memory_migrate",
    "memory_pressure",
    "memory_spread_page",
    "memory_spread_slab",
}

#: A process that reports its threads and, on request, starts a thread or forks a child.
WORKER = r"""
import os, sys, threading, time
def idle():
    while True:
        time.sleep(100)
tids = []
for _ in range(2):
    t = threading.Thread(target=idle, daemon=True); t.start(); tids.append(t.native_id)
print(" ".join(map(str, tids)), flush=True)
for line in sys.stdin:
    if line.startswith("thread"):
        t = threading.Thread(target=idle, daemon=True); t.start()
        print(t.native_id, flush=True)
    elif line.startswith("fork"):
        pid = os.fork()
        if pid == 0:
            time.sleep(100); os._exit(0)
        print(pid, flush=True)
    elif line.startswith("widen"):
        # report the widened mask as the kernel holds it: the daemon's audit may clip it
        # back between a call and a read, so set it again until a read shows it
        wide = set(range(os.cpu_count() or 1)) & set(map(int, line.split()[1:]))
        for _ in range(1000):
            os.sched_setaffinity(0, wide)
            if os.sched_getaffinity(0) == wide:
                break
        print(",".join(map(str, sorted(os.sched_getaffinity(0)))), flush=True)
"""

#: A process with many threads (more than a move enforces before its write returns).
MANY_THREADS = r"""
import sys, threading, time
threading.stack_size(1 << 16)
for _ in range(int(sys.argv[1])):
    threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()
print(flush=True)
time.sleep(1000)
"""


def allowed(tid: int) -> frozenset[int]:
    return frozenset(os.sched_getaffinity(tid))


def status_cpus(pid: int) -> str:
    with open(f"/proc/{pid}/status") as f:
        lines = f.read().splitlines()
    for line in lines:
        if line.startswith("Cpus_allowed_list:"):
            return line.split()[1]
    raise AssertionError("no Cpus_allowed_list")


class Worker:
    def __init__(self, procs) -> None:
        self.proc = procs.spawn(
            sys.executable,
            "-c",
            WORKER,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        self.threads = [int(x) for x in self.proc.stdout.readline().split()]

    def ask(self, what: str) -> str:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def all_tids(self) -> list[int]:
        return sorted(int(t) for t in os.listdir(f"/proc/{self.pid}/task"))


@pytest.fixture
def cs(cfs):
    return cfs.mount("cpuset,name=cs")


def mkset(parent, name: str, cpus: str, mems: str = "0"):
    path = parent / name
    os.mkdir(path)
    assert write(path / "cpuset.cpus", cpus.encode()) == 0
    assert write(path / "cpuset.mems", mems.encode()) == 0
    return path


def test_files_and_defaults(cs):
    names = {n for n in os.listdir(cs) if n.startswith("cpuset.")}
    assert names == {f"cpuset.{n}" for n in CHILD_FILES} | {"cpuset.memory_pressure_enabled"}
    assert (cs / "cpuset.cpus").read_text() == sysinfo_list(sysinfo.online_cpus())
    assert (cs / "cpuset.effective_cpus").read_text() == (cs / "cpuset.cpus").read_text()
    assert (cs / "cpuset.mems").read_text() == sysinfo_list(sysinfo.memory_nodes())
    assert (cs / "cpuset.cpu_exclusive").read_text() == "1\n"
    assert (cs / "cpuset.mem_exclusive").read_text() == "1\n"
    assert (cs / "cpuset.sched_relax_domain_level").read_text() == "-1\n"
    assert oct(os.stat(cs / "cpuset.effective_cpus").st_mode & 0o777) == "0o444"
    assert oct(os.stat(cs / "cpuset.memory_pressure").st_mode & 0o777) == "0o444"
    os.mkdir(cs / "a")
    names = {n for n in os.listdir(cs / "a") if n.startswith("cpuset.")}
    assert names == {f"cpuset.{n}" for n in CHILD_FILES}
    for empty in ("cpus", "mems", "effective_cpus", "effective_mems"):
        assert (cs / "a" / f"cpuset.{empty}").read_text() == "\n"
    for flag, value in {
        "cpu_exclusive": "0",
        "mem_exclusive": "0",
        "mem_hardwall": "0",
        "memory_migrate": "0",
        "memory_spread_page": "0",
        "memory_spread_slab": "0",
        "sched_load_balance": "1",
        "memory_pressure": "0",
    }.items():
        assert (cs / "a" / f"cpuset.{flag}").read_text() == value + "\n", flag


def sysinfo_list(ids) -> str:
    from containerfs.core.parse import format_id_list

    return format_id_list(ids) + "\n"


def test_noprefix(cfs):
    view = cfs.mount("cpuset,noprefix,name=np")
    assert {"cpus", "mems", "cpu_exclusive", "memory_pressure_enabled"} <= set(os.listdir(view))
    assert not any(n.startswith("cpuset.") for n in os.listdir(view))
    os.mkdir(view / "a")
    assert write(view / "a" / "cpus", b"0") == 0
    assert (view / "a" / "cpus").read_text() == "0\n"


def test_list_formats(cs):
    os.mkdir(cs / "a")
    for data, shown in [
        (f"{SECOND},{FIRST},{SECOND}", f"{FIRST}-{SECOND}"),
        (f" {FIRST}\n", f"{FIRST}"),
        ("all", f"{FIRST}-{SECOND}" if len(CPUS) == 2 else ALL),
        ("\n", ""),
        (f"{FIRST}-{SECOND}:1/2", f"{FIRST}"),
    ]:
        assert write(cs / "a" / "cpuset.cpus", data.encode()) == 0, data
        assert (cs / "a" / "cpuset.cpus").read_text() == shown + "\n", data
        assert (cs / "a" / "cpuset.effective_cpus").read_text() == shown + "\n"


def test_attach_into_empty_cpuset_is_enospc(cs, procs):
    os.mkdir(cs / "a")
    p = procs.sleeper()
    assert write(cs / "a" / "tasks", str(p.pid).encode()) == errno.ENOSPC
    assert write(cs / "a" / "cpuset.cpus", str(FIRST).encode()) == 0
    assert write(cs / "a" / "cgroup.procs", str(p.pid).encode()) == errno.ENOSPC
    assert write(cs / "a" / "cpuset.mems", b"0") == 0
    assert write(cs / "a" / "tasks", str(p.pid).encode()) == 0
    assert (cs / "a" / "tasks").read_text() == f"{p.pid}\n"


def test_affinity_of_task_threads_and_later_children(cs, procs):
    a = mkset(cs, "a", str(SECOND))
    w = Worker(procs)
    assert write(a / "cgroup.procs", str(w.pid).encode()) == 0
    for tid in w.all_tids():
        assert allowed(tid) == {SECOND}, tid
    assert status_cpus(w.pid) == str(SECOND)
    new_thread = int(w.ask("thread"))
    assert allowed(new_thread) == {SECOND}
    child = int(w.ask("fork"))
    try:
        assert status_cpus(child) == str(SECOND)
        wait_for(lambda: child in [int(x) for x in (a / "tasks").read_text().split()], 20)
        # a change of the cpuset's CPUs reaches every member, the later ones too
        assert write(a / "cpuset.cpus", str(FIRST).encode()) == 0
        for tid in [*w.all_tids(), child]:
            assert allowed(tid) == {FIRST}, tid
    finally:
        os.kill(child, 9)


def test_widened_affinity_is_clipped_back(cs, procs):
    a = mkset(cs, "a", str(FIRST))
    w = Worker(procs)
    assert write(a / "tasks", str(w.pid).encode()) == 0
    assert allowed(w.pid) == {FIRST}
    # userspace cannot stop this (the worker saw the wide mask in force) ...
    assert w.ask(f"widen {ALL.replace(',', ' ')}") == ALL
    wait_for(lambda: allowed(w.pid) == {FIRST}, 20)  # ... but the audit clips it back
    # moving the thread back to the root gives it its own request (all CPUs) again
    assert write(cs / "tasks", str(w.pid).encode()) == 0
    assert allowed(w.pid) == set(CPUS)


def test_task_keeps_its_own_affinity_inside_the_cpuset(cs, procs):
    a = mkset(cs, "a", ALL)
    b = mkset(cs, "b", str(FIRST))
    p = procs.spawn("taskset", "-c", str(SECOND), "sleep", "1000")
    wait_for(lambda: allowed(p.pid) == {SECOND}, 10)
    assert write(a / "tasks", str(p.pid).encode()) == 0
    assert allowed(p.pid) == {SECOND}  # its request lies inside: kept
    assert write(b / "tasks", str(p.pid).encode()) == 0
    assert allowed(p.pid) == {FIRST}  # nothing of it inside: the whole cpuset
    assert write(a / "tasks", str(p.pid).encode()) == 0
    assert allowed(p.pid) == {SECOND}  # the request was remembered


def test_large_moves_and_changes_are_enforced(cs, procs):
    """Over INLINE_MAX threads the daemon's loop sets the masks: after every move and
    change, and back in the root too, where the process gets every CPU again."""
    a = mkset(cs, "a", str(FIRST))
    b = mkset(cs, "b", str(SECOND))
    n = cpuset.INLINE_MAX + 44
    p = procs.spawn(sys.executable, "-c", MANY_THREADS, str(n), stdout=subprocess.PIPE)
    p.stdout.readline()
    tids = [int(t) for t in os.listdir(f"/proc/{p.pid}/task")]
    assert len(tids) == n + 1

    def all_on(cpus) -> bool:
        return all(allowed(tid) == set(cpus) for tid in tids)

    assert write(a / "cgroup.procs", str(p.pid).encode()) == 0
    wait_for(lambda: all_on({FIRST}), 20)
    assert write(b / "cgroup.procs", str(p.pid).encode()) == 0
    wait_for(lambda: all_on({SECOND}), 20)
    assert write(b / "cpuset.cpus", str(FIRST).encode()) == 0
    wait_for(lambda: all_on({FIRST}), 20)
    assert write(cs / "cgroup.procs", str(p.pid).encode()) == 0
    wait_for(lambda: all_on(CPUS), 20)


def test_root_cpus_and_mems_are_read_only(cs):
    before = (cs / "cpuset.cpus").read_text()
    assert write(cs / "cpuset.cpus", str(FIRST).encode()) == errno.EACCES
    assert write(cs / "cpuset.mems", b"0") == errno.EACCES
    assert write(cs / "cpuset.cpus", b"junk") == errno.EACCES
    assert (cs / "cpuset.cpus").read_text() == before


@pytest.mark.parametrize(
    "data, err",
    [
        (b"abc", errno.EINVAL),
        (b"1-0", errno.EINVAL),
        (b"0-", errno.EINVAL),
        (b"-1", errno.EINVAL),
        (b"0x1", errno.EINVAL),
        (b"+0", errno.EINVAL),
        (b"0,,", 0),
        (str(NR_CPU_IDS).encode(), errno.ERANGE),
        (b"4096", errno.ERANGE),
        (b"99999999999", errno.EOVERFLOW),
        (b"0-1:0/0", errno.EINVAL),
        (b"0" * (100 + 6 * sysinfo.nr_cpus_config() + 1), errno.E2BIG),
    ],
)
def test_cpus_parse_errors(cs, data, err):
    os.mkdir(cs / "a")
    assert write(cs / "a" / "cpuset.cpus", str(SECOND).encode()) == 0
    assert write(cs / "a" / "cpuset.cpus", data) == err
    if err:
        assert (cs / "a" / "cpuset.cpus").read_text() == f"{SECOND}\n"


def test_mems_errors(cs, procs):
    os.mkdir(cs / "a")
    assert write(cs / "a" / "cpuset.mems", b"0") == 0
    bad_node = max(sysinfo.memory_nodes()) + 1
    assert write(cs / "a" / "cpuset.mems", str(bad_node).encode()) == errno.EINVAL
    assert write(cs / "a" / "cpuset.mems", str(sysinfo.max_numnodes()).encode()) == errno.ERANGE
    assert write(cs / "a" / "cpuset.mems", b"x") == errno.EINVAL
    big = b"0" * (100 + 6 * sysinfo.max_numnodes() + 1)
    assert write(cs / "a" / "cpuset.mems", big) == errno.E2BIG
    assert (cs / "a" / "cpuset.mems").read_text() == "0\n"


def test_hierarchy_rules_and_errno(cs, procs):
    a = mkset(cs, "a", ALL)
    b = mkset(a, "b", str(SECOND))
    # a CPU that is online but not in the parent
    assert write(a / "cpuset.cpus", str(FIRST).encode()) == errno.EBUSY  # child b not a subset
    assert write(b / "cpuset.cpus", ALL.encode()) == 0
    assert write(a / "cpuset.cpus", str(FIRST).encode()) == errno.EBUSY
    assert write(b / "cpuset.cpus", str(SECOND).encode()) == 0
    c = mkset(cs, "c", str(FIRST))
    d = c / "d"
    os.mkdir(d)
    assert write(d / "cpuset.cpus", str(SECOND).encode()) == errno.EACCES  # not in parent
    # emptying a populated cpuset is ENOSPC; an empty one may be emptied
    p = procs.sleeper()
    assert write(b / "tasks", str(p.pid).encode()) == 0
    assert write(b / "cpuset.cpus", b"\n") == errno.ENOSPC
    assert write(b / "cpuset.mems", b"\n") == errno.ENOSPC
    assert write(a / "cpuset.cpus", ALL.encode()) == 0  # equal: nothing checked
    assert (b / "cpuset.cpus").read_text() == f"{SECOND}\n"
    assert write(cs / "tasks", str(p.pid).encode()) == 0
    wait_for(lambda: (b / "tasks").read_text() == "", 10)
    assert write(b / "cpuset.cpus", b"\n") == 0
    # ENOSPC also counts tasks of descendants
    assert write(b / "cpuset.cpus", str(SECOND).encode()) == 0
    assert write(b / "tasks", str(p.pid).encode()) == 0
    assert write(a / "cpuset.mems", b"") == 0  # a 0-byte write does nothing
    assert write(a / "cpuset.mems", b"\n") == errno.EBUSY  # child b has mems


def test_exclusive_rules(cs):
    a = mkset(cs, "a", str(FIRST))
    b = mkset(cs, "b", str(SECOND))
    assert write(a / "cpuset.cpu_exclusive", b"1") == 0
    assert write(b / "cpuset.cpus", ALL.encode()) == errno.EINVAL  # overlaps exclusive a
    assert write(b / "cpuset.cpu_exclusive", b"1") == 0
    assert write(a / "cpuset.cpus", ALL.encode()) == errno.EINVAL
    # a child may be exclusive only if its parent is; the parent may not drop it then
    ca = a / "x"
    os.mkdir(ca)
    assert write(ca / "cpuset.cpus", str(FIRST).encode()) == 0
    assert write(ca / "cpuset.cpu_exclusive", b"1") == 0
    assert write(a / "cpuset.cpu_exclusive", b"0") == errno.EBUSY
    cb = b / "y"
    os.mkdir(cb)
    assert write(b / "cpuset.cpu_exclusive", b"0") == 0
    assert write(cb / "cpuset.cpu_exclusive", b"1") == errno.EACCES
    assert (cb / "cpuset.cpu_exclusive").read_text() == "0\n"
    # mems: both siblings on node 0, so neither may become mem_exclusive
    assert write(a / "cpuset.mem_exclusive", b"1") == errno.EINVAL


@pytest.mark.parametrize(
    "data, err",
    [
        (b" 1", errno.EINVAL),
        (b"1 ", errno.EINVAL),
        (b"1\n\n", errno.EINVAL),
        (b"-1", errno.EINVAL),
        (b"x", errno.EINVAL),
        (b"\n", errno.EINVAL),
        (b"18446744073709551616", errno.ERANGE),
        (b"0x", errno.EINVAL),
        (b"08", errno.EINVAL),
        (b"1" * 4097, errno.E2BIG),
    ],
)
def test_flag_parse_errors(cs, data, err):
    os.mkdir(cs / "a")
    for flag in ("mem_hardwall", "memory_migrate", "memory_spread_page", "sched_load_balance"):
        before = (cs / "a" / f"cpuset.{flag}").read_text()
        assert write(cs / "a" / f"cpuset.{flag}", data) == err, flag
        assert (cs / "a" / f"cpuset.{flag}").read_text() == before
    assert write(cs / "cpuset.memory_pressure_enabled", data) == err


def test_flags_accept_any_nonzero(cs):
    os.mkdir(cs / "a")
    assert write(cs / "a" / "cpuset.memory_migrate", b"0x10\n") == 0
    assert (cs / "a" / "cpuset.memory_migrate").read_text() == "1\n"
    assert write(cs / "a" / "cpuset.memory_spread_page", b"+7") == 0
    assert write(cs / "cpuset.memory_pressure_enabled", b"1") == 0
    assert (cs / "cpuset.memory_pressure_enabled").read_text() == "1\n"
    assert write(cs / "a" / "cpuset.memory_pressure", b"0") == errno.EINVAL
    assert write(cs / "a" / "cpuset.effective_cpus", b"0") == errno.EINVAL
    # spread flags are inherited at mkdir
    os.mkdir(cs / "a" / "b")
    assert (cs / "a" / "b" / "cpuset.memory_spread_page").read_text() == "1\n"


def test_relax_domain_level(cs):
    os.mkdir(cs / "a")
    f = cs / "a" / "cpuset.sched_relax_domain_level"
    top = cpuset._domain_level_max() + 1
    assert write(f, b"1") == 0 and f.read_text() == "1\n"
    assert write(f, str(top).encode()) == 0 and f.read_text() == f"{top}\n"
    assert write(f, b"-1\n") == 0 and f.read_text() == "-1\n"
    for data, err in [
        (str(top + 1).encode(), errno.EINVAL),
        (b"-2", errno.EINVAL),
        (b"1000", errno.EINVAL),
        (b" 1", errno.EINVAL),
        (b"--1", errno.EINVAL),
        (b"9223372036854775808", errno.ERANGE),
    ]:
        assert write(f, data) == err, data
    assert f.read_text() == "-1\n"


def test_clone_children(cs):
    a = mkset(cs, "a", ALL)
    assert write(a / "cgroup.clone_children", b"1") == 0
    os.mkdir(a / "b")
    assert (a / "b" / "cpuset.cpus").read_text() == (a / "cpuset.cpus").read_text()
    assert (a / "b" / "cpuset.mems").read_text() == "0\n"
    assert (a / "b" / "cpuset.cpu_exclusive").read_text() == "0\n"
    # an exclusive child of the parent stops the copy
    assert write(a / "cpuset.cpu_exclusive", b"1") == 0
    assert write(a / "b" / "cpuset.cpus", str(FIRST).encode()) == 0
    assert write(a / "b" / "cpuset.cpu_exclusive", b"1") == 0
    os.mkdir(a / "c")
    assert (a / "c" / "cpuset.cpus").read_text() == "\n"


def test_daemon_survives_junk(cfs, cs):
    os.mkdir(cs / "a")
    for name in CHILD_FILES:
        write(cs / "a" / f"cpuset.{name}", b"\xff\x00junk" * 10)
    assert cfs.daemon_alive()
    assert (cs / "a" / "cpuset.cpus").read_text() == "\n"


#: Finds the largest sched_relax_domain_level the kernel accepts, on a real v1 cpuset in a
#: private mount namespace. The probe cpuset has no CPUs, so no write rebuilds any domain.
KERNEL_PROBE = r"""
d=$(mktemp -d) || exit 1
mount -t cgroup -o cpuset none "$d" 2>/dev/null || { rmdir "$d"; exit 3; }
p="$d/containerfs-probe-$$"
mkdir "$p" || { umount "$d"; rmdir "$d"; exit 3; }
top=-1
for v in 0 1 2 3 4 5 6 7 8 9 10 11 12; do
    echo $v > "$p/cpuset.sched_relax_domain_level" 2>/dev/null && top=$v
done
echo $top
rmdir "$p"; umount "$d"; rmdir "$d"
"""


def test_relax_domain_level_bound_is_the_kernels(cs):
    """Where a real v1 cpuset can be mounted, the same values are accepted as by it."""
    probe = subprocess.run(["unshare", "-m", "sh", "-c", KERNEL_PROBE],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip("no kernel v1 cpuset to compare with")
    kernel_top = int(probe.stdout)
    os.mkdir(cs / "a")
    f = cs / "a" / "cpuset.sched_relax_domain_level"
    assert write(f, str(kernel_top).encode()) == 0
    assert write(f, str(kernel_top + 1).encode()) == errno.EINVAL


def _level(cpus: dict[int, str]) -> dict[int, frozenset[int]]:
    """One topology level: CPU -> the CPUs sharing it, from "0-1" style lists."""
    return {cpu: parse_id_list(mask.encode(), 64) for cpu, mask in cpus.items()}


@pytest.mark.parametrize(
    "cpu_map, levels, expected",
    [
        # 2 cores, one LLC, no SMT: SMT {0}, CLS {0}, MC {0,1} spans all: levels 0..2
        (
            "0-1",
            [{0: "0", 1: "1"}, {0: "0", 1: "1"}, {0: "0-1", 1: "0-1"}, {0: "0-1", 1: "0-1"}],
            2,
        ),
        # SMT siblings already span everything: the build stops at level 0
        ("0-1", [{0: "0-1", 1: "0-1"}, {0: "0-1", 1: "0-1"}], 0),
        # two LLCs in one package: MC stops short, PKG is level 3
        (
            "0-3",
            [
                {0: "0", 1: "1", 2: "2", 3: "3"},
                {0: "0", 1: "1", 2: "2", 3: "3"},
                {0: "0-1", 1: "0-1", 2: "2-3", 3: "2-3"},
                {0: "0-3", 1: "0-3", 2: "0-3", 3: "0-3"},
            ],
            3,
        ),
        # CPUs 2-3 isolated: the domain CPUs are 0-1, and MC spans them
        (
            "0-1",
            [
                {0: "0", 1: "1"},
                {0: "0", 1: "1"},
                {0: "0-3", 1: "0-3"},
                {0: "0-3", 1: "0-3"},
            ],
            2,
        ),
        # one CPU: no domain has a child, sched_domain_level_max stays 0
        ("0", [{0: "0"}, {0: "0"}, {0: "0"}], 0),
    ],
)
def test_sched_domain_level_max_follows_the_kernels_build(cpu_map, levels, expected):
    cpus = parse_id_list(cpu_map.encode(), 64)
    assert cpuset.built_level_max(cpus, [_level(lv) for lv in levels]) == expected
