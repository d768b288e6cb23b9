"""The seeds' ns and virt subsystems, with real processes and real mounts."""

from __future__ import annotations

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import read_ids, wait_for, write
from tests.integration.test_persistence import crash, served


def test_ns_attach_only_into_an_empty_child(cfs, procs):
    view = cfs.mount("ns")
    assert set(os.listdir(view)) >= {"tasks", "ns.namespaces"}
    os.makedirs(view / "a" / "b")
    os.mkdir(view / "c")
    first, second = procs.sleeper(), procs.sleeper()
    assert write(view / "a" / "b" / "tasks", str(first.pid).encode()) == errno.EPERM
    assert write(view / "a" / "tasks", str(first.pid).encode()) == 0  # empty child of its own
    assert write(view / "a" / "tasks", str(second.pid).encode()) == errno.EPERM  # not empty
    assert write(view / "c" / "tasks", str(first.pid).encode()) == errno.EPERM  # not its child
    assert write(view / "tasks", str(first.pid).encode()) == errno.EPERM  # not back up either
    assert write(view / "a" / "b" / "tasks", str(first.pid).encode()) == 0
    assert read_ids(view / "a" / "b" / "tasks") == [first.pid]


def test_ns_new_namespaces_get_their_own_child(cfs, procs):
    view = cfs.mount("ns")
    mine = dict(line.split(" ", 1) for line in (view / "ns.namespaces").read_text().splitlines())
    boxed = procs.spawn("unshare", "--uts", "--ipc", "sleep", "1000")
    clone = view / f"ns-{boxed.pid}"
    wait_for(lambda: clone.is_dir() and read_ids(clone / "tasks") == [boxed.pid], timeout=10)
    assert boxed.pid not in read_ids(view / "tasks")
    theirs = dict(line.split(" ", 1) for line in (clone / "ns.namespaces").read_text().splitlines())
    assert theirs["uts"] != mine["uts"].split()[0] and theirs["ipc"] != mine["ipc"].split()[0]
    assert theirs["net"] in mine["net"].split()  # the namespaces it kept
    boxed.kill()
    boxed.wait()
    wait_for(lambda: not clone.exists(), timeout=10)  # the clone removes itself when empty


def test_virt_lock_makes_a_container_the_root_of_views_mounted_inside(cfs, workdir):
    view = cfs.mount("virt,name=v")
    os.makedirs(view / "box" / "inner")
    assert (view / "box" / "virt.lock").read_bytes() == b"0\n"
    assert write(view / "box" / "virt.lock", b" 1") == errno.EINVAL  # kstrtoull rules
    assert write(view / "box" / "virt.lock", b"1") == 0
    inside = workdir / "inside"
    inside.mkdir()
    script = f"""
echo $$ > {view}/box/tasks
{sys.executable} -m containerfs --runtime-dir {cfs.rt} x {inside} -o virt,name=v
ls {inside}; cat {inside}/tasks; echo shell $$
"""
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    words = out.stdout.split()
    shell = words[words.index("shell") + 1]
    assert "inner" in words and "box" not in words  # box is the view's root
    assert shell in words[: words.index("shell")]  # its tasks file is box's
    os.mkdir(inside / "made-inside")
    assert (view / "box" / "made-inside").is_dir()
    outside = cfs.mount("virt,name=v")  # mounted from outside any locked container
    assert (outside / "box").is_dir()


# ------------------------------------------------------------ virt confinement

#: moves itself into VIEW/HOME, then runs each op of a JSON list and prints what each
#: gave: ["write", path, data] -> 0 or errno; ["cli", args...] -> [rc, stdout, stderr]
INSIDE = r"""
import json, os, subprocess, sys
view, home, ops = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])

def write(path, data):
    fd = os.open(os.path.join(view, path), os.O_WRONLY)
    try:
        os.write(fd, data.encode())
        return 0
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)

assert write(os.path.join(home, "cgroup.procs"), str(os.getpid())) == 0
out = []
for op in ops:
    if op[0] == "write":
        out.append(write(op[1], op[2].replace("SELF", str(os.getpid()))))
    else:
        args = [a.replace("SELF", str(os.getpid())) for a in op[1:]]
        p = subprocess.run([sys.executable, "-m", "containerfs", *args],
                           capture_output=True, text=True, timeout=60)
        out.append([p.returncode, p.stdout, p.stderr])
print(json.dumps(out))
"""


