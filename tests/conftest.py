"""Fixtures: private daemons in private runtime directories, real mounts.

Every daemon a test starts lives in its own runtime directory under /tmp, so
no test ever meets a containerfs a person is using, and teardown unmounts
every view and stops every daemon it started, even when the test failed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from containerfs import control, mounts

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "containerfs"]


def fuse_available() -> str | None:
    """None if real FUSE mounts can be made here, else why not."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if os.geteuid() != 0:
        return "the integration tests mount and bind as root"
    return None


@dataclass
class Containerfs:
    """One private daemon and the views a test mounted through it."""

    rt: Path
    tracker: str = "auto"
    views: list[Path] = field(default_factory=list)
    daemon: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERFS_RUNTIME_DIR": str(self.rt)}

    def cli(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [*CLI, "--runtime-dir", str(self.rt), *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            **kw,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"containerfs {' '.join(args)} failed: {proc.stderr}")
        return proc

    def start(self) -> None:
        log = open(self.rt / "daemon.stderr", "wb")  # noqa: SIM115 - owned by the daemon
        self.daemon = subprocess.Popen(
            [*CLI, "--runtime-dir", str(self.rt), "daemon", "-f", "--tracker", self.tracker],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            cwd="/",
            start_new_session=True,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, control.ControlError):
                control.request(self.rt / "control.sock", {"op": "ping"}, timeout=2)
                return
            if self.daemon.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"daemon did not start: {self.stderr()}")

    def stderr(self) -> str:
        try:
            return (self.rt / "daemon.stderr").read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def mount(self, options: str = "none,name=t", source: str = "cfs") -> Path:
        target = Path(tempfile.mkdtemp(prefix="view-", dir=self.rt.parent))
        self.views.append(target)
        self.cli(source, str(target), "-o", options)
        return target

    def request(self, message: dict) -> dict:
        return control.request(self.rt / "control.sock", message)

    def stats(self) -> dict:
        return self.request({"op": "stats"})

    def daemon_alive(self) -> bool:
        return self.daemon is not None and self.daemon.poll() is None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            control.request(self.rt / "control.sock", {"op": "stop"}, timeout=5)
        if self.daemon is not None:
            try:
                self.daemon.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.daemon.send_signal(signal.SIGKILL)
                self.daemon.wait(timeout=10)
        cleanup_mounts(self.rt.parent)


def cleanup_mounts(under: Path) -> None:
    """Detach every mount at or below `under`, deepest first."""
    prefix = str(under)
    for m in sorted(mounts.read_mounts(), key=lambda m: len(m.mount_point), reverse=True):
        if m.mount_point == prefix or m.mount_point.startswith(prefix + "/"):
            with contextlib.suppress(OSError):
                mounts.umount(m.mount_point, lazy=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A private directory under /tmp (socket paths must stay short)."""
    path = Path(tempfile.mkdtemp(prefix="cfs-test-", dir="/tmp"))
    try:
        yield path
    finally:
        cleanup_mounts(path)
        shutil.rmtree(path, ignore_errors=True)


def _containerfs(workdir: Path, tracker: str) -> Iterator[Containerfs]:
    why = fuse_available()
    if why:
        pytest.skip(why)
    rt = workdir / "rt"
    rt.mkdir()
    cfs = Containerfs(rt, tracker=tracker)
    try:
        cfs.start()
        yield cfs
    finally:
        cfs.close()


@pytest.fixture
def cfs(workdir: Path) -> Iterator[Containerfs]:
    """A private daemon with the default tracker (netlink where allowed)."""
    yield from _containerfs(workdir, "auto")


@pytest.fixture
def cfs_scan(workdir: Path) -> Iterator[Containerfs]:
    """A private daemon that must do without netlink."""
    yield from _containerfs(workdir, "scan")


@pytest.fixture
def view(cfs: Containerfs) -> Path:
    """A view of a named hierarchy with no subsystems."""
    return cfs.mount("none,name=t")


class Procs:
    """Processes a test starts, always killed and reaped at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def spawn(self, *argv: str, **kw) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, **kw)
        self.procs.append(proc)
        return proc

    def sleeper(self, **kw) -> subprocess.Popen:
        return self.spawn("sleep", "1000", **kw)

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL) if _own_group(proc) else proc.kill()
        for proc in self.procs:
            with contextlib.suppress(Exception):
                proc.wait(timeout=10)


def _own_group(proc: subprocess.Popen) -> bool:
    try:
        return os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        return False


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    try:
        yield p
    finally:
        p.close()


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.01):
    """Poll until predicate() is truthy; return its value or fail the test."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        time.sleep(interval)


def read_ids(path: Path) -> list[int]:
    return [int(x) for x in path.read_text().split()]


def write(path: Path, data: bytes) -> int:
    """One write(2); return 0 or the errno it failed with."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
        return 0
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)
