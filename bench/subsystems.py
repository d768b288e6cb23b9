"""Subsystem enforcement, measured: the numtasks fork storm and cpuacct's accuracy.

numtasks: a container with numtasks.max=20 and a shell in it forking
`sleep` children as fast as it can. A thread polls the shell's children in
/proc and counts the live ones (zombies are dead), so "peak alive" is what
the machine really held, next to the daemon's own numtasks.peak. The time
from fork to kill of each killed child is its elapsed time at exit, from the
kernel's taskstats exit record (ac_etime, in us): a SIGKILL death is the kill.

cpuacct: burners in a container, their CPU time taken from the kernel
(getrusage(RUSAGE_CHILDREN) after they are reaped, which is their
sum_exec_runtime), against cpuacct.usage. Long CPU-bound tasks, then many
short-lived ones (where the exit path carries the whole count).
"""

from __future__ import annotations

import contextlib
import os
import resource
import shlex
import signal
import struct
import subprocess
import threading
import time
from pathlib import Path

from bench.targets import PYTHON, Containerfs
from containerfs.subsys.cpuacct import TaskstatsListener

LIMIT = 20
#: how often the storm's live children are counted
POLL_S = 0.002
#: struct taskstats offsets (linux/taskstats.h)
_OFF_EXITCODE = 4
_OFF_PPID = 132
_OFF_ETIME = 144

STORM = """
read go
i=0
while [ $i -lt {n} ]; do
    sleep 100000 &
    i=$((i+1))
done
echo done
read wait
"""

BURN = """
import sys, threading, time
def burn(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass
seconds, extra = float(sys.argv[1]), int(sys.argv[2])
threads = [threading.Thread(target=burn, args=(seconds,)) for _ in range(extra)]
[t.start() for t in threads]
burn(seconds)
[t.join() for t in threads]
"""


def _write(path: Path, data: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def _pct(ordered: list[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _alive_children(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
    except OSError:
        return None
    alive = 0
    for kid in kids:
        try:
            with open(f"/proc/{kid}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            alive += 1
    return alive


def fork_storm(view: Path, forks: int) -> dict:
    c = view / "storm"
    os.mkdir(c)
    _write(c / "numtasks.max", str(LIMIT))
    listener = TaskstatsListener()
    listener.open()
    sh = subprocess.Popen(
        ["sh", "-c", STORM.format(n=forks)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    peak = 0
    stop = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not stop.is_set():
            n = _alive_children(sh.pid)
            if n is not None:
                peak = max(peak, n + 1)
            # sampled, not spun: a spinning poller takes a core from the daemon it measures
            time.sleep(POLL_S)

    poller = threading.Thread(target=poll, daemon=True)
    try:
        _write(c / "cgroup.procs", str(sh.pid))
        poller.start()
        t0 = time.perf_counter()
        assert sh.stdin is not None and sh.stdout is not None
        sh.stdin.write("go\n")
        sh.stdin.flush()
        sh.stdout.readline()
        storm_s = time.perf_counter() - t0
        deadline = time.monotonic() + 60
        while int((c / "numtasks.current").read_text()) > LIMIT and time.monotonic() < deadline:
            time.sleep(0.01)
        settled_s = time.perf_counter() - t0
        time.sleep(0.3)
        stop.set()
        poller.join()
        kill_ms = []
        for _tid, stats in listener.records():
            (code,) = struct.unpack_from("=I", stats, _OFF_EXITCODE)
            (ppid,) = struct.unpack_from("=I", stats, _OFF_PPID)
            (etime_us,) = struct.unpack_from("=Q", stats, _OFF_ETIME)
            if ppid == sh.pid and code & 0x7F == signal.SIGKILL:
                kill_ms.append(etime_us / 1000)
        kill_ms.sort()
        return {
            "forks": forks,
            "limit": LIMIT,
            "peak_alive": peak,
            "numtasks_peak": int((c / "numtasks.peak").read_text()),
            "final_current": int((c / "numtasks.current").read_text()),
            "events": int((c / "numtasks.events").read_text().split()[1]),
            "kills_seen": len(kill_ms),
            "fork_to_kill_ms": {
                "median": _pct(kill_ms, 0.5),
                "p99": _pct(kill_ms, 0.99),
                "max": kill_ms[-1] if kill_ms else None,
            },
            "storm_s": storm_s,
            "settled_s": settled_s,
            "taskstats_lost": listener.lost,
        }
    finally:
        stop.set()
        listener.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sh.pid, signal.SIGKILL)
        sh.wait()


def _children_cpu_ns() -> int:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((ru.ru_utime + ru.ru_stime) * 1e9)


def _schedstat_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def accuracy(view: Path, name: str, commands: list[list[str]]) -> dict:
    """Run the commands inside container `name`; cpuacct.usage against their real CPU time.

    A shell joins the container while it waits, then starts them, so they are
    members from their first instruction; its CPU time before joining is not
    the container's, so it is subtracted.
    """
    c = view / name
    os.mkdir(c)
    before = _children_cpu_ns()
    script = "read go; " + "".join(f"{shlex.join(argv)} & " for argv in commands) + "wait"
    gate = subprocess.Popen(["sh", "-c", script], stdin=subprocess.PIPE, text=True)
    time.sleep(0.2)  # let it reach `read`
    _write(c / "cgroup.procs", str(gate.pid))
    outside = _schedstat_ns(gate.pid)
    assert gate.stdin is not None
    gate.stdin.write("go\n")
    gate.stdin.close()
    gate.wait()
    real_ns = _children_cpu_ns() - before - outside
    # exits reach the daemon through netlink: give them a moment before reading
    time.sleep(0.5)
    got = int((c / "cpuacct.usage").read_text())
    return {
        "real_cpu_s": real_ns / 1e9,
        "cpuacct_s": got / 1e9,
        "error_percent": 100 * (got - real_ns) / real_ns if real_ns else None,
    }


def run(quick: bool = False) -> dict:
    forks = 200 if quick else 1000
    target = Containerfs("cpuacct,numtasks,name=bench")
    try:
        target.start()
        view = target.root
        storm = fork_storm(view, forks)
        burn_s = "0.3" if quick else "1.0"
        long = accuracy(view, "long", [[PYTHON, "-c", BURN, burn_s, "1"] for _ in range(2)])
        short_n = 100 if quick else 400
        loop = f"i=0; while [ $i -lt {short_n} ]; do /bin/true; i=$((i+1)); done"
        short = accuracy(view, "short", [["sh", "-c", loop]])
    finally:
        target.close()
    f2k = storm["fork_to_kill_ms"]
    table = [
        ["numtasks storm", f"{forks} forks, max={LIMIT}"],
        ["  peak alive / numtasks.peak", f"{storm['peak_alive']} / {storm['numtasks_peak']}"],
        ["  final current / events", f"{storm['final_current']} / {storm['events']}"],
        [
            "  fork-to-kill median / p99",
            f"{f2k['median'] or 0:.1f} ms / {f2k['p99'] or 0:.1f} ms",
        ],
        [
            "cpuacct long burners",
            f"real {long['real_cpu_s']:.3f}s, usage {long['cpuacct_s']:.3f}s, "
            f"error {long['error_percent']:+.2f}%",
        ],
        [
            f"cpuacct {short_n} short tasks",
            f"real {short['real_cpu_s']:.3f}s, usage {short['cpuacct_s']:.3f}s, "
            f"error {short['error_percent']:+.2f}%",
        ],
    ]
    return {"numtasks_storm": storm, "cpuacct_long": long, "cpuacct_short": short, "table": table}
