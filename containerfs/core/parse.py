"""Byte-exact clones of the kernel parsers behind cgroup v1 control files.

Every public function takes the raw bytes of one write(2), because the errno a
write fails with depends on details (NUL bytes, which bytes count as space,
the order of overflow and junk checks) that a higher-level parser such as
``int(x, 0)`` gets wrong.  Sources: lib/kstrtox.c, lib/string.c (strim),
lib/ctype.c, lib/bitmap-str.c (bitmap_parselist) and kernel/cgroup.
"""

import errno
import itertools
from collections.abc import Iterable
from typing import NamedTuple

from containerfs.errors import CgroupError

__all__ = [
    "ParseError",
    "c_string",
    "check_size",
    "format_id_list",
    "kstrtoint",
    "kstrtoll",
    "kstrtoull",
    "parse_flag",
    "parse_id_list",
    "parse_max_or_int",
    "parse_pid",
    "strip",
]

_U64_MAX = 2**64 - 1
_S64_MAX = 2**63 - 1
_U32_MAX = 2**32 - 1
_INT_MIN = -(2**31)
_INT_MAX = 2**31 - 1

# lib/ctype.c: \t \n \v \f \r are _S; ' ' and 0xA0 (Latin-1 NBSP) are _S|_SP.
_KERNEL_SPACE = b" \t\n\v\f\r\xa0"
_HEX_DIGITS = b"0123456789abcdefABCDEF"


class ParseError(CgroupError):
    """A rejected write: ``errno`` is what the kernel's write(2) fails with."""

    def __str__(self) -> str:
        return self.message


def c_string(data: bytes) -> bytes:
    """Cut at the first NUL: the kernel parses a NUL-terminated copy of the write."""
    return data.split(b"\0", 1)[0]


def strip(data: bytes) -> bytes:
    """strstrip() of the C string: drop leading/trailing kernel isspace() bytes."""
    return c_string(data).strip(_KERNEL_SPACE)


def check_size(data: bytes, limit: int = 4096) -> None:
    """Refuse a write longer than the file's buffer (PAGE_SIZE unless noted) with E2BIG."""
    if len(data) > limit:
        raise ParseError(errno.E2BIG, f"write of {len(data)} bytes exceeds limit of {limit}")


def _parse_integer(s: bytes, pos: int, base: int) -> tuple[int, int, bool]:
    """_parse_integer(): digits below ``base`` from ``pos``; returns (value, end, overflow).

    Like the kernel, overflow past 2**64-1 is sticky and parsing goes on with a
    wrapped value, so the digit run is consumed to its end either way.
    """
    value = 0
    overflow = False
    end = pos
    while end < len(s):
        c = s[end]
        lc = c | 0x20  # the kernel's _tolower(): only A-F map into a-f
        if 0x30 <= c <= 0x39:
            digit = c - 0x30
        elif 0x61 <= lc <= 0x66:
            digit = lc - 0x61 + 10
        else:
            break
        if digit >= base:
            break
        value = value * base + digit
        if value > _U64_MAX:
            overflow = True
            value &= _U64_MAX
        end += 1
    return value, end, overflow


def _kstrtoull(s: bytes) -> int:
    """_kstrtoull(s, 0): radix autodetect, digits, one optional '\\n', nothing else.

    No sign handling: kstrtoll() calls this after '-' so that "-+1" is EINVAL.
    """
    if s[:1] != b"0":
        base = 10
        pos = 0
    elif s[1:2].lower() == b"x" and len(s) > 2 and s[2] in _HEX_DIGITS:
        base = 16
        pos = 2
    else:
        base = 8  # the leading '0' is itself an octal digit
        pos = 0
    value, end, overflow = _parse_integer(s, pos, base)
    if overflow:  # checked before trailing junk, as in the kernel
        raise ParseError(errno.ERANGE, f"number too large: {s!r}")
    if end == pos:
        raise ParseError(errno.EINVAL, f"not a number: {s!r}")
    if s[end:] not in (b"", b"\n"):
        raise ParseError(errno.EINVAL, f"trailing characters in number: {s!r}")
    return value


def kstrtoull(data: bytes) -> int:
    """kstrtoull(buf, 0, ...): the generic u64 parser of write_u64 cgroup files."""
    s = c_string(data)
    if s[:1] == b"+":
        s = s[1:]
    return _kstrtoull(s)


def kstrtoll(data: bytes) -> int:
    """kstrtoll(buf, 0, ...): the generic s64 parser of write_s64 cgroup files."""
    s = c_string(data)
    if s[:1] == b"-":
        magnitude = _kstrtoull(s[1:])
        if magnitude > _S64_MAX + 1:
            raise ParseError(errno.ERANGE, f"number too small: {s!r}")
        return -magnitude
    value = kstrtoull(s)
    if value > _S64_MAX:
        raise ParseError(errno.ERANGE, f"number too large: {s!r}")
    return value


def kstrtoint(data: bytes) -> int:
    """kstrtoint(buf, 0, ...): kstrtoll() narrowed to a 32-bit C int."""
    value = kstrtoll(data)
    if not _INT_MIN <= value <= _INT_MAX:
        raise ParseError(errno.ERANGE, f"number does not fit in an int: {value}")
    return value


def parse_flag(data: bytes) -> bool:
    """Boolean files (notify_on_release, cpuset flags) take any u64; non-zero sets."""
    return kstrtoull(data) != 0


