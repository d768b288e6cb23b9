"""The subsystems containerfs offers, in the order listings print them.

The order follows the kernel's subsystem ids where the kernel has the
subsystem (cpuset, cpuacct, freezer, then numtasks where pids stands), and
puts the seeds' own subsystems after them.
"""

from __future__ import annotations

from containerfs.core.subsystem import Subsystem
from containerfs.subsys.cpuacct import Cpuacct
from containerfs.subsys.cpuset import Cpuset
from containerfs.subsys.freezer import FreezerSubsystem
from containerfs.subsys.ns import Ns
from containerfs.subsys.numfiles import NumfilesSubsystem
from containerfs.subsys.numtasks import Numtasks
from containerfs.subsys.virt import Virt

AVAILABLE: tuple[type[Subsystem], ...] = (
    Cpuset,
    Cpuacct,
    FreezerSubsystem,
    Numtasks,
    NumfilesSubsystem,
    Ns,
    Virt,
)
