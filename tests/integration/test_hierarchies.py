"""Many hierarchies: side by side, rebinding on a live hierarchy, /proc formats."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import read_ids, wait_for, write


def test_two_hierarchies_with_different_subsystems(cfs, procs):
    cpus = cfs.mount("cpuset")
    tasks = cfs.mount("numtasks")
    p = procs.sleeper()
    os.mkdir(cpus / "pinned")
    (cpus / "pinned" / "cpuset.cpus").write_bytes(b"0")
    (cpus / "pinned" / "cpuset.mems").write_bytes(b"0")
    os.mkdir(tasks / "limited")
    assert write(cpus / "pinned" / "tasks", str(p.pid).encode()) == 0
    assert write(tasks / "limited" / "tasks", str(p.pid).encode()) == 0
    assert read_ids(cpus / "pinned" / "tasks") == [p.pid]
    assert read_ids(tasks / "limited" / "tasks") == [p.pid]
    assert "cpuset.cpus" in os.listdir(cpus) and "cpuset.cpus" not in os.listdir(tasks)
    assert "numtasks.max" in os.listdir(tasks / "limited")
    assert cfs.cli("membership", str(p.pid)).stdout == "2:numtasks:/limited\n1:cpuset:/pinned\n"
    rows = json.loads(cfs.cli("membership", str(p.pid), "--json").stdout)
    assert rows[0] == {"hierarchy": 2, "controllers": "numtasks", "path": "/limited"}
    text = cfs.cli("hierarchies").stdout
    assert text.startswith("#subsys_name\thierarchy\tnum_cgroups\tenabled\n")
    lines = dict(line.split("\t", 1) for line in text.splitlines()[1:])
    assert lines["cpuset"] == "1\t2\t1" and lines["numtasks"] == "2\t2\t1"
    assert lines["cpuacct"] == "0\t1\t1"
    # cpuset is taken: a mount asking for it with something else names the holder
    other = cfs.rt.parent / "other"
    other.mkdir()
    proc = cfs.cli("x", str(other), "-o", "cpuset,cpuacct", check=False)
    assert proc.returncode == 32 and "already bound to hierarchy 1" in proc.stderr


def remount(cfs, view, options: str) -> subprocess.CompletedProcess:
    return cfs.cli("x", str(view), "-o", f"remount,{options}", check=False)


def test_remount_adds_and_removes_a_subsystem_on_a_live_hierarchy(cfs, procs):
    view = cfs.mount("none,name=live")
    os.mkdir(view / "a")  # clone_children 0, inherited from the root
    p = procs.sleeper()
    write(view / "a" / "tasks", str(p.pid).encode())
    # a/ gets an empty cpuset (a's parent, the root, has clone_children 0): ENOSPC
    proc = remount(cfs, view, "cpuset,name=live")
    assert proc.returncode == 32 and "cannot add cpuset" in proc.stderr
    assert "cpuset.cpus" not in os.listdir(view) and read_ids(view / "a" / "tasks") == [p.pid]
    # with clone_children on the root, every cpuset starts with the parent's cpus
    write(view / "tasks", str(p.pid).encode())
    os.rmdir(view / "a")
    (view / "cgroup.clone_children").write_bytes(b"1")
    os.mkdir(view / "a")
    write(view / "a" / "tasks", str(p.pid).encode())
    proc = remount(cfs, view, "cpuset,name=live")
    assert proc.returncode == 0, proc.stderr
    assert (view / "a" / "cpuset.cpus").read_bytes() == (view / "cpuset.cpus").read_bytes()
    assert read_ids(view / "a" / "tasks") == [p.pid]
    assert "1:cpuset,name=live:/a" in cfs.cli("membership", str(p.pid)).stdout
    proc = remount(cfs, view, "none,name=live")
    assert proc.returncode == 0, proc.stderr
    assert "cpuset.cpus" not in os.listdir(view / "a")
    assert read_ids(view / "a" / "tasks") == [p.pid]  # containers and tasks stay


def test_remount_refusals(cfs, workdir):
    view = cfs.mount("none,name=r")
    for options, message in (("none,name=other", "name cannot change"),
                             ("none,name=r,extended", "cannot change on remount"),
                             ("bogus", "'bogus'")):
        proc = remount(cfs, view, options)
        assert proc.returncode == 32 and message in proc.stderr, proc.stderr
    proc = cfs.cli("x", str(workdir), "-o", "remount,none,name=r", check=False)
    assert proc.returncode == 32 and "not a view" in proc.stderr


def test_enabled_files_with_extended(cfs):
    view = cfs.mount("numtasks,extended,default_disabled")
    assert (view / "numtasks_enabled").read_bytes() == b"0\n"
    os.mkdir(view / "shared")
    assert write(view / "numtasks_enabled", b"1") == 16  # EBUSY: the root has children
    os.rmdir(view / "shared")
    assert write(view / "numtasks_enabled", b"junk") == 22
    assert write(view / "numtasks_enabled", b"1") == 0
    assert (view / "numtasks_enabled").read_bytes() == b"1\n"
    plain = cfs.mount("cpuset")
    assert "cpuset_enabled" not in os.listdir(plain)  # only with extended


@pytest.mark.parametrize("subsys", ["cpuset", "cpuacct", "numtasks", "freezer", "numfiles", "ns"])
def test_a_disabled_subsystem_treats_children_as_its_root(cfs, procs, subsys):
    """Seed 000: children of a disabled subsystem share the root's state; tasks
    can move into them, fork and exit there, and the subsystem acts as for the root."""
    view = cfs.mount(f"{subsys},extended,default_disabled")
    os.makedirs(view / "shared" / "deeper")
    shell = procs.spawn("sh", "-c", "read x; sleep 1000 & wait", stdin=subprocess.PIPE)
    assert write(view / "shared" / "deeper" / "cgroup.procs", str(shell.pid).encode()) == 0
    shell.stdin.write(b"go\n")
    shell.stdin.flush()
    wait_for(lambda: len(read_ids(view / "shared" / "deeper" / "cgroup.procs")) == 2)
    child = max(read_ids(view / "shared" / "deeper" / "cgroup.procs"))
    assert os.path.exists(f"/proc/{child}")  # not killed, not broken: the fork was fine
    assert write(view / "shared" / "cgroup.procs", str(shell.pid).encode()) == 0
    os.kill(child, 9)
    shell.kill()
    shell.wait()
    assert cfs.daemon_alive()
    assert read_ids(view / "shared" / "deeper" / "cgroup.procs") == []
    os.rmdir(view / "shared" / "deeper")
