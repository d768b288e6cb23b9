"""The low-level task sources: /proc reads and the netlink proc connector.

Real processes, real threads and the real kernel connector (the suite runs as
root). Every process a test starts is killed and reaped, even on failure.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from containerfs.tracking import netlink, procscan
from containerfs.tracking.events import Event, Exec, Exit, Fork
from containerfs.tracking.netlink import EventsLost, ProcConnector
from containerfs.tracking.procscan import TaskInfo

# --------------------------------------------------------------- helpers

#: A child with three extra threads. It names itself (argv[1], hex) if asked,
#: prints its thread ids, and exits when its stdin closes.
THREADED_CHILD = r"""
import sys, threading
if len(sys.argv) > 1:
    with open("/proc/self/comm", "wb") as f:
        f.write(bytes.fromhex(sys.argv[1]))
done = threading.Event()
threads = [threading.Thread(target=done.wait) for _ in range(3)]
for t in threads:
    t.start()
print(" ".join(str(t.native_id) for t in threads), flush=True)
sys.stdin.read()
done.set()
"""

#: A child that starts one thread per "t" line (printing its tid) and ends that
#: thread on the next "x" line; it exits when its stdin closes.
THREAD_ON_DEMAND = r"""
import sys, threading
stop = threading.Event()
def body():
    print(threading.get_native_id(), flush=True)
    stop.wait()
worker = None
for line in sys.stdin:
    if line.strip() == "t":
        worker = threading.Thread(target=body)
        worker.start()
    elif line.strip() == "x":
        stop.set()
        worker.join()
        print("joined", flush=True)
"""

#: A multithreaded child whose non-leader thread calls execve.
EXEC_FROM_THREAD = r"""
import os, sys, threading, time
def execer():
    print(threading.get_native_id(), flush=True)
    sys.stdin.readline()
    os.execv("/bin/true", ["true"])
idle = threading.Thread(target=time.sleep, args=(60,), daemon=True)
idle.start()
print(idle.native_id, flush=True)
threading.Thread(target=execer).start()
time.sleep(60)
"""


@contextlib.contextmanager
def python_child(code: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            assert pipe is not None
            with contextlib.suppress(OSError):
                pipe.close()


def fork_exiting(code: int = 0) -> int:
    """Fork a child that exits at once with ``code``; the caller must reap it."""
    pid = os.fork()
    if pid == 0:
        os._exit(code)
    return pid


def reap(pid: int) -> int:
    """Reap a child of fork_exiting (it needs no kill); returns the wait status."""
    return os.waitpid(pid, 0)[1]


def stat_state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return procscan.parse_stat(f.read(), pid, pid).state
    except FileNotFoundError:
        return None


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def collect(
    conn: ProcConnector, done: Callable[[list[Event]], bool], timeout: float = 5.0
) -> list[Event]:
    """Read events until ``done(events)`` holds; fail after ``timeout``."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    deadline = time.monotonic() + timeout
    events: list[Event] = []
    while True:
        events += conn.read_events()
        if done(events):
            return events
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"timed out; got {len(events)} events"
        poller.poll(remaining * 1000)


def about(events: list[Event], tgid: int) -> list[Event]:
    """The events of one process (its fork, threads, exec and exits), in order."""
    return [
        ev
        for ev in events
        if (isinstance(ev, Fork) and ev.child_tgid == tgid)
        or (isinstance(ev, Exec | Exit) and ev.tgid == tgid)
    ]


def has_exit(tid: int) -> Callable[[list[Event]], bool]:
    return lambda events: any(isinstance(ev, Exit) and ev.tid == tid for ev in events)


def open_or_skip(conn: ProcConnector) -> ProcConnector:
    try:
        conn.open()
    except OSError as exc:
        pytest.skip(f"netlink proc connector unavailable here: {exc}")
    return conn


@pytest.fixture
def connector() -> Iterator[ProcConnector]:
    conn = open_or_skip(ProcConnector())
    try:
        yield conn
    finally:
        conn.close()


# ----------------------------------------------------------- parse_stat


def stat_line(tid: int, comm: str, state: str, ppid: int, flags: int, start: int) -> str:
    """A stat line as the kernel writes it: 52 fields, comm raw in parentheses."""
    fields = [str(i) for i in range(3, 53)]  # placeholders: field n holds "n"
    fields[3 - 3] = state
    fields[4 - 3] = str(ppid)
    fields[9 - 3] = str(flags)
    fields[22 - 3] = str(start)
    return f"{tid} ({comm}) " + " ".join(fields) + "\n"


