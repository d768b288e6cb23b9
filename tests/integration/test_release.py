"""The release agent (spec 6 and DESIGN.md 6) on real mounts, with real agent scripts.

Daemons here take daemon options (--max-agents, --agent-timeout) that the
conftest fixtures do not pass, so they are started by `daemons`, which
test_extended.py and test_events.py share; agents are shell scripts that
record what they were given in files.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from containerfs import control
from tests.conftest import CLI, Containerfs, fuse_available, wait_for, write

#: a uid and gid no account uses, for "a non-root user" (no account needed)
NOBODY = 64321
#: an interpreter any user may run (the venv's lives under root's home)
SYSTEM_PYTHON = "/usr/bin/python3"


@pytest.fixture
def daemons(workdir: Path) -> Iterator[Callable[..., Containerfs]]:
    """Start private daemons with extra `daemon` options; all stopped at teardown."""
    why = fuse_available()
    if why:
        pytest.skip(why)
    made: list[Containerfs] = []

    def make(*options: str) -> Containerfs:
        rt = workdir / f"rt{len(made)}"
        rt.mkdir()
        cfs = Containerfs(rt)
        made.append(cfs)
        with open(rt / "daemon.stderr", "wb") as log:
            cfs.daemon = subprocess.Popen(
                [*CLI, "--runtime-dir", str(rt), "daemon", "-f", *options],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd="/",
                start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, control.ControlError):
                control.request(rt / "control.sock", {"op": "ping"}, timeout=2)
                return cfs
            if cfs.daemon.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"daemon did not start: {cfs.stderr()}")

    try:
        yield make
    finally:
        for cfs in made:
            cfs.close()


def script(path: Path, body: str) -> Path:
    """An executable /bin/sh script."""
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def empty_into(container: Path, procs) -> None:
    """Put a sleeper into `container`, then kill it: the container empties once."""
    p = procs.sleeper()
    fd = os.open(container / "cgroup.procs", os.O_WRONLY)
    try:
        os.write(fd, str(p.pid).encode())
    finally:
        os.close(fd)
    p.kill()
    p.wait()


def as_user(code: str, *args: str, uid: int = NOBODY) -> subprocess.CompletedProcess:
    """Run Python `code` as an unprivileged uid and gid."""
    return subprocess.run(
        [SYSTEM_PYTHON, "-c", code, *args],
        user=uid,
        group=uid,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


def open_up(path: Path) -> None:
    """Let any user traverse `path` and its parents up to /tmp (test dirs are 0700)."""
    while str(path) not in ("/", "/tmp"):
        mode = stat.S_IMODE(path.stat().st_mode)
        path.chmod(mode | 0o055)
        path = path.parent


def zombies_of(pid: int) -> list[int]:
    """Children of `pid` that exited and were never reaped."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] == "Z" and int(fields[1]) == pid:
            found.append(int(entry))
    return found


RECORDER = r"""
out="@DIR@/$$"
{
  printf 'argc=%s\n' "$#"
  printf 'arg0=%s\n' "$0"
  printf 'arg1=%s\n' "$1"
  printf 'uid=%s\n' "$(id -u)"
  printf 'cwd=%s\n' "$(readlink /proc/$$/cwd)"
  printf 'pid=%s\n' "$$"
  printf 'sid=%s\n' "$(cut -d' ' -f6 /proc/$$/stat)"
} > "$out.tmp"
tr '\0' '\n' < /proc/$$/environ > "$out.env"
mv "$out.tmp" "$out.run"
while [ -e "@DIR@/hold" ]; do sleep 0.02; done
"""


def recorder(workdir: Path) -> tuple[Path, Path]:
    """An agent that records its argv, credentials, cwd, session and descriptors."""
    runs = workdir / "runs"
    runs.mkdir()
    return script(workdir / "agent", RECORDER.replace("@DIR@", str(runs))), runs


def recorded(runs: Path) -> list[dict[str, str]]:
    out = []
    for run in sorted(runs.glob("*.run")):
        fields = dict(line.split("=", 1) for line in run.read_text().splitlines())
        fields["env"] = run.with_suffix(".env").read_text()
        out.append(fields)
    return out


def set_agent(view: Path, agent: Path | str) -> None:
    assert write(view / "release_agent", f"{agent}\n".encode()) == 0


