"""The seeds' /proc/containers and /proc/PID/container, in today's formats.

A FUSE filesystem cannot add lines to /proc/cgroups or /proc/PID/cgroup, so
the CLI prints the same bytes (spec 2.7 and 2.8) for containerfs's
hierarchies, and tools that parse those files can parse these.
"""

from __future__ import annotations

import errno

from containerfs.core.registry import Registry
from containerfs.errors import CgroupError


def subsystem_rows(registry: Registry) -> list[dict]:
    """One row per subsystem, in listing order, as /proc/cgroups has them."""
    rows = []
    for name, subsys in registry.subsystems.items():
        h = subsys.hierarchy
        rows.append(
            {
                "subsys_name": name,
                "hierarchy": h.id if h else 0,
                "num_cgroups": sum(1 for _ in h.root.walk()) if h else 1,
                "enabled": int(h.enabled.get(name, True)) if h else 1,
            }
        )
    return rows


def proc_cgroups(registry: Registry) -> str:
    lines = ["#subsys_name\thierarchy\tnum_cgroups\tenabled\n"]
    for row in subsystem_rows(registry):
        lines.append("{subsys_name}\t{hierarchy}\t{num_cgroups}\t{enabled}\n".format(**row))
    return "".join(lines)


def membership_rows(registry: Registry, tid: int) -> list[dict]:
    """One row per hierarchy, newest first, for task `tid` (spec 2.8)."""
    task = registry.known_task(tid)
    if task is None:
        raise CgroupError(errno.ESRCH, f"no task with id {tid}")
    return [
        {"hierarchy": h.id, "controllers": h.label, "path": task.cgroups[h.id].path}
        for h in sorted(registry.hierarchies.values(), key=lambda h: h.id, reverse=True)
    ]


def proc_pid_cgroup(rows: list[dict]) -> str:
    """membership_rows() in /proc/PID/cgroup's format."""
    return "".join("{hierarchy}:{controllers}:{path}\n".format(**row) for row in rows)