@pytest.mark.parametrize(
    "comm",
    [
        "sleep",
        "a b",
        "a) b",
        ") ) (",
        "x) R 1 2 3",
        "(",
        "",
        "tab\there",
        "nl\nx) Z 9",
        "(((",
        "a)",
    ],
)
def test_parse_stat_survives_hostile_comm(comm: str) -> None:
    text = stat_line(77, comm, "S", 4242, 0x04208040, 987654)
    assert procscan.parse_stat(text, 77, 70) == TaskInfo(
        tid=77, tgid=70, ppid=4242, start_time=987654, state="S", flags=0x04208040
    )


def test_parse_stat_of_a_real_task_agrees_with_the_kernel() -> None:
    info = procscan.read_task(os.getpid())
    assert info is not None
    assert info.tid == info.tgid == os.getpid()
    assert info.ppid == os.getppid()
    assert info.state in ("R", "S")
    assert not procscan.is_unmovable_kthread(info)
    assert not info.flags & procscan.PF_KTHREAD


def test_real_hostile_comm_cannot_confuse_stat_or_status() -> None:
    # A comm may hold ')', spaces and even a newline in stat (raw there); in
    # status "\n" is escaped but U+0085 is not, and str.splitlines() would
    # break at it, letting a task forge its own "Uid:" or "Tgid:" line.
    uids = os.getresuid()
    for comm in (b"a\nb) Z 1 (", "\u0085Uid:\t7\t7\t7".encode(), "\u0085Tgid:\t1".encode()):
        assert len(comm) < 16
        with python_child(THREADED_CHILD, comm.hex()) as child:
            assert child.stdout is not None
            child.stdout.readline()
            with open(f"/proc/{child.pid}/comm", "rb") as f:
                assert f.read() == comm + b"\n"
            info = procscan.read_task(child.pid)
            assert info is not None
            assert (info.tid, info.tgid, info.ppid) == (child.pid, child.pid, os.getpid())
            assert info.state in ("R", "S")
            scanned = procscan.scan_tasks()[child.pid]
            assert (scanned.tgid, scanned.ppid, scanned.start_time) == (
                info.tgid,
                info.ppid,
                info.start_time,
            )
            assert procscan.read_ids(child.pid) == uids


# ------------------------------------------------------------- scanning


def test_scan_finds_a_fresh_process_and_its_threads() -> None:
    with python_child(THREADED_CHILD) as child:
        assert child.stdout is not None
        extra = [int(t) for t in child.stdout.readline().split()]
        assert len(extra) == 3
        everyone = [child.pid, *extra]

        tasks = procscan.scan_tasks()
        for tid in everyone:
            info = tasks[tid]
            assert info.tid == tid
            assert info.tgid == child.pid
            # a thread's stat names the process's parent, like its fork event
            assert info.ppid == os.getpid()
            assert info.state not in ("Z", "X")
            assert info.start_time > 0
            assert procscan.read_task(tid) == info
        assert tasks[os.getpid()].tgid == os.getpid()

        tids = procscan.scan_tids()
        assert {tid: tids[tid] for tid in everyone} == dict.fromkeys(everyone, child.pid)
        assert procscan.process_threads(child.pid) == sorted(everyone)

        assert child.stdin is not None
        child.stdin.close()
        assert child.wait(timeout=10) == 0
    assert procscan.process_threads(child.pid) == []


def test_scan_leaves_out_zombies() -> None:
    pid = fork_exiting()
    try:
        wait_for(lambda: stat_state(pid) == "Z")
        assert pid not in procscan.scan_tasks()
        assert procscan.read_task(pid) is None
        # scan_tids sees directories only: the zombie's entry is still there
        assert procscan.scan_tids()[pid] == pid
    finally:
        reap(pid)


def test_gone_tasks_read_as_none() -> None:
    pid = fork_exiting()
    reap(pid)
    assert procscan.read_task(pid) is None
    assert procscan.read_ids(pid) is None
    assert procscan.process_threads(pid) == []
    with open("/proc/sys/kernel/pid_max") as f:
        beyond = int(f.read()) + 1
    assert procscan.read_task(beyond) is None
    assert procscan.read_ids(beyond) is None


def test_read_ids_matches_our_credentials() -> None:
    assert procscan.read_ids(os.getpid()) == os.getresuid()
    seen: list[tuple[int, int, int] | None] = []
    worker = threading.Thread(
        target=lambda: seen.append(procscan.read_ids(threading.get_native_id()))
    )
    worker.start()
    worker.join()
    assert seen == [os.getresuid()]


