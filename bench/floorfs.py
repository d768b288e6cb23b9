"""The floor: an empty pyfuse3 filesystem of containerfs's shape, with no logic.

Any pyfuse3 design pays what this one pays: the kernel round trip, libfuse,
pyfuse3's Cython layer and one trio task per request. It has the same shape
as a containerfs hierarchy (a root with six files, mkdir-able directories
with four files each) and the same FUSE settings (allow_other,
default_permissions, direct_io, no page cache, the same entry and attribute
timeouts), so the ratio containerfs/floor is the cost of containerfs's own
work. Reads of `tasks` and `cgroup.procs` return a fixed list of
`--tasks-lines` ids (so a 10,000-member read moves the same bytes as in
containerfs); every write is accepted and ignored.

Run it as `python -m bench.floorfs MOUNTPOINT [--tasks-lines N]`; it serves
until SIGTERM or SIGINT, then unmounts.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import os
import signal
import stat
import time

import pyfuse3
import trio

from containerfs.fuse.ops import CACHE_TIMEOUT

ROOT_FILES = (
    "cgroup.clone_children",
    "cgroup.procs",
    "cgroup.sane_behavior",
    "notify_on_release",
    "release_agent",
    "tasks",
)
CHILD_FILES = ("cgroup.clone_children", "cgroup.procs", "notify_on_release", "tasks")
SHIFT = 10  # as containerfs: a directory's inode is serial << SHIFT, a file adds its index


class Dir:
    __slots__ = ("children", "name", "parent", "serial")

    def __init__(self, serial: int, name: str, parent: Dir | None) -> None:
        self.serial = serial
        self.name = name
        self.parent = parent
        self.children: dict[str, Dir] = {}

    @property
    def files(self) -> tuple[str, ...]:
        return ROOT_FILES if self.parent is None else CHILD_FILES


class FloorOps(pyfuse3.Operations):
    """Names, inodes and fixed answers; nothing else."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tasks_lines: int) -> None:
        super().__init__()
        self.dirs: dict[int, Dir] = {}
        self._serials = itertools.count(1)
        self.root = self._new_dir("", None)
        self.listings: dict[int, list[tuple[bytes, int]]] = {}
        self._fh = itertools.count(1)
        self.ids = "".join(f"{1000 + i}\n" for i in range(tasks_lines)).encode()
        self.now = time.time_ns()

    def _new_dir(self, name: str, parent: Dir | None) -> Dir:
        d = Dir(next(self._serials), name, parent)
        self.dirs[d.serial] = d
        return d

    def _dir_ino(self, d: Dir) -> int:
        return pyfuse3.ROOT_INODE if d is self.root else d.serial << SHIFT

    def _lookup_dir(self, ino: int) -> Dir:
        d = self.root if ino == pyfuse3.ROOT_INODE else self.dirs.get(ino >> SHIFT)
        if d is None or (ino != pyfuse3.ROOT_INODE and ino & ((1 << SHIFT) - 1)):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return d

    def _entry(self, ino: int, mode: int, nlink: int) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = ino
        e.st_mode = mode
        e.st_nlink = nlink
        e.st_size = 0
        e.st_blksize = 4096
        e.st_atime_ns = e.st_mtime_ns = e.st_ctime_ns = self.now
        e.entry_timeout = CACHE_TIMEOUT
        e.attr_timeout = CACHE_TIMEOUT
        return e

    def _dir_entry(self, d: Dir) -> pyfuse3.EntryAttributes:
        return self._entry(self._dir_ino(d), stat.S_IFDIR | 0o755, 2 + len(d.children))

    def _file_entry(self, d: Dir, name: str) -> pyfuse3.EntryAttributes:
        idx = ROOT_FILES.index(name) + 1
        mode = 0o444 if name == "cgroup.sane_behavior" else 0o644
        return self._entry((d.serial << SHIFT) | idx, stat.S_IFREG | mode, 1)

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        if ino == pyfuse3.ROOT_INODE:
            return self._dir_entry(self.root)
        d = self.dirs.get(ino >> SHIFT)
        idx = ino & ((1 << SHIFT) - 1)
        if d is None or idx > len(ROOT_FILES):
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._dir_entry(d) if idx == 0 else self._file_entry(d, ROOT_FILES[idx - 1])

    async def lookup(self, parent_inode, name, ctx):
        d = self._lookup_dir(parent_inode)
        text = os.fsdecode(name)
        if text == ".":
            return self._dir_entry(d)
        if text == "..":
            return self._dir_entry(d.parent or d)
        child = d.children.get(text)
        if child is not None:
            return self._dir_entry(child)
        if text in d.files:
            return self._file_entry(d, text)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode, ctx):
        return self._attrs(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        return self._attrs(inode)

    async def opendir(self, inode, ctx):
        d = self._lookup_dir(inode)
        entries = [(b".", inode), (b"..", self._dir_ino(d.parent or d))]
        entries += [(n.encode(), (d.serial << SHIFT) | ROOT_FILES.index(n) + 1) for n in d.files]
        entries += [(n.encode(), self._dir_ino(c)) for n, c in sorted(d.children.items())]
        fh = next(self._fh)
        self.listings[fh] = entries
        return fh

    async def readdir(self, fh, start_id, token):
        entries = self.listings[fh]
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            try:
                attrs = self._attrs(ino)
            except pyfuse3.FUSEError:
                continue
            if not pyfuse3.readdir_reply(token, name, attrs, i + 1):
                break

    async def releasedir(self, fh):
        self.listings.pop(fh, None)

    async def mkdir(self, parent_inode, name, mode, ctx):
        parent = self._lookup_dir(parent_inode)
        text = os.fsdecode(name)
        if text in parent.children or text in parent.files:
            raise pyfuse3.FUSEError(errno.EEXIST)
        child = self._new_dir(text, parent)
        parent.children[text] = child
        return self._dir_entry(child)

    async def rmdir(self, parent_inode, name, ctx):
        parent = self._lookup_dir(parent_inode)
        child = parent.children.get(os.fsdecode(name))
        if child is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        if child.children:
            raise pyfuse3.FUSEError(errno.EBUSY)
        del parent.children[child.name]
        del self.dirs[child.serial]

    async def open(self, inode, flags, ctx):
        self._attrs(inode)
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def read(self, fh, off, size):
        idx = fh & ((1 << SHIFT) - 1)
        name = ROOT_FILES[idx - 1]
        data = self.ids if name in ("tasks", "cgroup.procs") else b"0\n"
        return data[off : off + size]

    async def write(self, fh, off, buf):
        return len(buf)

    async def release(self, fh):
        pass

    async def forget(self, inode_list):
        pass


async def _serve() -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                return


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.floorfs")
    parser.add_argument("mountpoint")
    parser.add_argument("--tasks-lines", type=int, default=1)
    args = parser.parse_args()
    options = set(pyfuse3.default_options) | {
        "fsname=cfsfloor",
        "subtype=cfsfloor",
        "allow_other",
        "default_permissions",
    }
    pyfuse3.init(FloorOps(args.tasks_lines), args.mountpoint, options)
    try:
        trio.run(_serve)
    finally:
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
