"""containerfs's own files under the `extended` mount option: auto-delete, events, kill."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
import sys

import pytest
import trio

from containerfs import control
from containerfs.core.extended import Extended
from containerfs.core.options import parse_options
from containerfs.core.registry import Registry
from containerfs.tracking import procscan
from tests.conftest import CLI, Containerfs, fuse_available, read_ids, wait_for, write
from tests.integration.test_release import empty_into, recorded, recorder, set_agent

EXTENDED = {"cgroup.auto_delete": 0o644, "cgroup.events": 0o444, "cgroup.kill": 0o200}
CORE = {"tasks", "cgroup.procs", "notify_on_release", "cgroup.clone_children"}


@pytest.fixture
def ext(cfs):
    return cfs.mount("none,name=ext,extended")


def move(container, pid: int) -> None:
    assert write(container / "cgroup.procs", str(pid).encode()) == 0


def test_listings(cfs, ext):
    plain = cfs.mount("none,name=plain")
    (plain / "a").mkdir()
    assert set(os.listdir(plain / "a")) == CORE  # without `extended`, exactly cgroup v1's
    assert not set(EXTENDED) & set(os.listdir(plain))
    (ext / "a").mkdir()
    assert set(os.listdir(ext / "a")) == CORE | set(EXTENDED)
    assert not set(EXTENDED) & set(os.listdir(ext))  # not in the root, as in cgroup v2
    for name, mode in EXTENDED.items():
        st = os.stat(ext / "a" / name)
        assert stat.S_IMODE(st.st_mode) == mode and st.st_size == 0


def test_events_file_follows_the_subtree(ext, procs):
    (ext / "a" / "b").mkdir(parents=True)
    assert (ext / "a" / "cgroup.events").read_bytes() == b"populated 0\n"
    p = procs.sleeper()
    move(ext / "a" / "b", p.pid)
    assert (ext / "a" / "cgroup.events").read_bytes() == b"populated 1\n"
    assert (ext / "a" / "b" / "cgroup.events").read_bytes() == b"populated 1\n"
    p.kill()
    p.wait()
    wait_for(lambda: (ext / "a" / "cgroup.events").read_bytes() == b"populated 0\n", 10)
    assert (ext / "a" / "b" / "cgroup.events").read_bytes() == b"populated 0\n"
    # read-only: root passes DAC and gets EINVAL; the kill file is write-only
    assert write(ext / "a" / "cgroup.events", b"populated 1\n") == errno.EINVAL
    with pytest.raises(OSError) as exc:
        (ext / "a" / "cgroup.kill").read_bytes()
    assert exc.value.errno == errno.EINVAL


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"0", errno.ERANGE),
        (b"2", errno.ERANGE),
        (b"-1", errno.ERANGE),
        (b"+2\n", errno.ERANGE),
        (b"4294967297", errno.ERANGE),
        (b"99999999999999999999999", errno.ERANGE),
        (b"abc", errno.EINVAL),
        (b"1abc", errno.EINVAL),
        (b"\n", errno.EINVAL),
        (b"   ", errno.EINVAL),
        (b"1 2", errno.EINVAL),
        (b"x" * 4097, errno.E2BIG),
        (b" " * 4096, errno.EINVAL),
        (b"", 0),
    ],
)
def test_kill_parser_refuses_without_killing(ext, procs, data, expected):
    (ext / "a").mkdir()
    p = procs.sleeper()
    move(ext / "a", p.pid)
    assert write(ext / "a" / "cgroup.kill", data) == expected
    assert p.poll() is None
    assert read_ids(ext / "a" / "cgroup.procs") == [p.pid]
    assert (ext / "a" / "cgroup.events").read_bytes() == b"populated 1\n"


@pytest.mark.parametrize("data", [b"1", b"1\n", b" 1 \n", b"+1", b"0x1", b"01", b"1\x00junk"])
def test_kill_accepts_one_in_every_spelling(ext, procs, data):
    (ext / "a").mkdir()
    p = procs.sleeper()
    move(ext / "a", p.pid)
    assert write(ext / "a" / "cgroup.kill", data) == 0
    assert p.wait(timeout=10) == -signal.SIGKILL


def test_kill_takes_the_subtree_and_nothing_else(ext, procs):
    (ext / "a" / "b" / "c").mkdir(parents=True)
    (ext / "sibling").mkdir()
    inside = [procs.sleeper() for _ in range(3)]
    move(ext / "a", inside[0].pid)
    move(ext / "a" / "b", inside[1].pid)
    move(ext / "a" / "b" / "c", inside[2].pid)
    outside = [procs.sleeper(), procs.sleeper()]
    move(ext / "sibling", outside[0].pid)  # outside[1] stays in the root
    assert write(ext / "a" / "b" / "cgroup.kill", b"1") == 0
    assert [p.wait(timeout=10) for p in inside[1:]] == [-signal.SIGKILL] * 2
    wait_for(lambda: (ext / "a" / "b" / "cgroup.events").read_bytes() == b"populated 0\n", 10)
    assert inside[0].poll() is None and all(p.poll() is None for p in outside)
    # an empty subtree: nothing to do, and the write still succeeds
    assert write(ext / "a" / "b" / "cgroup.kill", b"1") == 0
    assert inside[0].poll() is None


def test_kill_a_whole_process_for_one_thread(ext, procs):
    """A thread in the subtree is enough: SIGKILL takes its whole process."""
    (ext / "a").mkdir()
    holder = procs.spawn(
        sys.executable,
        "-c",
        "import threading,sys; t=threading.Thread(target=sys.stdin.read); t.start();"
        "print(t.native_id, flush=True); t.join()",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    tid = int(holder.stdout.readline())
    assert write(ext / "a" / "tasks", str(tid).encode()) == 0
    assert write(ext / "a" / "cgroup.kill", b"1") == 0
    assert holder.wait(timeout=10) == -signal.SIGKILL


FORKER = """
spawn() { while :; do sleep 1000 & sleep 0.01; done; }
spawn & spawn & spawn
"""


@pytest.fixture(params=["auto", "scan"])
def ext_any(request):
    """An extended view under each tracker: netlink (where allowed), and /proc scans only."""
    cfs = request.getfixturevalue("cfs" if request.param == "auto" else "cfs_scan")
    return cfs.mount("none,name=ext,extended")


def test_kill_empties_a_container_whose_processes_keep_forking(ext_any, procs):
    """Without netlink the registry lags the forks by up to a scan; none may escape."""
    ext = ext_any
    (ext / "bomb").mkdir()
    starter = procs.spawn(
        "sh",
        "-c",
        f"echo $$ > {ext}/bomb/cgroup.procs; exec sh -c '{FORKER}'",
        start_new_session=True,
    )
    try:
        wait_for(lambda: len(read_ids(ext / "bomb" / "cgroup.procs")) > 50, timeout=30)
        assert write(ext / "bomb" / "cgroup.kill", b"1") == 0
        wait_for(lambda: read_ids(ext / "bomb" / "cgroup.procs") == [], timeout=30)
        assert (ext / "bomb" / "cgroup.events").read_bytes() == b"populated 0\n"
        starter.wait(timeout=10)
        # nothing left anywhere that the forkers started (orphans would be in the root)
        wait_for(lambda: _in_session(starter.pid) == [], timeout=10)
        (ext / "bomb").rmdir()
    finally:
        for pid in _in_session(starter.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _in_session(sid: int) -> list[int]:
    """Live (not zombie) processes of session `sid`."""
    return [
        int(pid)
        for pid in os.listdir("/proc")
        if pid.isdigit() and _session(int(pid)) == sid and _state(int(pid)) not in ("Z", "X")
    ]


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def test_kill_spares_a_child_moved_out_of_the_subtree(ext_any, procs):
    """A descendant the registry knows to be elsewhere is neither killed nor left stopped."""
    ext = ext_any
    (ext / "a").mkdir()
    (ext / "b").mkdir()
    parent = procs.spawn(
        "sh",
        "-c",
        f"echo $$ > {ext}/a/cgroup.procs; sleep 1000 & echo $!; wait",
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    child = int(parent.stdout.readline())
    try:
        move(ext / "b", child)
        assert read_ids(ext / "a" / "cgroup.procs") == [parent.pid]
        assert write(ext / "a" / "cgroup.kill", b"1") == 0
        assert parent.wait(timeout=10) == -signal.SIGKILL
        wait_for(lambda: read_ids(ext / "a" / "cgroup.procs") == [], timeout=10)
        assert _state(child) == "S"  # alive, and never stopped
        assert read_ids(ext / "b" / "cgroup.procs") == [child]
    finally:
        os.kill(child, signal.SIGKILL)  # reparented to init, which reaps it


def _session(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[3])
    except (FileNotFoundError, ProcessLookupError):
        return None


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b" 1", errno.EINVAL),
        (b"1 ", errno.EINVAL),
        (b"1\n\n", errno.EINVAL),
        (b"yes", errno.EINVAL),
        (b"-1", errno.EINVAL),
        (b"18446744073709551616", errno.ERANGE),
        (b"x" * 4097, errno.E2BIG),
    ],
)
def test_auto_delete_flag_parser(ext, data, expected):
    (ext / "a").mkdir()
    flag = ext / "a" / "cgroup.auto_delete"
    assert flag.read_bytes() == b"0\n"
    assert write(flag, data) == expected
    assert flag.read_bytes() == b"0\n"
    for ok, value in ((b"7\n", b"1\n"), (b"0x0", b"0\n"), (b"+1", b"1\n")):
        assert write(flag, ok) == 0
        assert flag.read_bytes() == value


def test_auto_delete_cascades_after_starting_the_agent(workdir, ext, procs):
    agent, runs = recorder(workdir)
    set_agent(ext, agent)
    (ext / "a").mkdir()
    assert write(ext / "a" / "cgroup.auto_delete", b"1") == 0
    assert write(ext / "a" / "notify_on_release", b"1") == 0
    (ext / "a" / "b" / "c").mkdir(parents=True)  # both inherit both flags
    assert (ext / "a" / "b" / "c" / "cgroup.auto_delete").read_bytes() == b"1\n"
    (ext / "keep").mkdir()  # no flag: stays
    (ext / "a" / "other").mkdir()
    assert write(ext / "a" / "other" / "cgroup.auto_delete", b"0") == 0
    empty_into(ext / "a" / "b" / "c", procs)
    wait_for(lambda: not (ext / "a" / "b").exists(), timeout=30)
    # "a" still has a child without the flag, which was never emptied
    assert (ext / "a" / "other").is_dir() and (ext / "keep").is_dir()
    (ext / "a" / "other").rmdir()  # the last child goes: "a" is empty and flagged
    wait_for(lambda: not (ext / "a").exists(), timeout=30)
    wait_for(lambda: len(recorded(runs)) == 3, timeout=30)
    assert sorted(r["arg1"] for r in recorded(runs)) == ["/a", "/a/b", "/a/b/c"]


def test_auto_delete_without_an_agent_and_the_reprieve(workdir, ext, procs):
    (ext / "x" / "y").mkdir(parents=True)
    assert write(ext / "x" / "cgroup.auto_delete", b"1") == 0
    # a flagged container that never had a task stays: the flag acts at spec 6.1's moments
    assert write(ext / "x" / "y" / "cgroup.auto_delete", b"1") == 0
    assert (ext / "x" / "y").is_dir()
    p = procs.sleeper()
    move(ext / "x" / "y", p.pid)
    q = procs.sleeper()
    move(ext / "x", q.pid)
    p.kill()
    p.wait()
    wait_for(lambda: not (ext / "x" / "y").exists(), timeout=30)
    assert (ext / "x").is_dir()  # it still has a task: no removal
    q.kill()
    q.wait()
    wait_for(lambda: not (ext / "x").exists(), timeout=30)


def test_auto_delete_survives_a_restart(cfs, ext, procs):
    """The flag is a setting like notify_on_release: the journal keeps it."""
    (ext / "a").mkdir()
    assert write(ext / "a" / "cgroup.auto_delete", b"1") == 0
    p = procs.sleeper()
    move(ext / "a", p.pid)
    cfs.daemon.send_signal(signal.SIGKILL)
    cfs.daemon.wait(timeout=10)
    cfs.start()
    wait_for(lambda: os.path.isdir(ext / "a"), timeout=30)
    assert (ext / "a" / "cgroup.auto_delete").read_bytes() == b"1\n"
    p.kill()
    p.wait()
    wait_for(lambda: not (ext / "a").exists(), timeout=30)


def spawn_with_pid(procs, pid: int) -> subprocess.Popen | None:
    """A sleeper that gets `pid` again (through ns_last_pid); None if other forks keep winning."""
    for _ in range(100):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        p = procs.sleeper()
        if p.pid == pid:
            return p
        p.kill()
        p.wait()
    return None


def test_kill_does_not_skip_a_pid_reused_inside_the_subtree(procs):
    """A sweep remembers the processes it killed by pid and start time.

    The core runs in this process, without a tracker, so the test plays a
    tracker that is late: the killed sleeper stays in the registry while the
    sweeps go on, then its pid is reused by a new sleeper inside the
    subtree, and the tracker replaces the one by the other. Keyed by pid
    alone, the sweeps would skip the new process until they gave up.
    """
    reg = Registry()
    h, _ = reg.mount(parse_options(["none", "name=reuse", "extended"], reg.subsystems))
    a = reg.mkdir(h.root, "a", uid=0, gid=0, mode=0o755)
    store = Extended(reg, kill_timeout=30)
    reg.listeners.append(store)
    first = procs.sleeper()
    info = procscan.read_task(first.pid)
    assert info is not None
    reg.add_task(first.pid, first.pid, start_time=info.start_time, placement={h.id: a})
    second = None

    async def scenario() -> None:
        nonlocal second
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.run)
            store.kill(a)
            assert await trio.to_thread.run_sync(lambda: first.wait(timeout=10)) == -signal.SIGKILL
            await trio.sleep(0.05)  # start times count 10 ms ticks: the two must differ
            second = spawn_with_pid(procs, first.pid)
            if second is not None:
                again = procscan.read_task(second.pid)
                assert again is not None and again.start_time != info.start_time
                reg.remove_task(first.pid)
                reg.add_task(
                    second.pid, second.pid, start_time=again.start_time, placement={h.id: a}
                )
                await trio.to_thread.run_sync(lambda: second.wait(timeout=10))
                reg.remove_task(second.pid)  # what the tracker does at the exit
            nursery.cancel_scope.cancel()

    trio.run(scenario)
    if second is None:
        pytest.skip("other processes kept taking the pid")
    assert second.returncode == -signal.SIGKILL


#: runs the daemon as its child and waits: the daemon's parent is protected
WRAPPER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"


def test_kill_never_stops_what_it_may_not_kill(workdir, procs):
    """A protected process in the subtree is neither killed nor left stopped.

    Stopping comes before killing, so a process the kill refuses must be one
    the stop refused too: here the daemon's parent, which a sweep sees in
    the subtree beside a sleeper.
    """
    why = fuse_available()
    if why:
        pytest.skip(why)
    rt = workdir / "rt"
    rt.mkdir()
    cfs = Containerfs(rt)
    with open(rt / "daemon.stderr", "wb") as log:
        cfs.daemon = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, *CLI, "--runtime-dir", str(rt), "daemon", "-f"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd="/",
            start_new_session=True,
        )
    try:
        wait_for(lambda: _answers(cfs), timeout=20)
        ext = cfs.mount("none,name=ext,extended")
        (ext / "a").mkdir()
        sleeper = procs.sleeper()
        move(ext / "a", cfs.daemon.pid)
        move(ext / "a", sleeper.pid)
        assert write(ext / "a" / "cgroup.kill", b"1") == 0
        assert sleeper.wait(timeout=10) == -signal.SIGKILL
        wait_for(lambda: read_ids(ext / "a" / "cgroup.procs") == [cfs.daemon.pid], timeout=10)
        log = rt / "daemon.log"
        wait_for(lambda: "only protected processes remain" in log.read_text(), timeout=10)
        assert _state(cfs.daemon.pid) == "S"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(cfs.daemon.pid, signal.SIGCONT)
        cfs.close()


def _answers(cfs: Containerfs) -> bool:
    try:
        cfs.request({"op": "ping"})
    except (OSError, control.ControlError):
        return False
    return True
