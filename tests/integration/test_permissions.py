"""Permissions with a real non-root user: modes, delegation by chown, moves, the agent."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import read_ids


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int

    def run(self, *argv: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, user=self.uid, group=self.gid, extra_groups=[],
                              capture_output=True, text=True, timeout=30, cwd="/", **kw)

    def python(self, code: str) -> subprocess.CompletedProcess:
        return self.run("python3", "-c", code)


@pytest.fixture
def user() -> Iterator[User]:
    name = f"cfst{uuid.uuid4().hex[:8]}"
    made = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", name],
                          capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot create a test user: {made.stderr.strip()}")
    try:
        ids = subprocess.run(["id", "-u", name], capture_output=True, text=True, check=True)
        gid = subprocess.run(["id", "-g", name], capture_output=True, text=True, check=True)
        yield User(name, int(ids.stdout), int(gid.stdout))
    finally:
        subprocess.run(["pkill", "-9", "-u", name], capture_output=True)
        subprocess.run(["userdel", name], capture_output=True)


def errno_of(user: User, code: str) -> int:
    """Run `code` as the user; it prints 0 or the errno of the OSError it hit."""
    wrapped = f"""
import os, errno
try:
{chr(10).join('    ' + line for line in code.strip().splitlines())}
    print(0)
except OSError as e:
    print(e.errno)
"""
    proc = user.python(wrapped)
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout.split()[-1])


def test_non_root_cannot_mkdir_in_the_root(view, user):
    view.parent.chmod(0o755)
    assert errno_of(user, f"os.mkdir({str(view / 'x')!r})") == errno.EACCES


def test_delegation_by_chown(view, user, procs):
    view.parent.chmod(0o755)
    os.mkdir(view / "deleg")
    for node in ("", "tasks", "cgroup.procs"):
        os.chown(view / "deleg" / node if node else view / "deleg", user.uid, user.gid)
    sub = view / "deleg" / "sub"
    mine = procs.spawn("sleep", "1000", user=user.uid, group=user.gid, extra_groups=[])
    assert errno_of(user, f"os.mkdir({str(sub)!r})") == 0
    st = os.stat(sub)
    assert (st.st_uid, st.st_gid) == (user.uid, user.gid)
    assert (os.stat(sub / "tasks").st_uid, os.stat(sub / "notify_on_release").st_uid) == (
        user.uid, user.uid)  # files belong to the non-root creator (spec 3.1)
    # the user moves its own process; a root process is refused with EACCES
    code = f"fd = os.open({str(sub / 'tasks')!r}, os.O_WRONLY); os.write(fd, b'{mine.pid}')"
    assert errno_of(user, code) == 0
    assert read_ids(sub / "tasks") == [mine.pid]
    root_proc = procs.sleeper()
    code = f"fd = os.open({str(sub / 'tasks')!r}, os.O_WRONLY); os.write(fd, b'{root_proc.pid}')"
    assert errno_of(user, code) == errno.EACCES
    assert read_ids(sub / "tasks") == [mine.pid]
    # but a file it does not own stays closed to it
    assert errno_of(user, f"open({str(view / 'deleg' / 'notify_on_release')!r}, 'w')") == (
        errno.EACCES)


def test_chmod_and_chown_of_files(view, user):
    os.mkdir(view / "a")
    os.chmod(view / "a" / "tasks", 0o600)
    assert os.stat(view / "a" / "tasks").st_mode & 0o777 == 0o600
    os.chown(view / "a" / "notify_on_release", user.uid, user.gid)
    assert os.stat(view / "a" / "notify_on_release").st_uid == user.uid
    view.parent.chmod(0o755)
    os.chmod(view / "a", 0o755)
    code = f"open({str(view / 'a' / 'notify_on_release')!r}, 'w').write('1')"
    assert errno_of(user, code) == 0
    assert (view / "a" / "notify_on_release").read_bytes() == b"1\n"


def test_release_agent_is_root_only(view, user):
    view.parent.chmod(0o755)
    agent = view / "release_agent"
    code = f"fd = os.open({str(agent)!r}, os.O_WRONLY); os.write(fd, b'/tmp/evil')"
    assert errno_of(user, code) == errno.EACCES  # by mode
    os.chmod(agent, 0o666)
    assert errno_of(user, code) == errno.EPERM  # by privilege, once DAC allows the open
    assert agent.read_bytes() == b"\n"


def test_release_agent_needs_cap_sys_admin_not_uid_0(view):
    """Spec 4.5: root without CAP_SYS_ADMIN gets EPERM, as in the kernel since CVE-2022-0492."""
    agent = view / "release_agent"
    code = f"""
