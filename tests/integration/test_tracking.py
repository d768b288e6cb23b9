"""Task tracking through the daemon: netlink mode, scan mode, counters."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.conftest import read_ids, wait_for, write


def test_stats_reports_netlink_counters(cfs, view, procs):
    before = json.loads(cfs.cli("stats", "--json").stdout)["tracker"]
    if before["mode"] != "netlink":
        pytest.skip(f"the netlink proc connector is not available here (mode {before['mode']})")
    subprocess.run(["sh", "-c", "for i in 1 2 3 4 5; do true; done; /bin/true"], check=True)
    os.mkdir(view / "a")  # a FUSE request drains the pending events
    after = json.loads(cfs.cli("stats", "--json").stdout)["tracker"]
    assert after["forks"] >= before["forks"] + 1
    assert after["exits"] >= before["exits"] + 1
    text = cfs.cli("stats").stdout
    assert "tracker mode      netlink" in text and "tracker losses" in text


def test_exited_tasks_leave_their_container(view, procs):
    os.mkdir(view / "a")
    sleeper = procs.sleeper()
    assert write(view / "a" / "tasks", str(sleeper.pid).encode()) == 0
    sleeper.kill()
    sleeper.wait()
    assert read_ids(view / "a" / "tasks") == []


def test_scan_mode_without_netlink(cfs_scan, procs):
    view = cfs_scan.mount("none,name=scan")
    assert cfs_scan.stats()["tracker"]["mode"] == "scan"
    os.mkdir(view / "a")
    # the reader itself is learned when it opens the file
    out = subprocess.run(["sh", "-c", f"echo $$ > {view}/a/tasks; cat {view}/a/tasks; echo $$"],
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[-1] in out[:-1]
    # a child forked later shows up by the next scan, placed by its ancestry
    parent = procs.spawn("sh", "-c", "read x; sleep 1000 & wait", stdin=subprocess.PIPE)
    assert write(view / "a" / "cgroup.procs", str(parent.pid).encode()) == 0
    parent.stdin.write(b"go\n")
    parent.stdin.flush()
    wait_for(lambda: len(read_ids(view / "a" / "tasks")) == 2, timeout=10)
    # and an exit is seen by the next read of the container
    parent.kill()
    parent.wait()
    wait_for(lambda: parent.pid not in read_ids(view / "a" / "tasks"))
    assert cfs_scan.stats()["tracker"]["scans"] >= 2


def test_scan_mode_places_an_unseen_grandchild_by_its_ancestry(cfs_scan, procs):
    """A process whose parent the scan has not seen yet still starts in their container.

    The grandchild opens a control file (so it is learned at once) while its
    parent, forked a moment ago, is still unknown: the parent is learned
    first, in the container of the shell that forked it.
    """
    view = cfs_scan.mount("none,name=scan")
    os.mkdir(view / "a")
    shell = procs.spawn("sh", "-c", f"read x; sh -c 'cat {view}/a/tasks; echo $$'",
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert write(view / "a" / "cgroup.procs", str(shell.pid).encode()) == 0
    out, _ = shell.communicate("go\n", timeout=30)
    listed, middle = [int(x) for x in out.split()[:-1]], int(out.split()[-1])
    assert middle in listed  # the parent, learned through its child, is in `a`
    assert len(listed) == 3  # the shell, its child sh, and the cat the child forked