def inside(cfs, view, home: str, *ops: list) -> list:
    """Run `ops` from a process moved into `home` (a path under `view`); what each gave."""
    ops_rt = [op if op[0] == "write" else ["cli", "--runtime-dir", str(cfs.rt), *op[1:]]
              for op in ops]
    out = subprocess.run([sys.executable, "-c", INSIDE, str(view), home, json.dumps(ops_rt)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.fixture
def boxed(cfs) -> Path:
    """A virt hierarchy with a/box locked, a/box/inner and a/other."""
    view = cfs.mount("virt,name=v")
    os.makedirs(view / "a" / "box" / "inner")
    os.mkdir(view / "a" / "other")
    assert write(view / "a" / "box" / "virt.lock", b"1") == 0
    return view


def test_virt_lock_parser_and_mode(cfs):
    view = cfs.mount("virt,name=v")
    os.mkdir(view / "box")
    for c in (view, view / "box"):
        assert stat.S_IMODE(os.stat(c / "virt.lock").st_mode) == 0o644
        assert (c / "virt.lock").read_bytes() == b"0\n"
    lock = view / "box" / "virt.lock"
    # kstrtoull: a trailing newline only; any non-zero u64 locks
    for good, shown in ((b"1\n", b"1\n"), (b"0", b"0\n"), (b"2", b"1\n"), (b"0x0", b"0\n"),
                        (b"+1", b"1\n"), (b"0", b"0\n"), (b"18446744073709551615", b"1\n")):
        assert write(lock, good) == 0, good
        assert lock.read_bytes() == shown
    for bad, err in ((b" 1", errno.EINVAL), (b"1 ", errno.EINVAL), (b"-1", errno.EINVAL),
                     (b"yes", errno.EINVAL), (b"\n", errno.EINVAL), (b"+1 ", errno.EINVAL),
                     (b"18446744073709551616", errno.ERANGE)):
        assert write(lock, bad) == err, bad
        assert lock.read_bytes() == b"1\n"
    assert cfs.stats()["ok"]


def test_virt_confined_process_cannot_remount_or_set_the_release_agent(cfs, boxed, workdir):
    mnt = workdir / "inside"
    mnt.mkdir()
    out = inside(
        cfs, boxed, "a/box",
        ["cli", "x", str(boxed), "-o", "remount,virt,name=v,release_agent=/bin/false"],
        ["cli", "x", str(boxed), "-o", "remount,none,name=v"],
        ["cli", "x", str(mnt), "-o", "virt,name=v,release_agent=/bin/false"],
    )
    for rc, _stdout, stderr in out:
        assert rc != 0 and "cannot" in stderr, stderr
    assert (boxed / "release_agent").read_text() == "\n"
    assert (boxed / "a" / "box" / "virt.lock").read_bytes() == b"1\n"  # virt still bound
    assert not os.listdir(mnt)  # nothing mounted
    # outside any locked container, remount works as before
    cfs.cli("x", str(boxed), "-o", "remount,virt,name=v,release_agent=/bin/true")
    assert (boxed / "release_agent").read_text() == "/bin/true\n"


def test_virt_confined_process_cannot_change_its_own_lock(cfs, boxed):
    assert write(boxed / "a" / "box" / "inner" / "virt.lock", b"1") == 0
    # from box: box itself, anything above or beside it is out of reach; inner is below
    assert inside(
        cfs, boxed, "a/box",
        ["write", "a/box/virt.lock", "0"],
        ["write", "a/virt.lock", "1"],
        ["write", "a/other/virt.lock", "1"],
        ["write", "virt.lock", "1"],
        ["write", "a/box/virt.lock", "junk"],  # parsed first: EINVAL
        ["write", "a/box/inner/virt.lock", "0"],
        ["write", "a/box/inner/virt.lock", "1"],
    ) == [errno.EPERM] * 4 + [errno.EINVAL, 0, 0]
    # from inner (nested locks): neither its own lock nor box's
    assert inside(
        cfs, boxed, "a/box/inner",
        ["write", "a/box/inner/virt.lock", "0"],
        ["write", "a/box/virt.lock", "0"],
    ) == [errno.EPERM, errno.EPERM]
    assert (boxed / "a" / "box" / "virt.lock").read_bytes() == b"1\n"
    assert (boxed / "a" / "box" / "inner" / "virt.lock").read_bytes() == b"1\n"
    # the host unlocks
    assert write(boxed / "a" / "box" / "virt.lock", b"0") == 0


def test_virt_confined_process_moves_nothing_across_its_edge(cfs, boxed, procs):
    outsider, other = procs.sleeper(), procs.sleeper()
    assert write(boxed / "a" / "other" / "cgroup.procs", str(other.pid).encode()) == 0
    out = inside(
        cfs, boxed, "a/box",
        ["write", "a/box/cgroup.procs", str(outsider.pid)],
        ["write", "a/box/tasks", str(outsider.pid)],
        ["write", "a/box/inner/cgroup.procs", str(other.pid)],
        ["write", "a/other/cgroup.procs", "SELF"],  # out, through the host's path
        ["write", "cgroup.procs", "SELF"],
        ["write", "a/box/inner/cgroup.procs", "SELF"],  # within: fine
        ["write", "a/box/cgroup.procs", "SELF"],
    )
    assert out == [errno.ENOENT] * 5 + [0, 0]
    assert outsider.pid in read_ids(boxed / "cgroup.procs")
    assert read_ids(boxed / "a" / "other" / "cgroup.procs") == [other.pid]


def test_virt_membership_is_relative_to_the_locked_container(cfs, boxed, procs):
    other = procs.sleeper()
    assert write(boxed / "a" / "other" / "cgroup.procs", str(other.pid).encode()) == 0
    hid = json.loads(cfs.cli("membership", str(other.pid), "--json").stdout)[0]["hierarchy"]
    out = inside(
        cfs, boxed, "a/box/inner",
        ["cli", "membership", "SELF"],
        ["cli", "membership", str(other.pid)],
        ["cli", "membership", "1"],
    )
    assert [line for _rc, text, _err in out for line in text.splitlines()] == [
        f"{hid}:virt,name=v:/inner",
        f"{hid}:virt,name=v:/../other",
        f"{hid}:virt,name=v:/../..",
    ]
    # from outside, the full paths
    assert cfs.cli("membership", str(other.pid)).stdout == f"{hid}:virt,name=v:/a/other\n"


def test_virt_views_mounted_from_below_and_nested_locks(cfs, boxed, workdir):
    def mount_from(home: str) -> tuple[set[str], list[int], int]:
        """What a view mounted by a shell in `home` lists, its tasks, and the shell."""
        mnt = Path(tempfile.mkdtemp(dir=workdir))
        script = f"""
echo $$ > {boxed}/{home}/cgroup.procs
{sys.executable} -m containerfs --runtime-dir {cfs.rt} x {mnt} -o name=v || exit 1
ls {mnt}; echo @tasks; cat {mnt}/tasks; echo @shell $$
"""
        out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        words = out.stdout.split()
        listing = set(words[: words.index("@tasks")])
        tasks = [int(w) for w in words[words.index("@tasks") + 1 : words.index("@shell")]]
        return listing, tasks, int(words[-1])

    # a descendant of the locked box: the root is box
    listing, tasks, shell = mount_from("a/box/inner")
    assert "inner" in listing and "other" not in listing and "a" not in listing
    assert shell not in tasks
    assert write(boxed / "a" / "box" / "inner" / "virt.lock", b"1") == 0
    listing, tasks, shell = mount_from("a/box/inner")  # nested locks: the nearest wins
    assert "inner" not in listing and shell in tasks
    listing, tasks, shell = mount_from("a/box")
    assert "inner" in listing and shell in tasks


# ------------------------------------------------------------ ns.namespaces


def test_ns_namespaces_format_and_mode(cfs, procs):
    # made before the mount: it stays in the root, so the root shows two uts namespaces
    boxed = procs.spawn("unshare", "--uts", "sleep", "1000")
    wait_for(lambda: os.readlink(f"/proc/{boxed.pid}/ns/uts") != os.readlink("/proc/self/ns/uts"))
    view = cfs.mount("ns")
    f = view / "ns.namespaces"
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o444
    lines = f.read_text().splitlines()
    kinds = [line.split(" ", 1)[0] for line in lines]
    assert kinds == [k for k in ("cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts")
                     if k in kinds]
    for line in lines:
        inodes = [int(i) for i in line.split()[1:]]
        assert inodes == sorted(set(inodes)) and inodes
    uts = dict(line.split(" ", 1) for line in lines)["uts"].split()
    assert len(uts) >= 2
    os.mkdir(view / "empty")
    assert (view / "empty" / "ns.namespaces").read_bytes() == b""
    # read-only: root may open it for writing (no permission check) and the write is EINVAL;
    # anyone else is refused at open with EACCES by the mode
    assert write(f, b"x") == errno.EINVAL
    # (through a directory descriptor: the view's own mount point is root's alone)
    dfd = os.open(view / "empty", os.O_RDONLY | os.O_DIRECTORY)
    try:
        code = ("import os, sys\ntry:\n"
                "    os.open('ns.namespaces', os.O_WRONLY, dir_fd=int(sys.argv[1]))\n"
                "    print(0)\nexcept OSError as e:\n    print(e.errno)\n")
        out = subprocess.run(["python3", "-c", code, str(dfd)], user=65534, group=65534,
                             extra_groups=[], pass_fds=(dfd,), capture_output=True, text=True,
                             timeout=30)
    finally:
        os.close(dfd)
    assert out.stdout.split() == [str(errno.EACCES)], out.stderr


def test_ns_clones_keep_their_namespaces_and_removal_across_a_crash(cfs, procs):
    view = cfs.mount("ns")
    # a shell in its own uts namespace, which forks on cue: an ordinary child, then a
    # child in a further ipc namespace (the marker: once its clone exists, the ordinary
    # child has been judged too, as both wait in the same queue)
    boxed = procs.spawn("unshare", "--uts", "sh", "-c",
                        "read x; sleep 1000 & read y; unshare --ipc sleep 1000 & wait",
                        stdin=subprocess.PIPE)
    clone = view / f"ns-{boxed.pid}"
    wait_for(lambda: clone.is_dir() and read_ids(clone / "cgroup.procs") == [boxed.pid],
             timeout=10)
    crash(cfs)
    cfs.start()
    wait_for(lambda: served(view), timeout=10)
    assert read_ids(clone / "cgroup.procs") == [boxed.pid]
    assert boxed.stdin is not None
    boxed.stdin.write(b"x\n")
    boxed.stdin.flush()
    wait_for(lambda: len(read_ids(clone / "cgroup.procs")) == 2, timeout=10)
    boxed.stdin.write(b"y\n")
    boxed.stdin.flush()
    wait_for(lambda: any(n.startswith("ns-") for n in os.listdir(clone)), timeout=10)
    (marker,) = [n for n in os.listdir(clone) if n.startswith("ns-")]
    # the ordinary child stayed: the clone still stands for the shell's namespaces
    assert len(read_ids(clone / "cgroup.procs")) == 2
    # no kernel thread (kdevtmpfs has a mount namespace of its own) got a clone
    assert [n for n in os.listdir(view) if n.startswith("ns-")] == [clone.name]
    # and the clone still removes itself once empty
    for pid in read_ids(clone / marker / "cgroup.procs") + read_ids(clone / "cgroup.procs"):
        os.kill(pid, signal.SIGKILL)
    boxed.wait()
    wait_for(lambda: not clone.exists(), timeout=10)
