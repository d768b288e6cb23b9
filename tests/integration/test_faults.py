"""Faults: lost tracker events, and release agents that hang or crash.

The daemon must come out of each with every task where it belongs and every
request answered. (A killed daemon restarting without loss is covered by
tests/integration/test_persistence.py.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench.targets import zombie_children
from containerfs.tracking.tracker import RCVBUF_ENV
from tests.conftest import read_ids, wait_for, write

#: A netlink receive buffer this small holds a handful of events: a storm of
#: thread creations and forks overflows it long before the daemon drains it.
TINY_RCVBUF = 1024

STORM = r"""
import os, sys, threading, time

hold = threading.Event()
kids = []
for i in range(40):
    pid = os.fork()
    if pid == 0:
        for _ in range(10):
            threading.Thread(target=hold.wait, daemon=True).start()
        if os.fork() == 0:          # a grandchild, placed by ancestry only
            time.sleep(1000)
            os._exit(0)
        hold.wait()
        os._exit(0)
    kids.append(pid)
for _ in range(200):                # short-lived children: exits lost too
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
for _ in range(100):
    threading.Thread(target=hold.wait, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def descendants_tids(pid: int) -> set[int]:
    """Every live thread of `pid` and of all its descendants, from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] not in ("Z", "X"):
            parents.setdefault(int(fields[1]), []).append(int(entry))
    tids: set[int] = set()
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            tids.update(int(t) for t in os.listdir(f"/proc/{p}/task"))
        except FileNotFoundError:
            continue
        todo.extend(parents.get(p, []))
    return tids


@pytest.fixture
def tiny_rcvbuf(monkeypatch):
    """Daemons started after this get a netlink buffer a fork storm overflows."""
    monkeypatch.setenv(RCVBUF_ENV, str(TINY_RCVBUF))


def test_lost_events_end_in_a_resync_with_no_task_misplaced(tiny_rcvbuf, cfs, procs):
    if cfs.stats()["tracker"]["mode"] != "netlink":
        pytest.skip("the netlink proc connector is not available here")
    view = cfs.mount("none,name=storm")
    os.mkdir(view / "a")
    storm = procs.spawn(
        sys.executable,
        "-c",
        f"import sys; sys.stdin.readline()\n{STORM}",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # teardown kills the whole tree with its group
    )
    assert write(view / "a" / "cgroup.procs", str(storm.pid).encode()) == 0
    # On an idle machine the daemon may drain as fast as the storm produces;
    # stopped, it cannot, and the kernel must drop events and say ENOBUFS.
    os.kill(cfs.daemon.pid, signal.SIGSTOP)
    try:
        storm.stdin.write("go\n")
        storm.stdin.flush()
        assert storm.stdout.readline().strip() == "ready"
    finally:
        os.kill(cfs.daemon.pid, signal.SIGCONT)

    wait_for(lambda: cfs.stats()["tracker"]["losses"] > 0, timeout=30)
    wait_for(lambda: cfs.stats()["tracker"]["resyncs"] > 0, timeout=30)
    truth = descendants_tids(storm.pid)
    assert len(truth) >= 1 + 100 + 40 * 12
    # the resync runs in the daemon's own time: wait for it, then hold it to the truth
    wait_for(lambda: set(read_ids(view / "a" / "tasks")) == descendants_tids(storm.pid), 30)
    assert set(read_ids(view / "a" / "tasks")) == descendants_tids(storm.pid)
    root = set(read_ids(view / "tasks"))
    assert not root & truth, "a task of the storm is listed in the root too"
    storm.stdin.close()


HANGING_AGENT = """#!/bin/sh
echo $$ > "{runs}/hang.$$"
exec sleep 1000
"""
CRASHING_AGENT = """#!/bin/sh
echo "$1" > "{runs}/crash.$$"
kill -SEGV $$
"""


def busy_client(view: Path, sleeper_pid: int, rounds: int, errors: list[str]) -> None:
    """Every kind of request, many times: what must keep being answered."""
    pid = str(sleeper_pid).encode()
    try:
        for i in range(rounds):
            os.mkdir(view / f"busy{i}")
            for dst in (view / f"busy{i}", view):
                if (rc := write(dst / "tasks", pid)) != 0:
                    errors.append(f"move to {dst}: errno {rc}")
            read_ids(view / f"busy{i}" / "tasks")
            os.listdir(view)
            os.rmdir(view / f"busy{i}")
    except OSError as exc:
        errors.append(repr(exc))


def release_storm(view: Path, names: list[str], sleeper_pid: int) -> None:
    """Make each container's release condition true: a task comes and goes."""
    for name in names:
        (view / name).mkdir()
        assert write(view / name / "notify_on_release", b"1") == 0
        assert write(view / name / "tasks", str(sleeper_pid).encode()) == 0
        assert write(view / "tasks", str(sleeper_pid).encode()) == 0


def test_hanging_and_crashing_agents_never_stall_the_filesystem(cfs, procs, workdir):
    runs = workdir / "agent-runs"
    runs.mkdir()
    hang = workdir / "hang.sh"
    hang.write_text(HANGING_AGENT.format(runs=runs))
    crash = workdir / "crash.sh"
    crash.write_text(CRASHING_AGENT.format(runs=runs))
    for script in (hang, crash):
        script.chmod(0o755)
    view = cfs.mount("none,name=agents")
    sleeper = procs.sleeper()
    try:
        # more hanging agents than may run at once: the rest queue behind them
        assert write(view / "release_agent", str(hang).encode()) == 0
        max_agents = cfs.stats()["release"]["max_agents"]
        release_storm(view, [f"h{i}" for i in range(max_agents + 4)], sleeper.pid)
        wait_for(lambda: len(list(runs.glob("hang.*"))) >= max_agents, timeout=30)

        errors: list[str] = []
        client = threading.Thread(target=busy_client, args=(view, sleeper.pid, 30, errors))
        client.start()
        client.join(timeout=120)
        assert not client.is_alive(), "the filesystem stalled behind hanging release agents"
        assert errors == []
        assert cfs.stats()["release"]["running"] == max_agents

        # crashing agents: the queued jobs read the agent at launch, so once the
        # hanging ones are gone they and new ones run the crashing agent
        assert write(view / "release_agent", str(crash).encode()) == 0
        release_storm(view, [f"c{i}" for i in range(4)], sleeper.pid)
        for pidfile in runs.glob("hang.*"):
            os.kill(int(pidfile.read_text()), signal.SIGKILL)
        client = threading.Thread(target=busy_client, args=(view, sleeper.pid, 30, errors))
        client.start()
        client.join(timeout=120)
        assert not client.is_alive(), "the filesystem stalled behind crashing release agents"
        assert errors == []
        wait_for(lambda: len(list(runs.glob("crash.*"))) >= 8, timeout=30)
        # every agent, hung, killed or crashed, is reaped
        wait_for(lambda: cfs.stats()["release"]["running"] == 0, timeout=30)
        assert zombie_children(cfs.daemon.pid) == []
        assert cfs.daemon_alive()
    finally:
        # the daemon leaves running agents to init when it stops: they are ours to end
        for pidfile in runs.glob("hang.*"):
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
