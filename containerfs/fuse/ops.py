"""pyfuse3 operations: map names and inodes to the core, and errors to errno.

The FUSE root lists one directory per hierarchy, named by its id; users see a
hierarchy through a bind mount of that directory. Control files are opened
with direct_io and report size 0, like kernfs; every write is one command.
There is no flush handler: a write's error comes back from write(), so close
has nothing to report, and the ENOSYS of the first FLUSH tells the kernel to
send no more (one round trip less on every close).
"""

from __future__ import annotations

import errno
import functools
import inspect
import itertools
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3

from containerfs.core.container import Attrs, Container
from containerfs.core.files import Caller, ControlFile
from containerfs.core.registry import Registry
from containerfs.errors import CgroupError
from containerfs.fuse.inodes import TOP_INODE, FileNames, dir_inode, file_inode, split_inode

log = logging.getLogger(__name__)

#: How long the kernel may cache names and attributes. Changes made through
#: the kernel invalidate its cache at once; this bounds how long a change the
#: daemon makes by itself (auto-delete, a rename via another view) can lag.
CACHE_TIMEOUT = 1.0


@dataclass(slots=True)
class Handle:
    """An open control file: its container, its table entry, its opener."""

    container: Container
    name: str
    cf: ControlFile
    caller: Caller
    data: bytes | None = None


def contained(cls: type) -> type:
    """Wrap every coroutine handler of `cls`: an unexpected exception is EIO, not a crash.

    pyfuse3 runs handlers in the daemon's nursery, so an exception escaping
    one would end the daemon; a bug in one subsystem must cost one request.
    """
    for name, fn in list(vars(cls).items()):
        if not inspect.iscoroutinefunction(fn):
            continue

        @functools.wraps(fn)
        async def handler(self, *args, _fn=fn):
            try:
                return await _fn(self, *args)
            except pyfuse3.FUSEError:
                raise
            except Exception:
                log.exception("%s%r failed", _fn.__name__, args[:3])
                raise pyfuse3.FUSEError(errno.EIO) from None

        setattr(cls, name, handler)
    return cls


def fuse_error(exc: CgroupError, what: str) -> pyfuse3.FUSEError:
    log.info("%s: %s", what, exc)
    return pyfuse3.FUSEError(exc.errno)