def parse_pid(data: bytes) -> int:
    """tasks / cgroup.procs: ``kstrtoint(strstrip(buf)) || pid < 0`` means EINVAL.

    Every failure, overflow included, is EINVAL; range checks beyond that
    (e.g. ESRCH for an unknown id) belong to the caller.
    """
    try:
        pid = kstrtoint(strip(data))
    except ParseError as exc:
        raise ParseError(errno.EINVAL, f"invalid process id: {exc.message}") from exc
    if pid < 0:
        raise ParseError(errno.EINVAL, f"negative process id: {pid}")
    return pid


def parse_max_or_int(data: bytes, minimum: int, maximum: int) -> int | None:
    """pids.max style: "max" means unlimited (None), else a signed number in range.

    kstrtoll errors pass through (EINVAL, ERANGE); an out-of-range value is EINVAL.
    """
    s = strip(data)
    if s == b"max":
        return None
    value = kstrtoll(s)
    if not minimum <= value <= maximum:
        raise ParseError(errno.EINVAL, f"value {value} outside [{minimum}, {maximum}]")
    return value


class _Region(NamedTuple):
    """One bitmap_parselist region: in every ``group`` ids from start, the first ``used``."""

    start: int
    end: int
    used: int
    group: int


def _is_separator(c: int) -> bool:
    """__end_of_region(): regions are separated by commas and kernel whitespace."""
    return c in _KERNEL_SPACE or c == 0x2C


def _is_end_of_string(c: int) -> bool:
    """end_of_str(): NUL or newline ends the whole list (after a region only)."""
    return c in (0, 0x0A)


def _getnum(s: bytes, pos: int, lastbit: int) -> tuple[int, int]:
    """bitmap_getnum(): 'N' or an unsigned 32-bit decimal number; returns (value, end)."""
    if s[pos] == 0x4E:  # 'N'
        return lastbit, pos + 1
    value, end, overflow = _parse_integer(s, pos, 10)
    if end == pos:
        raise ParseError(errno.EINVAL, f"expected a number at offset {pos} of {s[:-1]!r}")
    if overflow or value > _U32_MAX:
        raise ParseError(errno.EOVERFLOW, f"number too large at offset {pos} of {s[:-1]!r}")
    return value, end


def _parse_region(s: bytes, pos: int, lastbit: int) -> tuple[_Region, int | None]:
    """bitmap_parse_region(): one region from ``pos``; returns it and where to go on.

    The next position is None when the list ends (NUL or newline right after
    the region).  After a stride the kernel does not look at the next byte, so
    whatever follows is parsed as the next region.
    """
    if s[pos : pos + 3].lower() == b"all":
        start, end = 0, lastbit
        pos += 3
    else:
        start, pos = _getnum(s, pos, lastbit)
        end = start
        if not (_is_separator(s[pos]) or _is_end_of_string(s[pos])):
            if s[pos] != 0x2D:  # '-'
                raise ParseError(errno.EINVAL, f"bad range at offset {pos} of {s[:-1]!r}")
            end, pos = _getnum(s, pos + 1, lastbit)
    if _is_separator(s[pos]) or _is_end_of_string(s[pos]):
        whole = (end + 1) & _U32_MAX  # unsigned int arithmetic, as in the kernel
        return _Region(start, end, whole, whole), None if _is_end_of_string(s[pos]) else pos
    if s[pos] != 0x3A:  # ':'
        raise ParseError(errno.EINVAL, f"bad region at offset {pos} of {s[:-1]!r}")
    used, pos = _getnum(s, pos + 1, lastbit)
    if s[pos] != 0x2F:  # '/'
        raise ParseError(errno.EINVAL, f"bad stride at offset {pos} of {s[:-1]!r}")
    group, pos = _getnum(s, pos + 1, lastbit)
    return _Region(start, end, used, group), pos


def _check_region(region: _Region, nbits: int) -> None:
    """bitmap_check_region(): shape errors are EINVAL, ids past the bitmap ERANGE."""
    if region.start > region.end or region.group == 0 or region.used > region.group:
        start, end, used, group = region
        raise ParseError(errno.EINVAL, f"invalid region {start}-{end}:{used}/{group}")
    if region.end >= nbits:
        raise ParseError(errno.ERANGE, f"id {region.end} not below {nbits}")


def parse_id_list(data: bytes, nbits: int) -> frozenset[int]:
    """bitmap_parselist() as used by cpuset.cpus / cpuset.mems after strstrip().

    Accepts "0-3,5", whitespace separators, "all", "N" (= nbits-1) and strides
    "a-b:used/group"; the first bad region decides the errno.
    """
    s = strip(data) + b"\0"  # the sentinel stands in for the C terminator
    lastbit = (nbits - 1) & _U32_MAX
    ids: set[int] = set()
    pos: int | None = 0
    while pos is not None:
        while _is_separator(s[pos]):
            pos += 1
        if _is_end_of_string(s[pos]):
            break
        region, pos = _parse_region(s, pos, lastbit)
        _check_region(region, nbits)
        for first in range(region.start, region.end + 1, region.group):
            ids.update(range(first, min(first + region.used, region.end + 1)))
    return frozenset(ids)


def format_id_list(ids: Iterable[int]) -> str:
    """The kernel's "%*pbl": ascending, runs of two or more ids as "a-b", comma-joined."""
    runs = []
    for _, run in itertools.groupby(enumerate(sorted(set(ids))), lambda p: p[1] - p[0]):
        members = [value for _, value in run]
        first, last = members[0], members[-1]
        runs.append(str(first) if first == last else f"{first}-{last}")
    return ",".join(runs)
