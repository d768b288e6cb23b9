"""Inode numbers derived from container serials, so nothing needs freeing.

The inode of a container's directory is `serial << SHIFT`; the inode of one
of its control files adds that file name's index in a table of every control
file name ever seen (a few dozen). Serials are never reused, so an inode of a
removed container stays dead instead of pointing at a newcomer.
"""

from __future__ import annotations

import errno

import pyfuse3

from containerfs.errors import CgroupError

SHIFT = 10
TOP_INODE = pyfuse3.ROOT_INODE


class FileNames:
    """Control file name <-> small index, shared by all hierarchies."""

    def __init__(self) -> None:
        self._index: dict[str, int] = {}
        self._names: list[str] = [""]

    def index(self, name: str) -> int:
        idx = self._index.get(name)
        if idx is None:
            idx = len(self._names)
            if idx >= 1 << SHIFT:
                raise CgroupError(errno.ENOSPC, "too many distinct control file names")
            self._index[name] = idx
            self._names.append(name)
        return idx

    def name(self, idx: int) -> str | None:
        return self._names[idx] if 0 < idx < len(self._names) else None


def dir_inode(serial: int) -> int:
    return serial << SHIFT


def file_inode(serial: int, idx: int) -> int:
    return (serial << SHIFT) | idx


def split_inode(ino: int) -> tuple[int, int]:
    """(container serial, file name index or 0 for the directory)."""
    return ino >> SHIFT, ino & ((1 << SHIFT) - 1)
