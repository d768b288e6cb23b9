"""The daemon: one per runtime directory, serving every hierarchy.

It mounts one FUSE filesystem under the runtime directory (one subdirectory
per hierarchy), follows the system's tasks, answers the control socket and
watches its mount table to notice views going away. One trio thread owns
the registry; slow /proc work runs in worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pyfuse3
import trio

from containerfs import control, mounts, state
from containerfs.control import Peer
from containerfs.core import procfiles
from containerfs.core.extended import Extended
from containerfs.core.options import parse_options
from containerfs.core.registry import Registry
from containerfs.errors import CgroupError
from containerfs.events import EventStream
from containerfs.fuse.ops import Operations
from containerfs.release import DEFAULT_AGENT_TIMEOUT, DEFAULT_MAX_AGENTS, ReleaseRunner
from containerfs.runtime import Runtime
from containerfs.subsys import AVAILABLE, virt
from containerfs.subsys.virt import view_root
from containerfs.tracking.tracker import Tracker

log = logging.getLogger(__name__)

#: A daemon that never gets a hierarchy goes away after this many seconds.
IDLE_EXIT = 60.0
FSNAME = "containerfs"

Handler = Callable[[dict, Peer, trio.SocketStream], Awaitable[dict | None]]


class DaemonError(Exception):
    pass


class Daemon:
    """Holds the registry and runs every service of one runtime directory."""

    def __init__(
        self,
        rt: Runtime,
        tracker_mode: str = "auto",
        debug: bool = False,
        max_agents: int = DEFAULT_MAX_AGENTS,
        agent_timeout: float = DEFAULT_AGENT_TIMEOUT,
    ) -> None:
        self.rt = rt
        self.debug = debug
        self.registry = Registry(AVAILABLE)
        self.tracker = Tracker(self.registry, tracker_mode)
        self.ops = Operations(self.registry)
        self.events = EventStream()
        self.extended = Extended(self.registry, self.events.publish)
        self.release = ReleaseRunner(
            self.registry, self.events.publish, max_agents=max_agents, timeout=agent_timeout
        )
        self.registry.listeners += [self.events, self.extended, self.release]
        self.fs_device = ""
        self.had_hierarchy = False
        self._lock_fd = -1
        self._nursery: trio.Nursery | None = None
        self.journal = state.Journal(self.registry, rt.state)
        #: views a restored state had, bound again once the FUSE loop runs
        self._rebind: dict[int, dict[str, tuple[str, bool]]] = {}
        self.handlers: dict[str, Handler] = {
            "ping": self.op_ping,
            "mount": self.op_mount,
            "remount": self.op_remount,
            "view": self.op_view,
            "abandon": self.op_abandon,
            "stats": self.op_stats,
            "hierarchies": self.op_hierarchies,
            "membership": self.op_membership,
            "events": self.op_events,
            "stop": self.op_stop,
        }

    # --------------------------------------------------------------- lifecycle

    def _lock(self) -> None:
        self._lock_fd = os.open(self.rt.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DaemonError(f"a daemon already serves {self.rt.path}") from None
        os.ftruncate(self._lock_fd, 0)
        os.write(self._lock_fd, f"{os.getpid()}\n".encode())

    def _clear_stale_mount(self) -> None:
        """A killed daemon leaves its FUSE mount dead (ENOTCONN): detach it."""
        for m in reversed(mounts.read_mounts()):
            if m.mount_point == str(self.rt.fs) or (
                m.fstype == f"fuse.{FSNAME}" and m.mount_point.startswith(str(self.rt.fs) + "/")
            ):
                log.info("detaching stale mount %s", m.mount_point)
                try:
                    mounts.umount(m.mount_point, lazy=True)
                except OSError as exc:
                    log.warning("cannot detach %s: %s", m.mount_point, exc)

    def _detach_dead_views(self, saved: state.SavedState) -> None:
        """Views of a killed daemon answer ENOTCONN: detach them to bind them again."""
        paths = {v for rec in saved.hierarchies.values() for v in rec.get("views", ())}
        for m in mounts.read_mounts():
            if m.mount_point not in paths or m.fstype != f"fuse.{FSNAME}":
                continue
            try:
                os.statvfs(m.mount_point)  # stat() may be answered from the attribute cache
            except OSError as exc:
                if exc.errno == errno.ENOTCONN:
                    log.info("detaching dead view %s", m.mount_point)
                    with contextlib.suppress(OSError):
                        mounts.umount(m.mount_point, lazy=True)

    def _restore(self) -> None:
        """Rebuild the saved state, place every live task, then start journaling."""
        saved = state.load(self.rt.state)
        self._detach_dead_views(saved)
        self.registry.placements = state.restore(self.registry, saved)
        homes = {c for where in self.registry.placements.values() for c in where.values()}
        self.tracker.start()
        self.registry.placements = {}
        self.registry.recheck_emptied(homes)
        for h in list(self.registry.hierarchies.values()):
            self._rebind[h.id], h.views = h.views, {}
            if not self._rebind[h.id] and not h.has_children():
                self.registry.destroy_hierarchy(h)  # nothing would ever show it again
        if self.registry.hierarchies:
            self.had_hierarchy = True
            log.info("restored %d hierarchies, %d containers", len(self.registry.hierarchies),
                     len(self.registry.containers))
        self.registry.listeners.append(self.journal)
        self.journal.open(saved.gen)

    async def _rebind_views(self) -> None:
        for hid, views in self._rebind.items():
            for view, (sub, read_only) in sorted(views.items()):
                # the same subtree (a virt-locked caller's), read-only if it was
                source = str(self.rt.hierarchy_dir(hid)) + (sub if sub != "/" else "")
                try:
                    await trio.to_thread.run_sync(mounts.bind, source, view, read_only)
                    log.info("bound hierarchy %d again on %s", hid, view)
                except OSError as exc:
                    log.warning("cannot bind hierarchy %d on %s again: %s", hid, view, exc)
        self._rebind = {}
        self.update_views()

    async def run(self) -> None:
        self.rt.create()
        self._lock()
        self._clear_stale_mount()
        self._restore()
        options = set(pyfuse3.default_options) | {
            f"fsname={FSNAME}",
            f"subtype={FSNAME}",
            "allow_other",
            "default_permissions",
        }
        if self.debug:
            options.add("debug")
        pyfuse3.init(self.ops, str(self.rt.fs), options)
        # not os.stat(): nothing answers FUSE requests until the loop below runs
        self.fs_device = next(
            m.device for m in reversed(mounts.read_mounts()) if m.mount_point == str(self.rt.fs)
        )
        listener = self._listen()
        log.info("daemon %d serving %s", os.getpid(), self.rt.path)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(pyfuse3.main)
                nursery.start_soon(self.tracker.run)
                nursery.start_soon(self._serve, listener)
                nursery.start_soon(self._watch_mounts)
                nursery.start_soon(self._watch_signals)
                nursery.start_soon(self._idle_exit)
                nursery.start_soon(self._rebind_views)
                nursery.start_soon(self.release.run)
                nursery.start_soon(self.extended.run)
                for subsys in self.registry.subsystems.values():
                    nursery.start_soon(subsys.run)
        finally:
            self._shutdown()

    def stop(self, why: str) -> None:
        log.info("stopping: %s", why)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def _shutdown(self) -> None:
        """Unmount every view; hierarchies with children stay in the saved state."""
        for h in self.registry.hierarchies.values():
            for view in sorted(h.views, reverse=True):
                try:
                    mounts.umount(view, lazy=True)
                except OSError as exc:
                    log.warning("cannot unmount view %s: %s", view, exc)
            h.views = {}
            self.registry.hierarchy_changed(h)
        self.journal.close()
        try:
            pyfuse3.close(unmount=True)
        except Exception as exc:  # the mount may already be gone
            log.warning("closing the FUSE session: %s", exc)
        self.tracker.close()
        for path in (self.rt.socket,):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        log.info("daemon %d stopped", os.getpid())

    async def _watch_signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                self.stop(f"signal {signal.Signals(signum).name}")

    async def _idle_exit(self) -> None:
        await trio.sleep(IDLE_EXIT)
        if not self.had_hierarchy:
            self.stop(f"no hierarchy mounted within {IDLE_EXIT:.0f} s")

    # ------------------------------------------------------------------- views

    def _views(self) -> dict[int, dict[str, tuple[str, bool]]]:
        """hierarchy id -> its views, mount point -> (path shown, read-only), from mountinfo."""
        views: dict[int, dict[str, tuple[str, bool]]] = {}
        for m in mounts.read_mounts():
            if m.device != self.fs_device or m.mount_point == str(self.rt.fs):
                continue
            first, _, sub = m.root.strip("/").partition("/")
            if first.isdigit():
                views.setdefault(int(first), {})[m.mount_point] = ("/" + sub, m.read_only)
        return views

    def update_views(self) -> None:
        """Re-read the views; destroy a childless hierarchy whose last view went."""
        current = self._views()
        for h in list(self.registry.hierarchies.values()):
            had = bool(h.views)
            views = current.get(h.id, {})
            if views != h.views:
                h.views = views
                self.registry.hierarchy_changed(h)
            if had and not h.views and not h.has_children():
                log.info("hierarchy %d (%s) lost its last view; destroying it", h.id, h.label)
                self.registry.destroy_hierarchy(h)
        if self.had_hierarchy and not self.registry.hierarchies:
            self.stop("no hierarchy left to serve")

    async def _watch_mounts(self) -> None:
        watch = mounts.MountTableWatch()
        try:
            while True:
                await trio.lowlevel.wait_readable(watch.fileno())
                watch.consume()
                self.update_views()
        finally:
            watch.close()

    # ---------------------------------------------------------- control socket

    def _listen(self) -> trio.SocketListener:
        path = str(self.rt.socket)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        os.umask(0o022)
        # bind is synchronous for AF_UNIX paths; trio wants it awaited, so do it raw
        sock._sock.bind(path)
        os.chmod(path, 0o666)
        sock.listen(64)
        return trio.SocketListener(sock)

    async def _serve(self, listener: trio.SocketListener) -> None:
        await trio.serve_listeners(self._client, [listener])

    async def _client(self, stream: trio.SocketStream) -> None:
        async with stream:
            peer = control.peer_of(stream.socket)
            buf = b""
            while b"\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
                if len(buf) > control.MAX_LINE:
                    return
            try:
                message = json.loads(buf.split(b"\n", 1)[0])
                handler = self.handlers.get(message.get("op", ""))
                if handler is None:
                    raise CgroupError(errno.EINVAL, f"unknown request {message.get('op')!r}")
                reply = await handler(message, peer, stream)
            except CgroupError as exc:
                reply = {"ok": False, "errno": exc.errno, "error": exc.message}
            except (ValueError, AttributeError) as exc:
                reply = {"ok": False, "errno": errno.EINVAL, "error": f"bad request: {exc}"}
            except Exception as exc:  # a bug: keep serving, say so, keep the traceback
                log.exception("control request failed")
                reply = {"ok": False, "errno": errno.EIO, "error": f"internal error: {exc!r}"}
            if reply is not None:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await stream.send_all(
                        control.encode({"ok": True, **reply} if reply.get("ok", True) else reply)
                    )

    @staticmethod
    def _require_root(peer: Peer, what: str) -> None:
        if peer.uid != 0:
            raise CgroupError(errno.EPERM, f"only root may {what}")

    async def op_ping(self, msg: dict, peer: Peer, stream: Any) -> dict:
        return {"pid": os.getpid(), "runtime": str(self.rt.path)}

    async def op_mount(self, msg: dict, peer: Peer, stream: Any) -> dict:
        self._require_root(peer, "mount containerfs")
        opts = parse_options(msg["options"], self.registry.subsystems)
        h, created = self.registry.mount(opts)
        # virt: a process inside a locked container sees that container as the root,
        # and may not set the release agent (run as root on the host) even where a
        # reusing mount would ignore it
        root = view_root(h, peer.pid)
        if opts.release_agent is not None and not root.is_root:
            raise CgroupError(errno.EPERM, f"a task confined to {root.path} cannot set "
                              "release_agent")
        self.had_hierarchy = True
        if created:
            log.info("created hierarchy %d (%s)", h.id, h.label or "no subsystems")
        return {
            "hierarchy": h.id,
            "path": str(self.rt.hierarchy_dir(h.id)) + (root.path if not root.is_root else ""),
            "created": created,
            "read_only": opts.read_only,
        }

    async def op_remount(self, msg: dict, peer: Peer, stream: Any) -> dict:
        """Rebind subsystems on the live hierarchy shown at msg["target"]."""
        self._require_root(peer, "remount containerfs")
        target = os.path.realpath(msg["target"])
        self.update_views()
        h = next((h for h in self.registry.hierarchies.values() if target in h.views), None)
        if h is None:
            raise CgroupError(errno.EINVAL, f"{target} is not a view of a containerfs hierarchy")
        # virt: a confined process could unbind virt or set the host's release agent
        top = virt.confinement(h, peer.pid)
        if top is not None:
            raise CgroupError(errno.EPERM, f"a task confined to {top.path} cannot remount")
        opts = parse_options(msg["options"], self.registry.subsystems)
        if opts.name is not None and opts.name != h.name:
            raise CgroupError(errno.EINVAL, "a hierarchy's name cannot change on remount")
        if opts.noprefix != h.noprefix or opts.extended != h.extended:
            raise CgroupError(errno.EINVAL, "noprefix and extended cannot change on remount")
        self.registry.rebind(h, opts.wanted(self.registry.subsystems) or frozenset())
        if opts.release_agent is not None:
            h.release_agent = opts.release_agent
        for c in h.root.walk():
            self.registry.changed(c)
        log.info("hierarchy %d now has %s", h.id, h.label or "no subsystems")
        return {"hierarchy": h.id, "subsystems": h.subsystem_names}

    async def op_view(self, msg: dict, peer: Peer, stream: Any) -> dict:
        self._require_root(peer, "mount containerfs")
        self.update_views()
        return {}

    async def op_abandon(self, msg: dict, peer: Peer, stream: Any) -> dict:
        """The helper could not bind a view of a hierarchy it just created."""
        self._require_root(peer, "mount containerfs")
        h = self.registry.hierarchies.get(int(msg["hierarchy"]))
        if h is not None and not h.views and not h.has_children():
            self.registry.destroy_hierarchy(h)
        if not self.registry.hierarchies:
            self.stop("the only hierarchy was abandoned")
        return {}

    async def op_stats(self, msg: dict, peer: Peer, stream: Any) -> dict:
        return {
            "pid": os.getpid(),
            "tracker": self.tracker.stats(),
            "hierarchies": len(self.registry.hierarchies),
            "containers": len(self.registry.containers),
            "open_files": len(self.ops.handles),
            "release": self.release.stats(),
            "events": {"seq": self.events.seq, "subscribers": len(self.events.subscribers)},
            **{
                s.name: counters
                for s in self.registry.subsystems.values()
                if s.hierarchy is not None and (counters := s.stats()) is not None
            },
        }

    async def op_hierarchies(self, msg: dict, peer: Peer, stream: Any) -> dict:
        return {
            "text": procfiles.proc_cgroups(self.registry),
            "rows": procfiles.subsystem_rows(self.registry),
        }

    async def op_membership(self, msg: dict, peer: Peer, stream: Any) -> dict:
        """/proc/PID/cgroup's lines; paths seen from the asker's virt-locked container.

        A confined asker must not learn the names above its container, as a
        reader inside a cgroup namespace does not.
        """
        tid = int(msg["pid"])
        rows = procfiles.membership_rows(self.registry, tid)
        task = self.registry.known_task(tid)
        assert task is not None  # membership_rows found it
        for row in rows:
            h = self.registry.hierarchies[row["hierarchy"]]
            top = virt.confinement(h, peer.pid)
            if top is not None:
                row["path"] = virt.relative_path(task.cgroups[h.id], top)
        return {
            "text": procfiles.proc_pid_cgroup(rows),
            "rows": rows,
        }

    async def op_events(self, msg: dict, peer: Peer, stream: trio.SocketStream) -> None:
        """Send the recent events, then with `follow` every new one until the reader leaves."""
        self._require_root(peer, "read the event stream")
        sub, history = self.events.subscribe()
        if not msg.get("follow"):
            self.events.unsubscribe(sub)
        try:
            for event in history:
                await stream.send_all(control.encode(event))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_closed, stream, nursery.cancel_scope)
                while (event := await sub.get()) is not None:
                    await stream.send_all(control.encode(event))
                nursery.cancel_scope.cancel()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.events.unsubscribe(sub)

    @staticmethod
    async def _until_closed(stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        """A following reader sends nothing more: end its stream when it hangs up."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await stream.receive_some(4096):
                pass
        scope.cancel()

    async def op_stop(self, msg: dict, peer: Peer, stream: Any) -> None:
        self._require_root(peer, "stop the daemon")
        # answer before the nursery (and this connection) is cancelled
        await stream.send_all(control.encode({"ok": True}))
        self.stop(f"asked by pid {peer.pid}")


def run(
    rt: Runtime,
    tracker_mode: str = "auto",
    debug: bool = False,
    max_agents: int = DEFAULT_MAX_AGENTS,
    agent_timeout: float = DEFAULT_AGENT_TIMEOUT,
) -> None:
    daemon = Daemon(rt, tracker_mode, debug, max_agents, agent_timeout)
    trio.run(daemon.run)
