"""virt: the roadmap's virtualization subsystem (seeds 002 and 003).

A container with `virt.lock` set to 1 is the root of every view of its
hierarchy that a process inside it (in it or below it) mounts: the view is a
bind of that container's directory, so the process sees it as `/` and
cannot reach above it through the view ("a bit like doing a bind mount of a
subtree of the main hierarchy, but automatically enforced"). A root process
inside can still reach the daemon's runtime directory, as any bind mount's
source; the guarantee is about what the view shows.
"""

from __future__ import annotations

from dataclasses import dataclass

from containerfs.core.container import Container
from containerfs.core.files import Caller, ControlFile
from containerfs.core.hierarchy import Hierarchy
from containerfs.core.parse import parse_flag
from containerfs.core.subsystem import Subsystem
from containerfs.core.task import Task

NAME = "virt"


@dataclass
class VirtState:
    locked: bool = False


def _read_lock(c: Container) -> str:
    return "1\n" if c.state[NAME].locked else "0\n"


def _write_lock(c: Container, data: bytes, caller: Caller) -> None:
    c.state[NAME].locked = parse_flag(data)


def view_root(h: Hierarchy, task: Task | None) -> Container:
    """The container a view mounted by `task` shows as its root."""
    if task is None or NAME not in h.subsystem_names:
        return h.root
    for c in task.cgroups[h.id].ancestors():
        if c.state[NAME].locked:
            return c
    return h.root


class Virt(Subsystem):
    name = NAME
    files = (ControlFile("lock", _read_lock, _write_lock),)

    def create(self, container: Container) -> VirtState:
        return VirtState()