def test_agent_gets_the_path_and_nothing_else(workdir, cfs, procs):
    view = cfs.mount("none,name=rel")
    agent, runs = recorder(workdir)
    set_agent(view, agent)
    (view / "a b").mkdir()
    (view / "a b" / "c").mkdir()
    assert write(view / "a b" / "c" / "notify_on_release", b"1") == 0
    (runs / "hold").touch()  # the agent waits, so its descriptors can be seen
    empty_into(view / "a b" / "c", procs)
    (run,) = wait_for(lambda: recorded(runs), timeout=30)
    fds = {
        fd: os.readlink(f"/proc/{run['pid']}/fd/{fd}")
        for fd in os.listdir(f"/proc/{run['pid']}/fd")
    }
    (runs / "hold").unlink()
    assert run["argc"] == "1"
    assert run["arg0"] == str(agent)
    assert run["arg1"] == "/a b/c"  # one argument, space and all
    assert run["env"] == "HOME=/\nPATH=/sbin:/bin:/usr/sbin:/usr/bin\n"
    assert run["uid"] == "0"
    assert run["cwd"] == "/"
    assert run["sid"] == run["pid"]  # its own session
    assert {fd: fds[fd] for fd in ("0", "1", "2")} == dict.fromkeys(("0", "1", "2"), "/dev/null")
    # nothing of the daemon's leaks in: only the shell's own handle on its script
    assert set(fds.values()) <= {"/dev/null", str(agent)}
    log = cfs.rt / "daemon.log"
    line = wait_for(
        lambda: [ln for ln in log.read_text().splitlines() if "release agent" in ln], timeout=10
    )[0]
    assert re.search(rf"release agent {re.escape(str(agent))} /a b/c exited 0 in \d+ ms", line)


def test_agent_from_the_mount_option_and_relative_paths(workdir, cfs, procs):
    agent, runs = recorder(workdir)
    view = cfs.mount(f"none,name=opt,release_agent={agent}")
    assert (view / "release_agent").read_bytes() == f"{agent}\n".encode()
    (view / "x").mkdir()
    assert write(view / "x" / "notify_on_release", b"1") == 0
    empty_into(view / "x", procs)
    (run,) = wait_for(lambda: recorded(runs), timeout=30)
    assert run["arg1"] == "/x"
    # a relative agent resolves against /, with no PATH search
    set_agent(view, str(agent).lstrip("/"))
    empty_into(view / "x", procs)
    wait_for(lambda: len(recorded(runs)) == 2, timeout=30)
    assert sorted(r["arg0"] for r in recorded(runs)) == sorted([str(agent), str(agent)[1:]])


def test_runs_only_at_the_moments_of_spec_6_1(workdir, cfs, procs):
    view = cfs.mount("none,name=moments")
    agent, runs = recorder(workdir)
    set_agent(view, agent)
    for name in ("quiet", "rmchild", "parent", "last"):
        (view / name).mkdir()
    # notify_on_release 0: emptying runs nothing
    empty_into(view / "quiet", procs)
    # setting the flag on an empty container and mkdir run nothing; a child removal does
    assert write(view / "rmchild" / "notify_on_release", b"1") == 0
    (view / "rmchild" / "child").mkdir()
    (view / "rmchild" / "child").rmdir()
    # a child inherits the flag; its removal releases the parent in turn
    assert write(view / "parent" / "notify_on_release", b"1") == 0
    (view / "parent" / "kid").mkdir()
    assert (view / "parent" / "kid" / "notify_on_release").read_bytes() == b"1\n"
    empty_into(view / "parent" / "kid", procs)
    wait_for(lambda: {r["arg1"] for r in recorded(runs)} >= {"/rmchild", "/parent/kid"}, 30)
    (view / "parent" / "kid").rmdir()
    assert write(view / "last" / "notify_on_release", b"1") == 0
    empty_into(view / "last", procs)
    wait_for(lambda: {r["arg1"] for r in recorded(runs)} >= {"/last", "/parent"}, timeout=30)
    wait_for(lambda: cfs.stats()["release"]["running"] == 0, timeout=30)
    assert sorted(r["arg1"] for r in recorded(runs)) == [
        "/last",
        "/parent",
        "/parent/kid",
        "/rmchild",
    ]
    # no agent set: nothing runs, nothing fails
    set_agent(view, "")
    empty_into(view / "last", procs)
    wait_for(lambda: cfs.stats()["release"]["triggers"] >= 5, timeout=30)
    assert cfs.stats()["release"]["failed"] == 0
    assert len(recorded(runs)) == 4


def test_an_agent_that_removes_its_container_cascades(workdir, cfs, procs):
    view = cfs.mount("none,name=cascade")
    agent = script(workdir / "rm-agent", f'rmdir "{view}$1"\n')
    set_agent(view, agent)
    assert write(view / "notify_on_release", b"1") == 0
    (view / "p" / "q").mkdir(parents=True)
    (view / "keep").mkdir()
    empty_into(view / "p" / "q", procs)
    wait_for(lambda: not (view / "p").exists(), timeout=30)
    assert (view / "keep").is_dir()  # never populated, never had a child removed


