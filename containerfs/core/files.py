"""Control files as data, in the manner of the kernel's cftype tables.

A subsystem (and the core itself) declares its files as ControlFile entries:
a name, where the file appears, and the functions that render a read and
apply a write. The FUSE layer looks names up in these tables and never knows
what a file means.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from containerfs.core.container import Container

#: The kernel's write limit for control files (PAGE_SIZE); longer is E2BIG.
PAGE_SIZE = 4096


class Placement(enum.Enum):
    """Which containers of a hierarchy carry a file (spec 5.1)."""

    EVERYWHERE = "everywhere"
    ROOT_ONLY = "root-only"
    NOT_ROOT = "not-on-root"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who opened a control file.

    pyfuse3 gives the caller's context at open, not at read or write, so
    these are the opener's credentials and thread, as the kernel uses the
    opener's credentials for migration checks since CVE-2021-4197.
    """

    uid: int
    gid: int
    tid: int
    #: CAP_SYS_ADMIN in the daemon's user namespace, learned at open only for files with
    #: `needs_caps`; None when not learned (the daemon's own writes, as at a restore)
    sys_admin: bool | None = None

    @property
    def is_root(self) -> bool:
        return self.uid == 0

    @property
    def privileged(self) -> bool:
        """CAP_SYS_ADMIN where it was learned; otherwise euid 0 stands for it."""
        return self.is_root if self.sys_admin is None else self.sys_admin


Reader = Callable[["Container"], str]
Writer = Callable[["Container", bytes, Caller], None]


@dataclass(frozen=True, slots=True)
class ControlFile:
    """One control file: its name, placement, and read and write functions.

    `name` is the name without the subsystem prefix; the hierarchy adds
    `<subsys>.` (or nothing under `noprefix`). A file with `extended` set only
    appears on hierarchies mounted with the `extended` option, so default
    listings stay exactly cgroup v1's.
    """

    name: str
    read: Reader | None = None
    write: Writer | None = None
    placement: Placement = Placement.EVERYWHERE
    max_write: int = PAGE_SIZE
    extended: bool = False
    #: a setting the journal keeps and a restart writes back (not a counter or a command)
    persist: bool = True
    #: what the journal keeps when a read shows a transient state (FREEZING) instead
    save: Reader | None = None
    #: the writer checks the opener's capabilities (Caller.sys_admin): reading them from
    #: /proc costs a file read, so only the files that need them pay it at open
    needs_caps: bool = False

    @property
    def mode(self) -> int:
        """0644, 0444 or 0200, from what the file can do (spec 3.1)."""
        if self.read and self.write:
            return 0o644
        if self.read:
            return 0o444
        return 0o200

    def present_in(self, is_root: bool, extended: bool) -> bool:
        if self.extended and not extended:
            return False
        if self.placement is Placement.ROOT_ONLY:
            return is_root
        if self.placement is Placement.NOT_ROOT:
            return not is_root
        return True