def test_bound_kernel_threads_are_unmovable() -> None:
    kthreads = [t for t in procscan.scan_tasks().values() if t.flags & procscan.PF_KTHREAD]
    assert kthreads, "no kernel threads visible"
    unmovable = [t for t in kthreads if procscan.is_unmovable_kthread(t)]
    assert unmovable, "no per-CPU kernel thread found (ksoftirqd, migration, ...)"
    assert all(t.flags & procscan.PF_NO_SETAFFINITY for t in unmovable)


# ---------------------------------------------------- the proc connector


def test_fork_and_exit_of_a_process(connector: ProcConnector) -> None:
    pid = fork_exiting(3)
    try:
        events = collect(connector, has_exit(pid))
    finally:
        status = reap(pid)
    assert os.waitstatus_to_exitcode(status) == 3
    mine = about(events, pid)
    assert mine[0] == Fork(
        parent_tid=threading.get_native_id(),
        parent_tgid=os.getpid(),
        child_tid=pid,
        child_tgid=pid,
    )
    assert mine[-1] == Exit(tid=pid, tgid=pid, exit_code=3 << 8, exit_signal=signal.SIGCHLD)
    assert connector.received >= len(mine)


def test_fork_from_a_thread_names_that_thread(connector: ProcConnector) -> None:
    result: dict[str, int] = {}

    def forker() -> None:
        result["tid"] = threading.get_native_id()
        result["pid"] = fork_exiting()

    worker = threading.Thread(target=forker)
    worker.start()
    worker.join()
    pid = result["pid"]
    try:
        events = collect(connector, has_exit(pid))
    finally:
        reap(pid)
    assert result["tid"] != os.getpid()
    assert about(events, pid)[0] == Fork(result["tid"], os.getpid(), pid, pid)


def test_exec_is_reported_between_fork_and_exit(connector: ProcConnector) -> None:
    proc = subprocess.Popen(["/bin/true"])
    try:
        assert proc.wait(timeout=10) == 0
        events = collect(connector, has_exit(proc.pid))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    pid = proc.pid
    assert about(events, pid) == [
        Fork(threading.get_native_id(), os.getpid(), pid, pid),
        Exec(pid, pid),
        Exit(pid, pid, 0, signal.SIGCHLD),
    ]


