"""A task is a thread, as in the kernel: cgroup v1 membership is per thread."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from containerfs.core.container import Container


class Task:
    """One live thread and the container it is in, in every hierarchy.

    Identity is (tid, start_time) because tids are reused; start_time (clock
    ticks since boot, /proc/TID/stat field 22) is None until something needed
    it, because a fork event does not carry it and reading it costs a /proc
    read per fork.
    """

    __slots__ = ("cgroups", "movable", "start_time", "tgid", "tid")

    def __init__(self, tid: int, tgid: int, start_time: int | None = None) -> None:
        self.tid = tid
        self.tgid = tgid
        self.start_time = start_time
        #: False for a kernel thread the kernel would not move; None until read
        self.movable: bool | None = None
        #: hierarchy id -> the container this task is in there
        self.cgroups: dict[int, Container] = {}

    @property
    def is_leader(self) -> bool:
        return self.tid == self.tgid

    def __repr__(self) -> str:
        return f"Task({self.tid}/{self.tgid})"
