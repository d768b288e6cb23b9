"""What the machine offers: CPUs, memory nodes and the kernel's build limits.

cpuset and cpuacct both size their files by the kernel's CPU numbering
(usage_percpu prints one number per *possible* CPU; a cpuset list may not
name a CPU at or past nr_cpu_ids), so both read it from here.
"""

from __future__ import annotations

import functools
import gzip
import os
import re

from containerfs.core.parse import parse_id_list

_CPU = "/sys/devices/system/cpu"
_NODE = "/sys/devices/system/node"

#: Fallbacks when /proc/config.gz is missing: the values of common distribution kernels.
DEFAULT_NR_CPUS = 8192
DEFAULT_NODES_SHIFT = 10

#: USER_HZ: the unit of clock ticks in /proc/PID/stat and cpuacct.stat.
USER_HZ = os.sysconf("SC_CLK_TCK")


def _read_list(path: str, nbits: int, default: frozenset[int]) -> frozenset[int]:
    try:
        with open(path, "rb") as f:
            return parse_id_list(f.read(), nbits)
    except (OSError, ValueError):
        return default


@functools.cache
def nr_cpu_ids() -> int:
    """One past the highest possible CPU: the size of the kernel's CPU bitmaps."""
    possible = _read_list(f"{_CPU}/possible", 1 << 20, frozenset())
    return max(possible) + 1 if possible else os.cpu_count() or 1


def possible_cpus() -> list[int]:
    return list(range(nr_cpu_ids()))


def online_cpus() -> frozenset[int]:
    """The CPUs the root cpuset holds (the kernel's active mask)."""
    return _read_list(f"{_CPU}/online", nr_cpu_ids(), frozenset(possible_cpus()))


def memory_nodes() -> frozenset[int]:
    """Nodes with memory (N_MEMORY), the root cpuset's mems; node 0 without NUMA."""
    return _read_list(f"{_NODE}/has_memory", max_numnodes(), frozenset({0}))


@functools.cache
def _kernel_config() -> dict[str, str]:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            text = f.read()
    except OSError:
        return {}
    return dict(re.findall(r"^(CONFIG_\w+)=(\S+)$", text, re.MULTILINE))


def config_enabled(option: str) -> bool:
    """A kernel option is set to y, or /proc/config.gz is missing (distributions set it)."""
    config = _kernel_config()
    return not config or config.get(option) == "y"


def _config_int(key: str, default: int) -> int:
    try:
        return int(_kernel_config().get(key, default))
    except ValueError:
        return default


def nr_cpus_config() -> int:
    """CONFIG_NR_CPUS: sizes the cpuset.cpus write limit (100 + 6 * NR_CPUS bytes)."""
    return _config_int("CONFIG_NR_CPUS", DEFAULT_NR_CPUS)


def max_numnodes() -> int:
    """MAX_NUMNODES = 1 << CONFIG_NODES_SHIFT: the node bitmap size and mems write limit."""
    return 1 << _config_int("CONFIG_NODES_SHIFT", DEFAULT_NODES_SHIFT)


def tick_ns() -> int:
    """One scheduler tick (1/CONFIG_HZ) in ns: the grain of tick-based CPU accounting."""
    return 1_000_000_000 // _config_int("CONFIG_HZ", 250)