import os
try:
    fd = os.open({str(agent)!r}, os.O_WRONLY)
    os.write(fd, b"/tmp/evil")
    print(0)
except OSError as e:
    print(e.errno)
"""
    # setpriv (util-linux) drops the capability from the bounding set, so the
    # root python it executes has every capability but CAP_SYS_ADMIN
    dropped = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-sys_admin", "--", "python3", "-c", code],
        capture_output=True, text=True, timeout=30,
    )
    assert dropped.returncode == 0, dropped.stderr
    assert int(dropped.stdout) == errno.EPERM
    assert agent.read_bytes() == b"\n"
    # the root of a user namespace of its own has every capability, over that namespace only
    userns = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--", "python3", "-c", code],
        capture_output=True, text=True, timeout=30,
    )
    if userns.returncode == 0:  # else user namespaces are not allowed here
        assert int(userns.stdout) == errno.EPERM
        assert agent.read_bytes() == b"\n"
    # the same root process with its capabilities may
    full = subprocess.run(["python3", "-c", code], capture_output=True, text=True, timeout=30)
    assert int(full.stdout) == 0 and agent.read_bytes() == b"/tmp/evil\n"


def test_control_socket_checks_the_peer(cfs, view, user):
    for path in (cfs.rt.parent, cfs.rt):
        os.chmod(path, 0o755)

    def ask(message: dict) -> dict:
        code = f"""
import json, socket
s = socket.socket(socket.AF_UNIX)
s.connect({str(cfs.rt / 'control.sock')!r})
s.sendall(json.dumps({message!r}).encode() + b"\\n")
print(s.makefile().readline())
"""
        proc = user.python(code)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    assert ask({"op": "stats"})["ok"] is True
    for message in ({"op": "stop"}, {"op": "mount", "options": ["none", "name=u"]}):
        reply = ask(message)
        assert reply["ok"] is False and reply["errno"] == errno.EPERM
        assert "only root" in reply["error"]
    assert cfs.daemon_alive() and cfs.stats()["hierarchies"] == 1


def test_the_opener_credentials_decide_not_the_writer(view, user, procs):
    """CVE-2021-4197: a descriptor keeps the rights of whoever opened it."""
    import ctypes

    os.mkdir(view / "a")
    root_proc = procs.sleeper()
    # opened by root, written by the user: root's rights, the move is allowed
    fd = os.open(view / "a" / "tasks", os.O_WRONLY)
    try:
        proc = subprocess.run(
            ["python3", "-c", f"import os; os.write({fd}, b'{root_proc.pid}')"],
            pass_fds=[fd], user=user.uid, group=user.gid, extra_groups=[],
            capture_output=True, text=True, timeout=30,
        )
    finally:
        os.close(fd)
    assert proc.returncode == 0, proc.stderr
    assert read_ids(view / "a" / "tasks") == [root_proc.pid]
    # opened by the user (the file is delegated), written by root: the user's rights
    os.chown(view / "a" / "tasks", user.uid, user.gid)
    view.parent.chmod(0o755)
    holder = subprocess.Popen(
        ["python3", "-c", f"import os, sys; fd = os.open({str(view / 'a' / 'tasks')!r}, "
         "os.O_WRONLY); print(fd, flush=True); sys.stdin.readline()"],
        user=user.uid, group=user.gid, extra_groups=[], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True,
    )
    try:
        their_fd = int(holder.stdout.readline())
        libc = ctypes.CDLL(None, use_errno=True)
        pidfd = os.pidfd_open(holder.pid)
        fd = libc.syscall(438, pidfd, their_fd, 0)  # pidfd_getfd: the very same open file
        os.close(pidfd)
        assert fd >= 0, os.strerror(ctypes.get_errno())
        other = procs.sleeper()
        try:
            with pytest.raises(OSError) as exc:
                os.write(fd, str(other.pid).encode())
            assert exc.value.errno == errno.EACCES
        finally:
            os.close(fd)
    finally:
        holder.kill()
        holder.wait()
    assert read_ids(view / "a" / "tasks") == [root_proc.pid]