def test_pending_runs_of_one_container_are_coalesced(workdir, daemons, procs):
    cfs = daemons("--max-agents", "1")
    view = cfs.mount("none,name=coalesce")
    runs = workdir / "runs"
    runs.mkdir()
    gate = workdir / "open"
    # the first run holds the only slot until the test opens the gate
    agent = script(
        workdir / "agent",
        f'echo "$1" >> {runs}/log\n'
        f'if [ "$1" = /blocker ]; then while [ ! -e {gate} ]; do sleep 0.02; done; fi\n',
    )
    set_agent(view, agent)
    for name in ("blocker", "x"):
        (view / name).mkdir()
        assert write(view / name / "notify_on_release", b"1") == 0
    empty_into(view / "blocker", procs)
    wait_for(lambda: (runs / "log").exists(), timeout=30)
    for _ in range(3):
        empty_into(view / "x", procs)
    wait_for(lambda: cfs.stats()["release"]["coalesced"] >= 2, timeout=30)
    gate.touch()
    wait_for(lambda: cfs.stats()["release"]["started"] == 2, timeout=30)
    wait_for(lambda: cfs.stats()["release"]["running"] == 0, timeout=30)
    assert (runs / "log").read_text().split() == ["/blocker", "/x"]


def test_a_hanging_agent_is_killed_at_its_timeout(workdir, daemons, procs):
    cfs = daemons("--agent-timeout", "1")
    view = cfs.mount("none,name=hang")
    pids = workdir / "pids"
    # the agent and a child it leaves in its process group both hang
    agent = script(workdir / "agent", f"sleep 1000 &\necho $$ $! > {pids}\nwait\n")
    set_agent(view, agent)
    (view / "h").mkdir()
    assert write(view / "h" / "notify_on_release", b"1") == 0
    empty_into(view / "h", procs)
    wait_for(lambda: pids.exists() and len(pids.read_text().split()) == 2, timeout=30)
    shell, child = (int(p) for p in pids.read_text().split())
    wait_for(lambda: cfs.stats()["release"]["timed_out"] == 1, timeout=30)
    wait_for(lambda: cfs.stats()["release"]["running"] == 0, timeout=30)
    log = (cfs.rt / "daemon.log").read_text()
    assert re.search(rf"release agent {re.escape(str(agent))} /h exited signal 9 .*timeout", log)
    wait_for(lambda: not os.path.exists(f"/proc/{child}"), timeout=10)  # the group went too
    assert not os.path.exists(f"/proc/{shell}")  # killed and reaped
    assert zombies_of(cfs.daemon.pid) == []


CONCURRENCY = r"""
d=@DIR@
exec 9>>"$d/lock"
flock 9
n=$(( $(cat "$d/running") + 1 )); echo $n > "$d/running"
[ $n -gt $(cat "$d/max") ] && echo $n > "$d/max"
flock -u 9
sleep 0.005
flock 9
echo $(( $(cat "$d/running") - 1 )) > "$d/running"
echo "$1" >> "$d/done"
flock -u 9
"""

THREADS = r"""
import sys, threading
threading.stack_size(65536)
stop = threading.Event()
threads = [threading.Thread(target=stop.wait, daemon=True) for _ in range(int(sys.argv[1]))]
for t in threads:
    t.start()
print(" ".join(str(t.native_id) for t in threads), flush=True)
sys.stdin.readline()
"""


def test_a_thousand_releases_at_once_all_run_at_most_n_at_a_time(workdir, daemons):
    n, count = 4, 1000
    cfs = daemons("--max-agents", str(n))
    view = cfs.mount("none,name=many")
    d = workdir / "count"
    d.mkdir()
    (d / "running").write_text("0\n")
    (d / "max").write_text("0\n")
    agent = script(workdir / "agent", CONCURRENCY.replace("@DIR@", str(d)))
    set_agent(view, agent)
    assert write(view / "notify_on_release", b"1") == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", THREADS, str(count)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        tids = [int(t) for t in holder.stdout.readline().split()]
        assert len(tids) == count
        for i, tid in enumerate(tids):
            (view / f"c{i}").mkdir()
            assert write(view / f"c{i}" / "tasks", str(tid).encode()) == 0
        holder.stdin.write("\n")
        holder.stdin.flush()  # the process exits: 1000 containers empty at once
        holder.wait(timeout=30)
    finally:
        holder.kill()
        holder.wait()
    expected = {f"/c{i}" for i in range(count)}

    def finished() -> bool:
        done = d / "done"
        return done.exists() and len(done.read_text().split()) >= count

    wait_for(finished, timeout=120, interval=0.2)
    wait_for(lambda: cfs.stats()["release"]["running"] == 0, timeout=30)
    assert sorted((d / "done").read_text().split()) == sorted(expected)  # each exactly once
    assert 2 <= int((d / "max").read_text()) <= n  # concurrent, and never past N
    stats = cfs.stats()["release"]
    assert stats["started"] == count and stats["most_running"] <= n
    assert zombies_of(cfs.daemon.pid) == []


