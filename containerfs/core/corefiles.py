"""The core control files every hierarchy has (spec section 4)."""

from __future__ import annotations

import errno
import os

from containerfs.core.container import Container
from containerfs.core.files import Caller, ControlFile, Placement
from containerfs.core.parse import c_string, parse_flag, parse_pid, strip
from containerfs.errors import CgroupError


def _read_tasks(c: Container) -> str:
    c.hierarchy.registry.refresh(c)
    return "".join(f"{tid}\n" for tid in sorted(t.tid for t in c.tasks))


def _read_procs(c: Container) -> str:
    c.hierarchy.registry.refresh(c)
    return "".join(f"{tgid}\n" for tgid in sorted({t.tgid for t in c.tasks}))


def _attach(c: Container, data: bytes, caller: Caller, threadgroup: bool) -> None:
    if c.removed:
        raise CgroupError(errno.ENODEV, f"{c.path} has been removed")
    tid = parse_pid(data)
    registry = c.hierarchy.registry
    if tid == 0 and threadgroup:
        me = registry.known_task(caller.tid)
        tid = me.tgid if me is not None else caller.tid
    registry.attach(c, tid, threadgroup=threadgroup, caller=caller)


def _write_tasks(c: Container, data: bytes, caller: Caller) -> None:
    _attach(c, data, caller, threadgroup=False)


def _write_procs(c: Container, data: bytes, caller: Caller) -> None:
    _attach(c, data, caller, threadgroup=True)


def _flag_file(name: str, attr: str) -> ControlFile:
    """A 0/1 file parsed with kstrtoull, stored in a Container attribute."""

    def read(c: Container) -> str:
        return "1\n" if getattr(c, attr) else "0\n"

    def write(c: Container, data: bytes, caller: Caller) -> None:
        setattr(c, attr, parse_flag(data))

    return ControlFile(name, read, write)


def _read_release_agent(c: Container) -> str:
    return c.hierarchy.release_agent + "\n"


def _write_release_agent(c: Container, data: bytes, caller: Caller) -> None:
    # CVE-2022-0492: only an opener with CAP_SYS_ADMIN may choose what runs as root;
    # euid 0 without it (a container's root, capsh --drop) is not enough (spec 4.5).
    if not caller.privileged:
        raise CgroupError(errno.EPERM, "only CAP_SYS_ADMIN may set the release agent")
    c.hierarchy.release_agent = os.fsdecode(strip(c_string(data)))


CORE_FILES: tuple[ControlFile, ...] = (
    ControlFile("tasks", _read_tasks, _write_tasks, persist=False),
    ControlFile("cgroup.procs", _read_procs, _write_procs, persist=False),
    _flag_file("notify_on_release", "notify_on_release"),
    _flag_file("cgroup.clone_children", "clone_children"),
    ControlFile(
        "release_agent",
        _read_release_agent,
        _write_release_agent,
        placement=Placement.ROOT_ONLY,
        max_write=4095,
        needs_caps=True,
    ),
    ControlFile("cgroup.sane_behavior", lambda c: "0\n", placement=Placement.ROOT_ONLY),
)
