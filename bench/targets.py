"""The three filesystems the bench compares, and the processes it measures with.

Each target is a context manager that mounts a fresh instance under a private
directory in /tmp and leaves nothing behind: the floor (bench.floorfs), the
kernel's cgroup v1 on a named hierarchy with no subsystems (where the
machine allows it), and containerfs (a private daemon in its own runtime
directory, like the test suite's, so a containerfs a person uses is never
touched). /sys/fs/cgroup and the machine's own hierarchies are never touched.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from containerfs import control, mounts

PYTHON = sys.executable
REPO = Path(__file__).resolve().parent.parent


class TargetUnavailable(Exception):
    """This machine cannot host the target (e.g. no cgroup v1 mounts allowed)."""


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _mounted(path: Path) -> bool:
    return any(m.mount_point == str(path) for m in mounts.read_mounts())


def _detach_below(under: Path) -> None:
    prefix = str(under)
    for m in sorted(mounts.read_mounts(), key=lambda m: len(m.mount_point), reverse=True):
        if m.mount_point == prefix or m.mount_point.startswith(prefix + "/"):
            with contextlib.suppress(OSError):
                mounts.umount(m.mount_point, lazy=True)


class Target:
    """A mounted filesystem of cgroup v1's shape."""

    name = ""
    #: whether `tasks` reflects real membership (the floor's does not)
    tracks = True

    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix=f"cfs-bench-{self.name}-", dir="/tmp"))
        self.root = self.work / "mnt"
        self.root.mkdir()

    @property
    def server_pid(self) -> int | None:
        """The process serving the filesystem, if it is a userspace one."""
        return None

    def __enter__(self) -> Target:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        _detach_below(self.work)
        shutil.rmtree(self.work, ignore_errors=True)


class Floor(Target):
    """The empty pyfuse3 filesystem: the floor any pyfuse3 design has."""

    name = "floor"
    tracks = False

    def __init__(self, tasks_lines: int = 1) -> None:
        super().__init__()
        self.tasks_lines = tasks_lines
        self.proc: subprocess.Popen | None = None

    @property
    def server_pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "bench.floorfs", str(self.root), "--tasks-lines", str(self.tasks_lines)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait(lambda: _mounted(self.root) or self.proc.poll() is not None, 20, "the floor")
        if self.proc.poll() is not None:
            raise RuntimeError(f"bench.floorfs exited with status {self.proc.returncode}")
        _wait(lambda: (self.root / "tasks").exists(), 20, "the floor to answer")

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        super().close()


class Kernel(Target):
    """cgroup v1 on a private named hierarchy with no subsystems."""

    name = "kernel"

    def start(self) -> None:
        self.hname = f"cfsbench{secrets.token_hex(4)}"
        proc = subprocess.run(
            ["mount", "-t", "cgroup", "-o", f"none,name={self.hname}", "cgroup", str(self.root)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise TargetUnavailable(f"cannot mount cgroup v1 here: {proc.stderr.strip()}")

    def close(self) -> None:
        if _mounted(self.root):
            self._empty_children()
            with contextlib.suppress(OSError):
                mounts.umount(str(self.root))
        super().close()

    def _empty_children(self) -> None:
        """Move every task to the root and remove the children, deepest first,
        so the hierarchy is destroyed at umount."""
        children = sorted(
            (Path(d) for d, _, _ in os.walk(self.root) if Path(d) != self.root),
            key=lambda p: len(p.parts),
            reverse=True,
        )
        for child in children:
            for line in _read_lines(child / "cgroup.procs"):
                with contextlib.suppress(OSError):
                    write_file(self.root / "cgroup.procs", line.encode())
        for child in children:
            deadline = time.monotonic() + 10
            while True:
                try:
                    child.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)  # tasks that were exiting leave a moment later


class Containerfs(Target):
    """A private containerfs daemon and one view of a `none,name=bench` hierarchy."""

    name = "containerfs"

    def __init__(self, options: str = "none,name=bench") -> None:
        super().__init__()
        self.options = options
        self.rt = self.work / "rt"
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None

    @property
    def server_pid(self) -> int | None:
        return self.pid

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERFS_RUNTIME_DIR": str(self.rt)}

    def request(self, message: dict) -> dict:
        return control.request(self.rt / "control.sock", message, timeout=30)

    def stats(self) -> dict:
        return self.request({"op": "stats"})

    def start(self) -> None:
        self.rt.mkdir()
        log = open(self.work / "daemon.stderr", "wb")  # noqa: SIM115 - owned by the daemon
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "containerfs", "--runtime-dir", str(self.rt), "daemon", "-f"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd="/",
            env=self.env,
            start_new_session=True,
        )
        log.close()

        def answers() -> bool:
            with contextlib.suppress(OSError, control.ControlError):
                self.pid = self.request({"op": "ping"})["pid"]
                return True
            if self.proc.poll() is not None:
                raise RuntimeError(f"the daemon exited: {self.stderr()}")
            return False

        _wait(answers, 30, "the containerfs daemon")
        cli = [PYTHON, "-m", "containerfs", "--runtime-dir", str(self.rt)]
        mount = subprocess.run(
            [*cli, "bench", str(self.root), "-o", self.options],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )
        if mount.returncode != 0:
            raise RuntimeError(f"containerfs mount failed: {mount.stderr.strip()}")

    def stderr(self) -> str:
        try:
            return (self.work / "daemon.stderr").read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.request({"op": "stop"})
        if self.proc is not None:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        super().close()


# ------------------------------------------------------------ measured processes

THREAD_HOLDER = """
import sys, threading
threading.stack_size(65536)
stop = threading.Event()
for _ in range(int(sys.argv[1])):
    threading.Thread(target=stop.wait, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


class ThreadHolder:
    """A process with `n` idle threads (n + 1 tasks), gone when closed."""

    def __init__(self, n: int) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-c", THREAD_HOLDER, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            self.close()
            raise RuntimeError(f"could not start a process with {n} threads")
        self.pid = self.proc.pid

    def tids(self) -> list[int]:
        return sorted(int(t) for t in os.listdir(f"/proc/{self.pid}/task"))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def sleeper() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "100000"], stdin=subprocess.DEVNULL)


# ------------------------------------------------------------------- /proc

CLK_TCK = os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS for {pid}")


def cpu_ns(pid: int) -> int:
    """CPU time of every thread of `pid` so far, in ns (schedstat: ns precision)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with (
            contextlib.suppress(FileNotFoundError, ProcessLookupError),
            open(f"/proc/{pid}/task/{tid}/schedstat") as f,
        ):
            total += int(f.read().split()[0])
    return total


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def alive(pid: int) -> bool:
    """`pid` exists and has not exited (a zombie is dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return False


def zombie_children(pid: int) -> list[int]:
    """Children of `pid` that have exited but were not reaped."""
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


# ------------------------------------------------------------------ file I/O


def write_file(path: Path, data: bytes) -> None:
    """One open, one write(2), one close: the way a client moves a task."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_file(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _read_lines(path: Path) -> list[str]:
    try:
        return read_file(path).decode().split()
    except OSError:
        return []
