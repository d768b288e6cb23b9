"""The kernel's netlink process connector (cn_proc): fork, exec and exit events.

Plain, non-blocking socket code. The caller waits for readability itself (under
trio with ``trio.lowlevel.wait_readable(conn.fileno())``) and then calls
:meth:`ProcConnector.read_events`.

Netlink delivery from the kernel is unreliable by design: when the receive queue
is full the kernel drops events and reports ENOBUFS once. That is surfaced as
:class:`EventsLost`, and the only correct reaction is a resync from /proc.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import time

from containerfs.tracking.events import Event, Exec, Exit, Fork

NETLINK_CONNECTOR = 11
CN_IDX_PROC = 1
CN_VAL_PROC = 1
SO_RCVBUFFORCE = 33  # not exported by the socket module

NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3  # the type the connector puts on every message, both ways

PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2

PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
PROC_EVENT_EXIT = 0x80000000

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
CN_MSG = struct.Struct("=IIIIHH")  # idx, val, seq, ack, len, flags
PROC_EVENT = struct.Struct("=IIQ")  # what, cpu, timestamp_ns; the union follows
FORK_DATA = struct.Struct("=iiii")  # parent_pid, parent_tgid, child_pid, child_tgid
EXEC_DATA = struct.Struct("=ii")  # process_pid, process_tgid
# process_pid, process_tgid, exit_code, exit_signal; 6.x appends the parent's ids,
# which we do not need. exit_signal is a C int stored in a u32: read it signed so
# a thread's -1 stays -1.
EXIT_DATA = struct.Struct("=iiIi")

PROBE_TIMEOUT = 1.0
RECV_BUFFER = 1 << 16  # one datagram holds a single small event; this is ample


class EventsLost(Exception):
    """recv gave ENOBUFS: the kernel dropped events; the caller must resync from /proc."""


class ProcConnector:
    """A subscription to the process connector.

    Needs root (CAP_NET_ADMIN before Linux 6.6) and the initial user and pid
    namespaces; :meth:`open` proves that events really arrive, because outside
    those namespaces the kernel ignores the subscription without an error.

    Counters: ``received`` is the number of events handed out by
    :meth:`read_events`, ``lost`` the number of ENOBUFS reports.
    """

    def __init__(self, rcvbuf: int = 8 << 20) -> None:
        self.rcvbuf = rcvbuf
        self.received = 0
        self.lost = 0
        self._sock: socket.socket | None = None
        self._buf = bytearray(RECV_BUFFER)

    # ------------------------------------------------------------ lifecycle

    def open(self) -> None:
        """Subscribe, then check with a probe fork that events really arrive.

        Raises OSError when the kernel refuses (EPERM on socket, bind or the
        probe). Events that arrive during the probe are dropped: the caller
        scans /proc after opening anyway.
        """
        if self._sock is not None:
            raise RuntimeError("ProcConnector is already open")
        sock = socket.socket(
            socket.AF_NETLINK,
            socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            NETLINK_CONNECTOR,
        )
        self._sock = sock
        try:
            sock.bind((0, CN_IDX_PROC))
            self._control(PROC_CN_MCAST_LISTEN)
            self._probe()
            # Sized only now: with a tiny buffer (as tests use) unrelated events
            # could overflow it during the probe and drop the probe's own event.
            self._set_rcvbuf()
        except BaseException:
            self._sock = None
            sock.close()
            raise

    def fileno(self) -> int:
        return self._socket().fileno()

    def close(self) -> None:
        """Unsubscribe (so the kernel stops producing events when nobody listens)
        and close. Safe to call twice."""
        sock, self._sock = self._sock, None
        if sock is None:
            return
        # Failing is harmless: closing the socket unsubscribes too (Linux 6.6+).
        with contextlib.suppress(OSError):
            self._send_control(sock, PROC_CN_MCAST_IGNORE)
        sock.close()

    # --------------------------------------------------------------- events

    def read_events(self) -> list[Event]:
        """Every event queued now, oldest first; never blocks.

        On ENOBUFS the events of this call are dropped, the queue is drained
        and discarded too, and EventsLost is raised. So everything up to the
        raise is the resync scan's business, and later calls return only newer
        events. Draining matters beyond that: see :meth:`_discard_queued`.
        """
        try:
            events = self._read_available()
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            self.lost += 1
            self._discard_queued()
            raise EventsLost("netlink receive queue overflowed; events were dropped") from exc
        self.received += len(events)
        return events

    # ------------------------------------------------------------- internal

    def _socket(self) -> socket.socket:
        if self._sock is None:
            raise RuntimeError("ProcConnector is not open")
        return self._sock

    def _set_rcvbuf(self) -> None:
        sock = self._socket()
        try:
            # Root may exceed net.core.rmem_max, which is what we want.
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)

    def _control(self, op: int) -> None:
        self._send_control(self._socket(), op)

    @staticmethod
    def _send_control(sock: socket.socket, op: int) -> None:
        # The bare 4-byte op (not 6.6's op + event mask) is understood by every
        # kernel and subscribes to all event types.
        payload = struct.pack("=I", op)
        cn = CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0)
        total = NLMSGHDR.size + len(cn) + len(payload)
        hdr = NLMSGHDR.pack(total, NLMSG_DONE, 0, 0, sock.getsockname()[0])
        sock.sendto(hdr + cn + payload, (0, 0))

    def _probe(self) -> None:
        """Fork a child that exits at once and wait for its Fork event.

        Matching both our pid and the child's pid also rejects the case where
        we sit in a child pid namespace but still receive another listener's
        events (numbered in the initial namespace).
        """
        sock = self._socket()
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        me = os.getpid()
        deadline = time.monotonic() + PROBE_TIMEOUT
        child = _fork_and_reap()
        while True:
            try:
                events = self._read_available()
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                # The probe's event may be among those dropped: probe again.
                self._discard_queued()
                child = _fork_and_reap()
                events = []
            if any(
                isinstance(ev, Fork) and ev.child_tgid == child and ev.parent_tgid == me
                for ev in events
            ):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise OSError(errno.EPERM, "proc connector gives no events here")
            poller.poll(remaining * 1000)

    def _read_available(self) -> list[Event]:
        """recv until EAGAIN and parse; OSError(ENOBUFS) propagates."""
        sock = self._socket()
        buf = self._buf
        events: list[Event] = []
        while True:
            try:
                size, (sender, _groups) = sock.recvfrom_into(buf)
            except BlockingIOError:
                return events
            # Only the kernel (port 0) speaks for the connector: any local
            # process may unicast to our port, and must not forge events.
            if sender == 0:
                _parse_datagram(buf, size, events)

    def _discard_queued(self) -> None:
        """Empty the receive queue. Only an empty queue clears the kernel's
        congestion flag (NETLINK_S_CONGESTED); until then further overflows
        drop events without any ENOBUFS."""
        sock = self._socket()
        buf = self._buf
        while True:
            try:
                sock.recv_into(buf)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise


def _fork_and_reap() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    # ChildProcessError: someone else's waitpid(-1) got it first; gone either way.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    return pid


def _parse_datagram(buf: bytearray, size: int, out: list[Event]) -> None:
    """Append the events of one datagram, which may hold several messages."""
    offset = 0
    while offset + NLMSGHDR.size <= size:
        msg_len, msg_type, _flags, _seq, _pid = NLMSGHDR.unpack_from(buf, offset)
        if msg_len < NLMSGHDR.size or offset + msg_len > size:
            return  # malformed or truncated: nothing after it can be trusted
        if msg_type not in (NLMSG_NOOP, NLMSG_ERROR):
            event = _parse_cn_msg(buf, offset + NLMSGHDR.size, offset + msg_len)
            if event is not None:
                out.append(event)
        offset += (msg_len + 3) & ~3  # NLMSG_ALIGN


def _parse_cn_msg(buf: bytearray, start: int, end: int) -> Event | None:
    if start + CN_MSG.size > end:
        return None
    idx, val, _seq, _ack, length, _flags = CN_MSG.unpack_from(buf, start)
    data = start + CN_MSG.size
    if idx != CN_IDX_PROC or val != CN_VAL_PROC or data + length > end:
        return None
    if length < PROC_EVENT.size:
        return None
    what = PROC_EVENT.unpack_from(buf, data)[0]
    union = data + PROC_EVENT.size
    room = length - PROC_EVENT.size
    if what == PROC_EVENT_FORK and room >= FORK_DATA.size:
        return Fork(*FORK_DATA.unpack_from(buf, union))
    if what == PROC_EVENT_EXEC and room >= EXEC_DATA.size:
        return Exec(*EXEC_DATA.unpack_from(buf, union))
    if what == PROC_EVENT_EXIT and room >= EXIT_DATA.size:
        return Exit(*EXIT_DATA.unpack_from(buf, union))
    return None  # the subscription ack (NONE) and the event types we do not track
