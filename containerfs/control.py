"""The daemon's control socket: one JSON object per line, both ways.

The CLI uses it for what files cannot do (mount, stats, hierarchies,
membership, events, stop), and so keeps working when a mount is wedged. The
daemon checks each peer with SO_PEERCRED and allows nothing the same user
could not do through the files.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_LINE = 1 << 20


class ControlError(Exception):
    """The daemon refused a request: errno and message, as the core raised them."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message


@dataclass(frozen=True, slots=True)
class Peer:
    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return Peer(*struct.unpack("3i", raw))


def encode(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _connect(path: Path, timeout: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


def _lines(sock: socket.socket) -> Iterator[dict]:
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            reply = json.loads(line)
            if not reply.get("ok", True):
                raise ControlError(reply.get("errno", 0), reply.get("error", "refused"))
            yield reply


def request(path: Path, message: dict, timeout: float | None = 30.0) -> dict:
    """Send one request and return its one reply; raises ControlError on refusal."""
    with _connect(path, timeout) as sock:
        sock.sendall(encode(message))
        for reply in _lines(sock):
            return reply
    raise ConnectionError("the daemon closed the connection without a reply")


def stream(path: Path, message: dict) -> Iterator[dict]:
    """Send one request and yield its replies until the daemon closes the stream."""
    with _connect(path, None) as sock:
        sock.sendall(encode(message))
        yield from _lines(sock)
