"""The daemon's lifecycle event stream, served on the control socket.

A FUSE filesystem cannot raise inotify events for changes it makes itself,
so cgroup v2's "cgroup.events changed" notification becomes a stream of
JSON objects: `containerfs events [--follow] [--json]`.

Every event has `seq` (1, 2, 3, ... per daemon: a gap means events were
lost to this reader), `time` (wall clock, seconds since the epoch) and
`event`; events about a container add `hierarchy` (its id) and `path` (from
the hierarchy root). The kinds:

- `created`, `removed`, `renamed` (with `old_path`): containers;
- `populated`, `emptied`: the subtree gained its first task or lost its last;
- `agent_started` (`agent`, `pid`), `agent_finished` (`agent`, `pid`,
  `status`: the exit status or minus the signal number, `duration_ms`,
  `timed_out`), `agent_failed` (`agent`, `error`): release agent runs;
- `auto_delete`: the daemon is removing an empty container flagged
  cgroup.auto_delete (a `removed` follows);
- `killed` (`pid`): cgroup.kill sent SIGKILL to a process;
- `overflow`: the last event a reader gets when it fell too far behind;
  its `seq` is that of the first event the reader missed.

The daemon keeps the last `HISTORY` events; a reader that falls `BUFFER`
events behind is dropped with an `overflow` event, so no reader can make
the daemon wait or grow without bound.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import trio

from containerfs.core.container import Container
from containerfs.core.registry import Listener

#: events kept for `containerfs events` without --follow
HISTORY = 1000
#: events a following reader may fall behind before it is dropped
BUFFER = 10000


class Subscriber:
    """One following reader: a bounded queue the daemon never waits on."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.queue: deque[dict[str, Any]] = deque()
        self.closed = False
        self._wakeup = trio.Event()

    def push(self, event: dict[str, Any]) -> bool:
        """Queue `event`; False (after queueing a final overflow) when the reader lags."""
        if len(self.queue) >= self.limit:
            self.queue.append({"seq": event["seq"], "time": event["time"], "event": "overflow"})
            self.close()
            return False
        self.queue.append(event)
        self._wakeup.set()
        return True

    def close(self) -> None:
        self.closed = True
        self._wakeup.set()

    async def get(self) -> dict[str, Any] | None:
        """The next event, or None once the stream ended and the queue is empty."""
        while not self.queue:
            if self.closed:
                return None
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        return self.queue.popleft()


class EventStream(Listener):
    """Turns registry changes into numbered events and fans them out."""

    def __init__(self, history: int = HISTORY, buffer: int = BUFFER) -> None:
        self.seq = 0
        self.buffer = buffer
        self.recent: deque[dict[str, Any]] = deque(maxlen=history)
        self.subscribers: set[Subscriber] = set()

    def publish(self, kind: str, c: Container | None = None, **fields: Any) -> dict[str, Any]:
        self.seq += 1
        event: dict[str, Any] = {"seq": self.seq, "time": time.time(), "event": kind}
        if c is not None:
            event["hierarchy"] = c.hierarchy.id
            event["path"] = c.path
        event.update(fields)
        self.recent.append(event)
        for sub in list(self.subscribers):
            if not sub.push(event):
                self.subscribers.discard(sub)
        return event

    def subscribe(self) -> tuple[Subscriber, list[dict[str, Any]]]:
        """A new reader and the history before it: nothing lost, nothing twice."""
        sub = Subscriber(self.buffer)
        self.subscribers.add(sub)
        return sub, list(self.recent)

    def unsubscribe(self, sub: Subscriber) -> None:
        self.subscribers.discard(sub)
        sub.close()

    # ---------------------------------------------------------------- listener

    def container_created(self, c: Container) -> None:
        self.publish("created", c)

    def container_removed(self, c: Container) -> None:
        self.publish("removed", c)

    def container_renamed(self, c: Container, old_path: str) -> None:
        self.publish("renamed", c, old_path=old_path)

    def populated_changed(self, c: Container) -> None:
        self.publish("populated" if c.populated else "emptied", c)


def format_event(event: dict[str, Any]) -> str:
    """One human-readable line: time, sequence number, kind, container, details."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["time"]))
    micros = int(event["time"] % 1 * 1e6)
    parts = [f"{stamp}.{micros:06d}", f"#{event['seq']}", event["event"]]
    if "hierarchy" in event:
        parts.append(f"{event['hierarchy']}:{event['path']}")
    known = {"seq", "time", "event", "hierarchy", "path"}
    parts.extend(f"{k}={v}" for k, v in event.items() if k not in known)
    return " ".join(parts)
