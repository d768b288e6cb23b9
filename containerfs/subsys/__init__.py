"""The subsystems containerfs offers, in the order listings print them.

The order follows the kernel's subsystem ids where the kernel has the
subsystem (cpuset, cpuacct, freezer, then numtasks where pids stands), and
puts the seeds' own subsystems after them.
"""

from __future__ import annotations

from containerfs.core.subsystem import Subsystem

AVAILABLE: tuple[type[Subsystem], ...] = ()
