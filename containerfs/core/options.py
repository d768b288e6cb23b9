"""Mount options, parsed and validated in the kernel's order (spec 2.2).

Generic options that mount(8) and mount.fuse3 add are accepted and have no
effect on the hierarchy; `ro` makes the view read-only. Everything else that
is unknown, repeated where the kernel forbids it, or contradictory is refused
with EINVAL and a message that names the option.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from containerfs.errors import CgroupError

NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,63}")

#: Options mount(8), mount.fuse3 and fstab add that say nothing about a hierarchy.
GENERIC = frozenset(
    {
        "rw",
        "dev",
        "nodev",
        "suid",
        "nosuid",
        "exec",
        "noexec",
        "atime",
        "noatime",
        "relatime",
        "norelatime",
        "strictatime",
        "nostrictatime",
        "lazytime",
        "nolazytime",
        "diratime",
        "nodiratime",
        "sync",
        "async",
        "defaults",
        "auto",
        "noauto",
        "user",
        "nouser",
        "users",
        "nofail",
        "_netdev",
        "silent",
        "loud",
        "favordynmods",
        "nofavordynmods",
    }
)
#: Pairs that cannot both be given.
CONTRADICTIONS = (
    ("rw", "ro"),
    ("dev", "nodev"),
    ("suid", "nosuid"),
    ("exec", "noexec"),
    ("atime", "noatime"),
    ("relatime", "norelatime"),
    ("strictatime", "nostrictatime"),
    ("favordynmods", "nofavordynmods"),
)


@dataclass
class MountOptions:
    """What a mount asks for. `subsystems` is None when none were named."""

    subsystems: frozenset[str] | None = None
    all: bool = False
    none: bool = False
    name: str | None = None
    noprefix: bool = False
    release_agent: str | None = None
    clone_children: bool = False
    extended: bool = False
    default_disabled: bool = False
    read_only: bool = False
    remount: bool = False
    ignored: list[str] = field(default_factory=list)

    def wanted(self, available: Iterable[str]) -> frozenset[str] | None:
        """The subsystem set this mount asks for; None means 'any' (name= alone)."""
        if self.all or (self.subsystems is None and not self.none and self.name is None):
            return frozenset(available)
        if self.none:
            return frozenset()
        return self.subsystems


def split_options(text: str) -> list[str]:
    """Split a comma-separated option string; empty items are dropped."""
    return [item for item in text.split(",") if item]


def parse_options(items: Iterable[str], available: Iterable[str]) -> MountOptions:
    """Validate mount options in the order spec 2.2 lists the kernel's checks."""
    available = tuple(available)
    opts = MountOptions()
    named: set[str] = set()
    seen: set[str] = set()
    for item in items:
        key, eq, value = item.partition("=")
        if key == "name":
            if opts.name is not None:
                raise CgroupError(errno.EINVAL, "name= given twice")
            if not NAME_RE.fullmatch(value):
                raise CgroupError(
                    errno.EINVAL,
                    f"invalid hierarchy name {value!r}: 1 to 63 of [A-Za-z0-9._-]",
                )
            opts.name = value
        elif key == "release_agent" and eq:
            if opts.release_agent is not None:
                raise CgroupError(errno.EINVAL, "release_agent= given twice")
            opts.release_agent = value
        elif eq:
            raise CgroupError(errno.EINVAL, f"unknown mount option {item!r}")
        elif key == "all":
            opts.all = True
        elif key == "none":
            opts.none = True
        elif key == "noprefix":
            opts.noprefix = True
        elif key == "clone_children":
            opts.clone_children = True
        elif key == "extended":
            opts.extended = True
        elif key == "default_disabled":
            opts.default_disabled = True
        elif key == "remount":
            opts.remount = True
        elif key == "ro":
            opts.read_only = True
            seen.add(key)
        elif key in available:
            named.add(key)
        elif key in GENERIC:
            opts.ignored.append(key)
            seen.add(key)
        else:
            raise CgroupError(errno.EINVAL, f"unknown mount option or subsystem {key!r}")
    for a, b in CONTRADICTIONS:
        if a in seen and b in seen:
            raise CgroupError(errno.EINVAL, f"contradictory mount options {a!r} and {b!r}")
    if named:
        opts.subsystems = frozenset(named)
    if opts.all and named:
        raise CgroupError(errno.EINVAL, "'all' cannot be combined with subsystem names")
    wanted = opts.wanted(available)
    if opts.name is None and wanted is not None and not wanted:
        raise CgroupError(errno.EINVAL, "no subsystems and no name=: nothing to mount")
    if opts.noprefix and wanted and wanted - {"cpuset"}:
        raise CgroupError(
            errno.EINVAL, "noprefix is only allowed when cpuset is the only subsystem"
        )
    if opts.none and named:
        raise CgroupError(errno.EINVAL, "'none' cannot be combined with subsystem names")
    if opts.default_disabled and not opts.extended:
        raise CgroupError(
            errno.EINVAL,
            "default_disabled needs extended: the <subsystem>_enabled files that turn "
            "subsystems back on exist only with it",
        )
    return opts
