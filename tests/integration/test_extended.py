"""containerfs's own files under the `extended` mount option: auto-delete, events, kill."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys

import pytest

from tests.conftest import read_ids, wait_for, write
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


def test_kill_empties_a_container_whose_processes_keep_forking(ext, procs):
    (ext / "bomb").mkdir()
    starter = procs.spawn(
        "sh",
        "-c",
        f"echo $$ > {ext}/bomb/cgroup.procs; exec sh -c '{FORKER}'",
        start_new_session=True,
    )
    wait_for(lambda: len(read_ids(ext / "bomb" / "cgroup.procs")) > 50, timeout=30)
    assert write(ext / "bomb" / "cgroup.kill", b"1") == 0
    wait_for(lambda: read_ids(ext / "bomb" / "cgroup.procs") == [], timeout=30)
    assert (ext / "bomb" / "cgroup.events").read_bytes() == b"populated 0\n"
    starter.wait(timeout=10)
    # nothing left anywhere that the forkers started
    leftovers = subprocess.run(
        ["pgrep", "-f", "sleep 1000"], capture_output=True, text=True
    ).stdout.split()
    assert [p for p in leftovers if _session(int(p)) == starter.pid] == []
    (ext / "bomb").rmdir()


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