def test_an_agent_that_cannot_start_is_logged_with_its_duration(workdir, cfs, procs):
    view = cfs.mount("none,name=noexec")
    missing = workdir / "missing-agent"
    not_executable = workdir / "plain-file"
    not_executable.write_text("#!/bin/sh\n")
    assert write(view / "notify_on_release", b"1") == 0
    for failed, (name, agent) in enumerate((("m", missing), ("n", not_executable)), 1):
        set_agent(view, agent)  # read at launch: one run at a time
        (view / name).mkdir()
        empty_into(view / name, procs)
        wait_for(lambda n=failed: cfs.stats()["release"]["failed"] == n, timeout=30)
    log = (cfs.rt / "daemon.log").read_text()
    for name, agent, error in (
        ("m", missing, "No such file or directory"),
        ("n", not_executable, "Permission denied"),
    ):
        assert re.search(
            rf"release agent {re.escape(str(agent))} /{name} failed to start in \d+ ms: .*{error}",
            log,
        ), log
    stats = cfs.stats()["release"]
    assert stats["started"] == 0 and stats["running"] == 0 and stats["pending"] == 0


def test_only_root_sets_the_agent(workdir, cfs):
    open_up(workdir)
    view = cfs.mount("none,name=perm")
    target = view / "release_agent"
    attempt = (
        "import os, sys\n"
        "try:\n"
        "    fd = os.open(sys.argv[1], os.O_WRONLY)\n"
        "except OSError as e:\n"
        "    print('open', e.errno); raise SystemExit\n"
        "try:\n"
        "    os.write(fd, b'/tmp/evil')\n"
        "    print('write', 0)\n"
        "except OSError as e:\n"
        "    print('write', e.errno)\n"
    )
    assert as_user(attempt, str(target)).stdout.split() == ["open", str(errno.EACCES)]
    os.chmod(target, 0o666)  # DAC now lets the user open it: the agent rule still refuses
    assert as_user(attempt, str(target)).stdout.split() == ["write", str(errno.EPERM)]
    assert target.read_bytes() == b"\n"
    # the mount option is refused too: only root may mount
    mount = (
        "import json, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "s.sendall(json.dumps({'op': 'mount', 'options':"
        " ['none', 'name=evil', 'release_agent=/tmp/evil']}).encode() + b'\\n')\n"
        "reply = json.loads(s.makefile().readline())\n"
        "print('mounted' if reply.get('ok', True) else f'refused {reply[\"errno\"]}')\n"
    )
    result = as_user(mount, str(cfs.rt / "control.sock"))
    assert result.stdout.split() == ["refused", str(errno.EPERM)], result.stderr
    assert "evil" not in cfs.cli("hierarchies").stdout
    # and root still may
    assert write(target, b"/sbin/agent\n") == 0
    assert target.read_bytes() == b"/sbin/agent\n"


def test_a_container_emptied_while_the_daemon_was_down_is_released(workdir, cfs, procs):
    """Tasks that exit while no daemon runs still empty their containers (spec 6.1)."""
    view = cfs.mount("none,name=down,extended")
    agent, runs = recorder(workdir)
    set_agent(view, agent)
    for name in ("gone", "kept", "flagged"):
        (view / name).mkdir()
        (view / name / "notify_on_release").write_bytes(b"1")
    assert write(view / "flagged" / "cgroup.auto_delete", b"1") == 0
    doomed, stays, flagged = procs.sleeper(), procs.sleeper(), procs.sleeper()
    for name, p in (("gone", doomed), ("kept", stays), ("flagged", flagged)):
        assert write(view / name / "cgroup.procs", str(p.pid).encode()) == 0
    cfs.daemon.kill()
    cfs.daemon.wait(timeout=10)
    for p in (doomed, flagged):
        p.kill()
        p.wait()
    cfs.start()
    wait_for(lambda: len(recorded(runs)) == 2, timeout=30)
    assert sorted(run["arg1"] for run in recorded(runs)) == ["/flagged", "/gone"]
    wait_for(lambda: not (view / "flagged").exists(), timeout=30)
    assert (view / "gone").is_dir()  # released, not removed: its agent does nothing
    assert [int(x) for x in (view / "kept" / "tasks").read_text().split()] == [stays.pid]
    time.sleep(0.5)
    assert len(recorded(runs)) == 2  # and "kept", still populated, never