@contained
class Operations(pyfuse3.Operations):
    """The filesystem view of a Registry."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, registry: Registry) -> None:
        super().__init__()
        self.registry = registry
        self.names = FileNames()
        self.handles: dict[int, Handle] = {}
        self.dirs: dict[int, list[tuple[bytes, int]]] = {}
        self._fh = itertools.count(1)
        now = time.time_ns()
        self.top = Attrs(stat.S_IFDIR | 0o755, 0, 0, now, now, now)

    # ---------------------------------------------------------------- lookup

    def _container(self, ino: int) -> Container:
        serial, idx = split_inode(ino)
        c = self.registry.containers.get(serial)
        if c is None or idx:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return c

    def _node(self, ino: int) -> tuple[Container | None, str | None, ControlFile | None]:
        """(container, file name, file) for a file; (container, None, None) for a dir."""
        if ino == TOP_INODE:
            return None, None, None
        serial, idx = split_inode(ino)
        c = self.registry.containers.get(serial)
        if c is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if not idx:
            return c, None, None
        name = self.names.name(idx)
        cf = c.hierarchy.files(c).get(name) if name is not None else None
        if cf is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return c, name, cf

    def _entry(self, ino: int, attrs: Attrs, nlink: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.st_mode = attrs.mode
        e.st_nlink = nlink
        e.st_uid = attrs.uid
        e.st_gid = attrs.gid
        e.st_size = 0
        e.st_blksize = 4096
        e.st_blocks = 0
        e.st_atime_ns = attrs.atime_ns
        e.st_mtime_ns = attrs.mtime_ns
        e.st_ctime_ns = attrs.ctime_ns
        e.entry_timeout = CACHE_TIMEOUT
        e.attr_timeout = CACHE_TIMEOUT
        return e

    def _dir_entry(self, c: Container) -> pyfuse3.EntryAttributes:
        return self._entry(dir_inode(c.serial), c.attrs, 2 + len(c.children))

    def _file_entry(self, c: Container, name: str, cf: ControlFile) -> pyfuse3.EntryAttributes:
        return self._entry(
            file_inode(c.serial, self.names.index(name)), c.file_attr(name, cf.mode), 1
        )

    def _top_entry(self) -> pyfuse3.EntryAttributes:
        return self._entry(TOP_INODE, self.top, 2 + len(self.registry.hierarchies))

    def _attrs_of(self, ino: int) -> pyfuse3.EntryAttributes:
        c, name, cf = self._node(ino)
        if c is None:
            return self._top_entry()
        if cf is None:
            return self._dir_entry(c)
        assert name is not None
        return self._file_entry(c, name, cf)

    def _child(self, parent: int, name: str) -> pyfuse3.EntryAttributes:
        if parent == TOP_INODE:
            if name in (".", ".."):
                return self._top_entry()
            h = self.registry.hierarchies.get(int(name)) if name.isdigit() else None
            if h is None:
                raise pyfuse3.FUSEError(errno.ENOENT)
            return self._dir_entry(h.root)
        c = self._container(parent)
        if name == ".":
            return self._dir_entry(c)
        if name == "..":
            return self._dir_entry(c.parent) if c.parent else self._top_entry()
        child = c.children.get(name)
        if child is not None:
            return self._dir_entry(child)
        cf = c.hierarchy.files(c).get(name)
        if cf is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._file_entry(c, name, cf)

    async def lookup(self, parent_inode, name, ctx):
        return self._child(parent_inode, os.fsdecode(name))

    async def getattr(self, inode, ctx):
        return self._attrs_of(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        c, name, cf = self._node(inode)
        if c is None:
            raise pyfuse3.FUSEError(errno.EPERM)
        if cf is None:
            attrs = c.attrs
        else:
            assert name is not None
            attrs = c.file_attrs.setdefault(name, c.file_attr(name, cf.mode))
        now = time.time_ns()
        # update_size is O_TRUNC on a control file: accepted and ignored, like kernfs
        if fields.update_mode:
            attrs.mode = stat.S_IFMT(attrs.mode) | (attr.st_mode & 0o7777)
        if fields.update_uid:
            attrs.uid = attr.st_uid
        if fields.update_gid:
            attrs.gid = attr.st_gid
        if fields.update_atime:
            attrs.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            attrs.mtime_ns = attr.st_mtime_ns
        if fields.update_mode or fields.update_uid or fields.update_gid:
            attrs.ctime_ns = now
            self.registry.changed(c)
        return self._attrs_of(inode)

    # -------------------------------------------------------------- directories

    async def opendir(self, inode, ctx):
        c, _name, cf = self._node(inode)
        if cf is not None:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        entries: list[tuple[bytes, int]] = [(b".", inode)]
        if c is None:
            entries.append((b"..", TOP_INODE))
            entries += [
                (str(h).encode(), dir_inode(self.registry.hierarchies[h].root.serial))
                for h in sorted(self.registry.hierarchies)
            ]
        else:
            entries.append((b"..", dir_inode(c.parent.serial) if c.parent else TOP_INODE))
            entries += [
                (os.fsencode(n), file_inode(c.serial, self.names.index(n)))
                for n in sorted(c.hierarchy.files(c))
            ]
            entries += [
                (os.fsencode(n), dir_inode(child.serial)) for n, child in sorted(c.children.items())
            ]
        fh = next(self._fh)
        self.dirs[fh] = entries
        return fh

    async def readdir(self, fh, start_id, token):
        entries = self.dirs[fh]
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            try:
                attrs = self._attrs_of(ino)
            except pyfuse3.FUSEError:
                continue  # removed since opendir
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                break

    async def releasedir(self, fh):
        self.dirs.pop(fh, None)

    async def mkdir(self, parent_inode, name, mode, ctx):
        if parent_inode == TOP_INODE:
            raise pyfuse3.FUSEError(errno.EPERM)
        parent = self._container(parent_inode)
        text = os.fsdecode(name)
        try:
            c = self.registry.mkdir(
                parent, text, uid=ctx.uid, gid=ctx.gid, mode=mode & ~ctx.umask & 0o7777
            )
        except CgroupError as exc:
            raise fuse_error(exc, f"mkdir {parent.path} {text!r}") from None
        return self._dir_entry(c)

    async def rmdir(self, parent_inode, name, ctx):
        text = os.fsdecode(name)
        if parent_inode == TOP_INODE:
            raise pyfuse3.FUSEError(errno.EBUSY)
        parent = self._container(parent_inode)
        c = parent.children.get(text)
        if c is None:
            if text in parent.hierarchy.files(parent):
                raise pyfuse3.FUSEError(errno.ENOTDIR)
            raise pyfuse3.FUSEError(errno.ENOENT)
        try:
            self.registry.rmdir(c)
        except CgroupError as exc:
            raise fuse_error(exc, f"rmdir {c.path}") from None

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if TOP_INODE in (parent_inode_old, parent_inode_new):
            raise pyfuse3.FUSEError(errno.EBUSY)
        old = os.fsdecode(name_old)
        new = os.fsdecode(name_new)
        parent = self._container(parent_inode_old)
        new_parent = self._container(parent_inode_new)
        c = parent.children.get(old)
        try:
            if "\n" in new:
                raise CgroupError(errno.EINVAL, "a container name cannot contain a newline")
            if c is None:
                if old in parent.hierarchy.files(parent):
                    raise CgroupError(errno.ENOTDIR, f"{old!r} is a control file")
                raise CgroupError(errno.ENOENT, f"no container {old!r} in {parent.path}")
            self.registry.rename(c, new_parent, new)
        except CgroupError as exc:
            raise fuse_error(exc, f"rename {parent.path} {old!r} -> {new!r}") from None

    # ------------------------------------------------- what cgroupfs refuses

    async def unlink(self, parent_inode, name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def create(self, parent_inode, name, mode, flags, ctx):
        raise pyfuse3.FUSEError(errno.EACCES)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        raise pyfuse3.FUSEError(errno.EACCES if stat.S_ISREG(mode) else errno.EPERM)

    async def symlink(self, parent_inode, name, target, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    async def link(self, inode, new_parent_inode, new_name, ctx):
        raise pyfuse3.FUSEError(errno.EPERM)

    # ------------------------------------------------------------------ files

    async def open(self, inode, flags, ctx):
        c, name, cf = self._node(inode)
        if c is None or cf is None or name is None:
            raise pyfuse3.FUSEError(errno.EISDIR)
        if ctx.pid:
            # learn the opener now: its `0` writes and its own listing need it
            self.registry.known_task(ctx.pid)
        # capabilities cost a /proc read, so only the few files that check them learn them
        sys_admin = self.registry.proc.has_sys_admin(ctx.pid) if cf.needs_caps else None
        fh = next(self._fh)
        self.handles[fh] = Handle(c, name, cf, Caller(ctx.uid, ctx.gid, ctx.pid, sys_admin))
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    def _guard(self, h: Handle, what: str, op: Callable[[], object]) -> object:
        try:
            if h.container.removed:
                raise CgroupError(errno.ENODEV, f"{h.container.path} has been removed")
            return op()
        except CgroupError as exc:
            raise fuse_error(
                exc, f"{what} {h.container.hierarchy.id}:{h.container.path}/{h.name}"
            ) from None

    async def read(self, fh, off, size):
        h = self.handles[fh]

        def render() -> bytes:
            read = h.cf.read
            if read is None:
                raise CgroupError(errno.EINVAL, "the file is write-only")
            if off == 0 or h.data is None:
                h.data = os.fsencode(read(h.container))
            return h.data[off : off + size]

        return self._guard(h, "read", render)

    async def write(self, fh, off, buf):
        h = self.handles[fh]
        if len(buf) > h.cf.max_write:
            too_big = CgroupError(errno.E2BIG, f"{len(buf)} bytes, over {h.cf.max_write}")
            raise fuse_error(too_big, f"write {h.name}")
        if not buf:
            return 0

        def apply() -> int:
            write = h.cf.write
            if write is None:
                raise CgroupError(errno.EINVAL, "the file is read-only")
            write(h.container, bytes(buf), h.caller)
            if h.cf.persist:  # moves and commands are journaled by their own events
                self.registry.changed(h.container)
            return len(buf)

        return self._guard(h, "write", apply)

    async def release(self, fh):
        self.handles.pop(fh, None)

    async def statfs(self, ctx):
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_namemax = 255
        return s

    async def forget(self, inode_list):
        pass  # inodes are derived from serials; there is nothing to free
