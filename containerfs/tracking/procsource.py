"""The registry's window on /proc for single tasks (a write path, never a scan)."""

from __future__ import annotations

import os

from containerfs.tracking import procscan


class LiveProc:
    """Reads one task's facts from the live /proc."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self.own_user_ns = procscan.user_ns(f"{proc}/self/ns/user")

    def read_task(self, tid: int) -> procscan.TaskInfo | None:
        return procscan.read_task(tid, self.proc)

    def read_ids(self, tid: int) -> tuple[int, int, int] | None:
        return procscan.read_ids(tid, self.proc)

    def exists(self, tid: int) -> bool:
        return os.path.exists(f"{self.proc}/{tid}")

    def is_unmovable(self, facts: procscan.TaskInfo) -> bool:
        return procscan.is_unmovable_kthread(facts)

    def has_sys_admin(self, tid: int) -> bool:
        return procscan.has_sys_admin(tid, self.own_user_ns, self.proc)
