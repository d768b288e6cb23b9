"""Load: 8 concurrent clients doing mkdir, rmdir, reads and task moves.

The suite runs a short round (LOAD_SECONDS); `scripts/bench` runs the same
experiment for 60 s (bench/load.py). Only the errors a correct cgroup v1
filesystem gives under these races may appear, and afterwards the daemon has
the descriptors, children, open files and containers it had before, and its
memory has not grown with the work done.
"""

from __future__ import annotations

import errno

from bench.load import EXPECTED, load_run
from tests.conftest import read_ids

LOAD_SECONDS = 10.0
#: RSS may move by allocator noise, not by what the run would leak
RSS_SLACK_MB = 8.0


def test_eight_clients_only_expected_errors_and_no_leaks(cfs):
    view = cfs.mount("none,name=load")
    res = load_run(view, cfs.daemon.pid, cfs.stats, LOAD_SECONDS)
    assert res["clients"] == 8 and res["failed_clients"] == 0
    assert res["unexpected"] == []
    assert res["daemon_alive"]
    counts = res["counts"]
    # the run really raced: every kind of operation succeeded and collided
    assert all(counts[op]["ok"] > 0 for op in EXPECTED)
    assert counts["mkdir"].get(errno.errorcode[errno.EEXIST], 0) > 0
    assert counts["rmdir"].get(errno.errorcode[errno.EBUSY], 0) > 0
    before, after = res["before"], res["after"]
    assert after["fds"] == before["fds"]
    assert after["zombies"] == []
    assert after["open_files"] == 0
    assert after["containers"] == before["containers"]
    assert after["rss_mb"] <= before["rss_mb"] + RSS_SLACK_MB
    # the tree is empty again and the root still lists its tasks
    assert [p for p in view.iterdir() if p.is_dir()] == []
    assert read_ids(view / "tasks")
