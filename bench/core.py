"""The core measurements: client operations side by side, then the scale runs.

Every operation is timed from this process (never the daemon) with
time.perf_counter_ns around exactly the system calls a client makes:
mkdir(2); stat(2) of a control file; opendir+getdents+close of a container;
open+read+close of `tasks` (the `cat tasks` a tool does); open+write+close of
a pid into `tasks`, moving a sleeper between two containers back and forth;
rmdir(2). "fork visible" is measured by a process inside a container that
forks a child and reads its container's `tasks` until the child's pid shows
up. Each operation gets a warm-up that is not recorded.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from bench.targets import (
    PYTHON,
    Containerfs,
    Floor,
    Kernel,
    Target,
    TargetUnavailable,
    ThreadHolder,
    cpu_ns,
    read_file,
    rss_bytes,
    sleeper,
    write_file,
)
from containerfs.fuse.ops import CACHE_TIMEOUT

OPS = ("mkdir", "stat", "readdir", "read tasks", "write pid", "rmdir", "fork visible")
WARMUP = 20


def summary(samples_ns: list[int]) -> dict:
    """Median and p99 in microseconds, plus the raw samples for the chart."""
    if not samples_ns:
        return {"n": 0}
    ordered = sorted(samples_ns)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {
        "n": len(ordered),
        "median_us": statistics.median(ordered) / 1000,
        "p99_us": p99 / 1000,
        "samples_us": [s / 1000 for s in samples_ns],
    }


def timed(fn: Callable[[int], object], n: int, warmup: int = WARMUP) -> list[int]:
    """Call fn(i) n times after `warmup` unrecorded calls; the durations in ns."""
    for i in range(warmup):
        fn(-1 - i)
    out = []
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        fn(i)
        out.append(clock() - t0)
    return out


# ---------------------------------------------------------------- operations


def measure_ops(target: Target, n: int, forks: int) -> dict[str, dict]:
    """Every client operation of OPS against one target."""
    root = target.root
    a, b = root / "a", root / "b"
    a.mkdir()
    b.mkdir()
    sleepy = sleeper()
    try:
        pid = str(sleepy.pid).encode()
        write_file(a / "tasks", pid)
        results: dict[str, list[int]] = {}

        def mkdir(i: int) -> None:
            os.mkdir(root / f"m{i}")

        def rmdir(i: int) -> None:
            os.rmdir(root / f"m{i}")

        results["mkdir"] = timed(mkdir, n)
        results["stat"] = timed(lambda i: os.stat(a / "tasks"), n)
        results["readdir"] = timed(lambda i: os.listdir(a), n)
        results["read tasks"] = timed(lambda i: read_file(a / "tasks"), n)
        results["write pid"] = timed(
            lambda i: write_file((b if i % 2 == 0 else a) / "tasks", pid), n
        )
        results["rmdir"] = timed(rmdir, n)
        if target.tracks:
            results["fork visible"] = fork_visible(a, forks)
        write_file(a / "tasks", pid)
    finally:
        sleepy.kill()
        sleepy.wait()
    _rmdir_when_empty(a)
    _rmdir_when_empty(b)
    return {op: summary(samples) for op, samples in results.items()}


def _rmdir_when_empty(path: Path, timeout: float = 10.0) -> None:
    """rmdir, retrying while the exits of its last tasks are still on their way."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def fork_visible(container: Path, n: int) -> list[int]:
    """Delays (ns) from fork() to the child's pid in `tasks`, seen from inside.

    A prober process joins `container`; for each sample it forks a child that
    waits on a pipe, reads `tasks` until the child is listed, then releases
    and reaps it. The samples come back over a pipe as JSON.
    """
    r, w = os.pipe()
    prober = os.fork()
    if prober == 0:  # pragma: no cover - child process
        os.close(r)
        code = 1
        try:
            write_file(container / "tasks", b"0")
            samples = _probe_forks(container / "tasks", n)
            os.write(w, json.dumps(samples).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(prober, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("the fork prober failed")
    return json.loads(data)


def _probe_forks(tasks: Path, n: int) -> list[int]:
    samples = []
    clock = time.perf_counter_ns
    for i in range(n + WARMUP):
        gate_r, gate_w = os.pipe()
        t0 = clock()
        child = os.fork()
        if child == 0:  # pragma: no cover - grandchild
            os.read(gate_r, 1)
            os._exit(0)
        want = f"\n{child}\n".encode()
        while want not in b"\n" + read_file(tasks):
            pass
        elapsed = clock() - t0
        os.write(gate_w, b"x")
        os.close(gate_r)
        os.close(gate_w)
        os.waitpid(child, 0)
        if i >= WARMUP:
            samples.append(elapsed)
    return samples


def run_ops(quick: bool) -> dict:
    """The operation table: each target in turn, one fresh instance each."""
    n = 300 if quick else 3000
    forks = 100 if quick else 1000
    out: dict[str, dict] = {}
    notes = []
    for factory in (Floor, Kernel, Containerfs):
        try:
            with factory() as target:
                out[target.name] = measure_ops(target, n, forks)
        except TargetUnavailable as exc:
            notes.append(f"{factory.name}: {exc}")
    return {"ops": out, "notes": notes}


# -------------------------------------------------------------- scale runs


def lookups(root: Path, names: list[str], rounds: int) -> list[int]:
    """FUSE lookups: stat of container names whose cached entry has expired.

    The kernel caches a name for CACHE_TIMEOUT; waiting that long before a
    round makes every stat of the round a real lookup in the filesystem (the
    kernel's cgroupfs has no such expiry: there it is a dcache hit).
    """
    samples: list[int] = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        time.sleep(CACHE_TIMEOUT + 0.1)
        for name in names:
            path = root / name
            t0 = clock()
            os.stat(path)
            samples.append(clock() - t0)
    return samples


def mkdir_cost(root: Path, n: int) -> tuple[list[int], list[int]]:
    """mkdir then rmdir of one extra container, n times: the count stays put."""
    made, removed = [], []
    clock = time.perf_counter_ns
    for i in range(n + WARMUP):
        path = root / f"x{i}"
        t0 = clock()
        os.mkdir(path)
        t1 = clock()
        os.rmdir(path)
        t2 = clock()
        if i >= WARMUP:
            made.append(t1 - t0)
            removed.append(t2 - t1)
    return made, removed


def scale_target(target: Target, quick: bool, many: int, members: int) -> dict:
    """mkdir and lookup at 10 and at `many` containers, then a `members`-task read."""
    root = target.root
    n = 200 if quick else 1000
    out: dict[str, dict] = {}
    for i in range(10):
        os.mkdir(root / f"c{i}")
    made, removed = mkdir_cost(root, n)
    out["mkdir @10"] = summary(made)
    out["rmdir @10"] = summary(removed)
    out["lookup @10"] = summary(lookups(root, [f"c{i}" for i in range(10)], 3 if quick else 20))
    t0 = time.perf_counter()
    for i in range(10, many):
        os.mkdir(root / f"c{i}")
    out["create rate"] = {"containers": many, "per_s": (many - 10) / (time.perf_counter() - t0)}
    made, removed = mkdir_cost(root, n)
    out[f"mkdir @{many}"] = summary(made)
    out[f"rmdir @{many}"] = summary(removed)
    step = max(1, many // n)
    out[f"lookup @{many}"] = summary(lookups(root, [f"c{i}" for i in range(0, many, step)], 1))

    big = root / "big"
    big.mkdir()
    holder = ThreadHolder(members - 1)
    try:
        if target.tracks:
            write_file(big / "cgroup.procs", str(holder.pid).encode())
            listed = len(read_file(big / "tasks").split())
            if listed != members:
                raise RuntimeError(f"{target.name}: big/tasks lists {listed}, not {members}")
        reads = timed(lambda i: read_file(big / "tasks"), 20 if quick else 100, warmup=3)
        out[f"read tasks ({members} members)"] = summary(reads)
        if isinstance(target, Containerfs):
            out["memory"] = spread_and_weigh(target, holder, many)
    finally:
        holder.close()
    return out


def spread_and_weigh(target: Containerfs, holder: ThreadHolder, many: int) -> dict:
    """One task per container, then the daemon's RSS: the 100 MB target."""
    tids = holder.tids()
    t0 = time.perf_counter()
    for i, tid in enumerate(tids[:many]):
        write_file(target.root / f"c{i}" / "tasks", str(tid).encode())
    moved = min(len(tids), many)
    elapsed = time.perf_counter() - t0
    pid = target.server_pid
    assert pid is not None
    stats = target.stats()
    return {
        "containers": stats["containers"],
        "tracked_tasks": stats["tracker"]["tasks"],
        "tasks_spread": moved,
        "moves_per_s": moved / elapsed,
        "rss_mb": rss_bytes(pid) / 2**20,
    }


def run_scale(quick: bool) -> dict:
    many = 10_000
    members = 10_000
    out: dict[str, dict] = {}
    notes = []
    for factory in (Floor, Kernel, Containerfs):
        kwargs = {"tasks_lines": members} if factory is Floor else {}
        try:
            with factory(**kwargs) as target:
                out[target.name] = scale_target(target, quick, many, members)
        except TargetUnavailable as exc:
            notes.append(f"{factory.name}: {exc}")
    return {"scale": out, "notes": notes}


# ------------------------------------------------------------ daemon cost


def cpu_share(pid: int, seconds: float) -> float:
    """Fraction of one core `pid` used over the next `seconds`."""
    c0, t0 = cpu_ns(pid), time.perf_counter_ns()
    time.sleep(seconds)
    return (cpu_ns(pid) - c0) / (time.perf_counter_ns() - t0)


FORKER = """
import os, sys, time
rate, seconds = float(sys.argv[1]), float(sys.argv[2])
start = time.monotonic()
done = 0
while (now := time.monotonic()) - start < seconds:
    due = int((now - start) * rate)
    while done < due:
        if os.fork() == 0:
            os._exit(0)
        done += 1
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    time.sleep(0.001)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
print(done / (time.monotonic() - start), flush=True)
"""


def run_daemon_cost(quick: bool) -> dict:
    """Idle RSS and CPU with 1,000 tracked tasks, then under 1,000 forks per second."""
    idle_s = 5.0 if quick else 30.0
    storm_s = 5.0 if quick else 20.0
    with Containerfs() as target:
        pid = target.server_pid
        assert pid is not None
        box = target.root / "idle"
        box.mkdir()
        holder = ThreadHolder(999)  # 1,000 tasks in one container
        try:
            write_file(box / "cgroup.procs", str(holder.pid).encode())
            time.sleep(1.0)
            tracked = target.stats()["tracker"]["tasks"]
            idle = {
                "tracked_tasks": tracked,
                "seconds": idle_s,
                "cpu_percent": 100 * cpu_share(pid, idle_s),
                "rss_mb": rss_bytes(pid) / 2**20,
            }
        finally:
            holder.close()
        storm_box = target.root / "storm"
        storm_box.mkdir()
        forker = subprocess.Popen(
            [PYTHON, "-c", f"import sys; sys.stdin.readline()\n{FORKER}", "1000", str(storm_s)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert forker.stdin is not None and forker.stdout is not None
        write_file(storm_box / "cgroup.procs", str(forker.pid).encode())
        before = target.stats()["tracker"]
        forker.stdin.write("go\n")
        forker.stdin.flush()
        time.sleep(min(1.0, storm_s / 4))
        share = cpu_share(pid, storm_s / 2)
        rss = rss_bytes(pid) / 2**20
        rate = float(forker.stdout.readline())
        forker.wait()
        after = target.stats()["tracker"]
        storm = {
            "seconds": storm_s,
            "forks_per_s": rate,
            "cpu_percent": 100 * share,
            "rss_mb": rss,
            "events": after["events"] - before["events"],
            "losses": after["losses"] - before["losses"],
            "resyncs": after["resyncs"] - before["resyncs"],
        }
        with contextlib.suppress(OSError):
            storm_box.rmdir()
    return {"daemon": {"idle": idle, "storm": storm}}