def test_a_new_thread_names_its_process_and_the_process_parent(
    connector: ProcConnector,
) -> None:
    with python_child(THREAD_ON_DEMAND) as child:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write("t\n")
        child.stdin.flush()
        tid = int(child.stdout.readline())
        child.stdin.write("x\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "joined"
        child.stdin.close()
        assert child.wait(timeout=10) == 0
        events = collect(connector, has_exit(child.pid))

    mine = about(events, child.pid)
    thread_fork = next(ev for ev in mine if isinstance(ev, Fork) and ev.child_tid == tid)
    assert thread_fork.child_tid != thread_fork.child_tgid
    assert thread_fork.child_tgid == child.pid
    # Not the creating thread (child.pid) but the process's own parent: us.
    assert (thread_fork.parent_tid, thread_fork.parent_tgid) == (
        threading.get_native_id(),
        os.getpid(),
    )
    thread_exit = next(ev for ev in mine if isinstance(ev, Exit) and ev.tid == tid)
    assert thread_exit == Exit(tid=tid, tgid=child.pid, exit_code=0, exit_signal=-1)
    assert mine.index(thread_fork) < mine.index(thread_exit)
    assert mine[-1] == Exit(child.pid, child.pid, 0, signal.SIGCHLD)


def test_exec_from_a_non_leader_thread(connector: ProcConnector) -> None:
    """What the tracker must expect: the old leader's Exit looks like the end of
    the process, then the exec'ing thread reappears under the leader's id, and
    its own old tid never gets an Exit."""
    with python_child(EXEC_FROM_THREAD) as child:
        assert child.stdin is not None and child.stdout is not None
        idle = int(child.stdout.readline())
        execer = int(child.stdout.readline())
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.wait(timeout=10) == 0
    pid = child.pid
    process_exit = Exit(pid, pid, 0, signal.SIGCHLD)
    events = collect(
        connector,
        lambda evs: evs.count(process_exit) == 2
        and any(isinstance(ev, Exit) and ev.tid == idle for ev in evs),
    )

    mine = [ev for ev in about(events, pid) if not isinstance(ev, Fork)]
    leader_exit = mine.index(process_exit)
    # the first Exec is the child starting python, the last one is the thread's
    assert mine.count(Exec(pid, pid)) == 2
    exec_at = len(mine) - 1 - mine[::-1].index(Exec(pid, pid))
    # the old leader's Exit precedes the Exec (de_thread waits for it); the other
    # thread's Exit is sent on its own CPU and may arrive on either side of it
    assert leader_exit < exec_at
    assert any(isinstance(ev, Exit) and ev.tid == idle for ev in mine)
    assert not any(isinstance(ev, Exit | Exec) and ev.tid == execer for ev in mine)
    assert mine.index(process_exit, leader_exit + 1) > exec_at  # the process's real end


def test_overflow_raises_events_lost_and_the_connector_recovers() -> None:
    conn = open_or_skip(ProcConnector(rcvbuf=0))
    try:
        sock = socket.socket(fileno=os.dup(conn.fileno()))
        with sock:
            small = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert small < 64 << 10, "the kernel did not shrink the receive buffer"

        storm: list[int] = []
        for _ in range(2000):
            storm.append(fork_exiting())
            reap(storm[-1])
        with pytest.raises(EventsLost):
            conn.read_events()
        assert conn.lost == 1

        # New events flow again. A buffer this small may overflow anew while
        # other work runs on the machine; such a loss is reported as well.
        retries = 0
        for _ in range(20):
            pid = fork_exiting()
            try:
                events = collect(conn, has_exit(pid))
                break
            except EventsLost:
                retries += 1
            finally:
                reap(pid)
        else:
            pytest.fail("the connector never recovered")
        assert conn.lost == 1 + retries
        assert Fork(threading.get_native_id(), os.getpid(), pid, pid) in events
        # Everything queued before the raise was discarded with it.
        stale = set(storm)
        assert not [ev for ev in events if isinstance(ev, Fork) and ev.child_tgid in stale]
    finally:
        conn.close()


# ------------------------------------------------- datagrams and sockets


def _message(what: int, data: bytes, msg_type: int = netlink.NLMSG_DONE) -> bytes:
    body = netlink.PROC_EVENT.pack(what, 0, 123) + data
    cn = netlink.CN_MSG.pack(netlink.CN_IDX_PROC, netlink.CN_VAL_PROC, 0, 0, len(body), 0)
    length = netlink.NLMSGHDR.size + len(cn) + len(body)
    message = netlink.NLMSGHDR.pack(length, msg_type, 0, 0, 0) + cn + body
    return message + b"\0" * (-length % 4)  # NLMSG_ALIGN padding


def test_a_datagram_with_several_messages_is_walked_whole() -> None:
    # 6.x appends the parent's pid and tgid to an exit event: ignored
    exit_data = netlink.EXIT_DATA.pack(5, 4, 9, -1) + netlink.EXEC_DATA.pack(1, 1)
    head = (
        _message(netlink.PROC_EVENT_FORK, netlink.FORK_DATA.pack(1, 1, 4, 4))
        + _message(0, b"\0\0\0\0")  # the subscription ack (PROC_EVENT_NONE)
        + _message(0x200, b"\0" * 24)  # PROC_EVENT_COMM: not tracked
        + _message(netlink.PROC_EVENT_EXEC, netlink.EXEC_DATA.pack(4, 4) + b"\0")  # odd length
        + _message(netlink.PROC_EVENT_FORK, b"\0" * 16, msg_type=netlink.NLMSG_NOOP)
    )
    tail = (
        _message(netlink.PROC_EVENT_EXIT, exit_data)
        + _message(netlink.PROC_EVENT_FORK, b"\0" * 8)  # too short to be a fork
    )
    datagram = bytearray(head + tail)
    out: list[Event] = []
    netlink._parse_datagram(datagram, len(datagram), out)
    assert out == [Fork(1, 1, 4, 4), Exec(4, 4), Exit(5, 4, 9, -1)]

    # a message cut short ends the walk; the ones before it stand
    truncated: list[Event] = []
    netlink._parse_datagram(datagram, len(head) + 30, truncated)
    assert truncated == out[:2]


def test_forged_events_from_a_user_socket_are_ignored(connector: ProcConnector) -> None:
    # Any local process may unicast to our netlink port; only port 0 is the kernel.
    port = socket.socket(fileno=os.dup(connector.fileno()))
    with port:
        target = port.getsockname()[0]
    forged = _message(netlink.PROC_EVENT_FORK, netlink.FORK_DATA.pack(1, 1, 4_000_000, 4_000_000))
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, netlink.NETLINK_CONNECTOR) as sender:
        sender.bind((0, 0))
        sender.sendto(forged, (target, 0))
    pid = fork_exiting()
    try:
        events = collect(connector, has_exit(pid))
    finally:
        reap(pid)
    assert not [ev for ev in events if isinstance(ev, Fork) and ev.child_tid == 4_000_000]


def test_close_is_final_and_idempotent() -> None:
    conn = open_or_skip(ProcConnector())
    conn.close()
    conn.close()
    with pytest.raises(RuntimeError):
        conn.fileno()
    with pytest.raises(RuntimeError):
        conn.read_events()
