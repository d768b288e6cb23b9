"""The seeds' ns and virt subsystems, with real processes and real mounts."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

from tests.conftest import read_ids, wait_for, write


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
