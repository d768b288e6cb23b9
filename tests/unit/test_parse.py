"""Kernel-parser clones in containerfs.core.parse: values and exact errnos."""

import errno
import itertools
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from containerfs.core.parse import (
    ParseError,
    c_string,
    check_size,
    format_id_list,
    kstrtoint,
    kstrtoll,
    kstrtoull,
    parse_flag,
    parse_id_list,
    parse_max_or_int,
    parse_pid,
    strip,
)
from containerfs.errors import CgroupError

U64_MAX = 2**64 - 1
S64_MAX = 2**63 - 1
S64_MIN = -(2**63)
KERNEL_SPACE = b" \t\n\v\f\r\xa0"
PID_MAX_LIMIT = 4194304


def bytes_from(alphabet: bytes, **sizes: int) -> st.SearchStrategy[bytes]:
    """Byte strings over ``alphabet`` (st.binary has no alphabet argument)."""
    return st.lists(st.sampled_from(alphabet), **sizes).map(bytes)


def errno_of(func, *args) -> int:
    with pytest.raises(ParseError) as info:
        func(*args)
    return info.value.errno


# --------------------------------------------------------------------------- ParseError


def test_parse_error_carries_errno_and_message():
    exc = ParseError(errno.ERANGE, "too big")
    assert isinstance(exc, CgroupError)  # the FUSE layer maps one error type to errno
    assert exc.errno == errno.ERANGE
    assert exc.message == "too big"
    assert str(exc) == "too big"


# --------------------------------------------------------------------------- c_string / strip


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", b""),
        (b"abc", b"abc"),
        (b"1\x00junk", b"1"),
        (b"\x00abc", b""),
        (b"a\x00b\x00c", b"a"),
    ],
)
def test_c_string(data, expected):
    assert c_string(data) == expected


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", b""),
        (b"  12  ", b"12"),
        (b"\t\n\v\f\r 12\r\f\v\n\t ", b"12"),
        (b"\xa012\xa0", b"12"),
        (b"1 2", b"1 2"),
        (b"\n", b""),
        (b" " * 4096, b""),
        (b" 7 \x00 junk ", b"7"),
        (b"\x0012", b""),
        # Not kernel space: NEL (0x85), other Latin-1 bytes and the C0 controls.
        (b"\x8512\x85", b"\x8512\x85"),
        (b"\x1c12\x1f", b"\x1c12\x1f"),
    ],
)
def test_strip(data, expected):
    assert strip(data) == expected


@given(bytes_from(KERNEL_SPACE), st.binary(), bytes_from(KERNEL_SPACE))
def test_strip_removes_exactly_kernel_space(left, middle, right):
    core = c_string(middle).strip(KERNEL_SPACE)
    stripped = strip(left + core + right)
    assert stripped == core
    assert not stripped or (stripped[0] not in KERNEL_SPACE and stripped[-1] not in KERNEL_SPACE)


# --------------------------------------------------------------------------- check_size


@pytest.mark.parametrize(
    ("size", "limit", "ok"),
    [
        (0, 4096, True),
        (4096, 4096, True),
        (4097, 4096, False),
        (4095, 4095, True),
        (4096, 4095, False),
    ],
)
def test_check_size(size, limit, ok):
    data = b" " * size
    if ok:
        check_size(data, limit)
    else:
        assert errno_of(check_size, data, limit) == errno.E2BIG


def test_check_size_default_limit_is_page_size():
    check_size(b"1" * 4096)
    assert errno_of(check_size, b"1" * 4097) == errno.E2BIG


# --------------------------------------------------------------------------- kstrtoull

KSTRTOULL_OK = [
    (b"0", 0),
    (b"1", 1),
    (b"1\n", 1),
    (b"+1", 1),
    (b"+0", 0),
    (b"007", 7),
    (b"010", 8),
    (b"0010", 8),
    (b"0777", 511),
    (b"0x1f", 31),
    (b"0X1F", 31),
    (b"0x1F\n", 31),
    (b"+0x10", 16),
    (b"0x0", 0),
    (b"0xffffffffffffffff", U64_MAX),
    (b"01777777777777777777777", U64_MAX),
    (b"18446744073709551615", U64_MAX),
    (b"18446744073709551615\n", U64_MAX),
    (b"1\x00junk", 1),
    (b"1\n\x00\n", 1),
    (b"00000000000000000000000000000000000001", 1),
]

KSTRTOULL_ERR = [
    (b"", errno.EINVAL),
    (b"\n", errno.EINVAL),
    (b"\x001", errno.EINVAL),
    (b" 1", errno.EINVAL),
    (b"1 ", errno.EINVAL),
    (b"\t1", errno.EINVAL),
    (b"1\t", errno.EINVAL),
    (b"1\v", errno.EINVAL),
    (b"1\f", errno.EINVAL),
    (b"1\r", errno.EINVAL),
    (b"1\r\n", errno.EINVAL),
    (b"\xa01", errno.EINVAL),
    (b"1\xa0", errno.EINVAL),
    (b"1\n\n", errno.EINVAL),
    (b"\n1", errno.EINVAL),
    (b"1\n2", errno.EINVAL),
    (b"-1", errno.EINVAL),
    (b"-0", errno.EINVAL),
    (b"+", errno.EINVAL),
    (b"++1", errno.EINVAL),
    (b"+-1", errno.EINVAL),
    (b"+ 1", errno.EINVAL),
    (b"abc", errno.EINVAL),
    (b"1a", errno.EINVAL),
    (b"a", errno.EINVAL),
    (b"1.0", errno.EINVAL),
    (b"1_000", errno.EINVAL),
    (b"1e3", errno.EINVAL),
    (b"08", errno.EINVAL),
    (b"09", errno.EINVAL),
    (b"008", errno.EINVAL),
    (b"0x", errno.EINVAL),
    (b"0X", errno.EINVAL),
    (b"0x\n", errno.EINVAL),
    (b"0xg", errno.EINVAL),
    (b"0x1g", errno.EINVAL),
    (b"x1", errno.EINVAL),
    (b"0b1", errno.EINVAL),
    (b"0o7", errno.EINVAL),
    (b"\xef\xbc\x91", errno.EINVAL),  # fullwidth digit one
    (b"18446744073709551616", errno.ERANGE),
    (b"18446744073709551616\n", errno.ERANGE),
    (b"0x10000000000000000", errno.ERANGE),
    (b"02000000000000000000000", errno.ERANGE),
    (b"99999999999999999999", errno.ERANGE),
    (b"99999999999999999999x", errno.ERANGE),  # overflow is reported before junk
    (b"99999999999999999999 ", errno.ERANGE),
    (b"99999999999999999999\n\n", errno.ERANGE),
    (b"9" * 5000, errno.ERANGE),
]


@pytest.mark.parametrize(("data", "expected"), KSTRTOULL_OK)
def test_kstrtoull_accepts(data, expected):
    assert kstrtoull(data) == expected


@pytest.mark.parametrize(("data", "err"), KSTRTOULL_ERR)
def test_kstrtoull_rejects(data, err):
    assert errno_of(kstrtoull, data) == err


def kstrtoull_oracle(data: bytes) -> int:
    """An independent regex formulation of lib/kstrtox.c, for differential testing."""
    s = data.split(b"\0")[0]
    m = re.fullmatch(
        rb"\+?(?:0[xX](?P<hex>[0-9a-fA-F]+)|(?P<oct>0[0-7]*)|(?P<dec>[1-9][0-9]*))(?P<rest>.*)",
        s,
        re.DOTALL,
    )
    if m is None:
        raise ParseError(errno.EINVAL, "no digits")
    if m["hex"] is not None:
        value = int(m["hex"], 16)
    elif m["oct"] is not None:
        value = int(m["oct"], 8)
    else:
        value = int(m["dec"], 10)
    if value > U64_MAX:
        raise ParseError(errno.ERANGE, "overflow")
    if m["rest"] not in (b"", b"\n"):
        raise ParseError(errno.EINVAL, "junk")
    return value


def outcome(func, data):
    try:
        return ("ok", func(data))
    except ParseError as exc:
        return ("error", exc.errno)


@given(bytes_from(b"0123456789abcdefxXg+- \n\t\x00\xa0", max_size=30))
def test_kstrtoull_matches_oracle_on_arbitrary_input(data):
    assert outcome(kstrtoull, data) == outcome(kstrtoull_oracle, data)


@given(st.integers(min_value=0, max_value=2**70).map(str).map(str.encode))
def test_kstrtoull_matches_oracle_near_overflow(data):
    assert outcome(kstrtoull, data) == outcome(kstrtoull_oracle, data)


@given(
    st.integers(min_value=0, max_value=U64_MAX),
    st.sampled_from([b"", b"+"]),
    st.sampled_from([b"", b"\n"]),
)
def test_kstrtoull_round_trips_every_spelling(n, sign, newline):
    assert kstrtoull(sign + str(n).encode() + newline) == n
    assert kstrtoull(sign + f"0x{n:x}".encode() + newline) == n
    assert kstrtoull(sign + f"0X{n:X}".encode() + newline) == n
    assert kstrtoull(sign + f"0{n:o}".encode() + newline) == n


@given(st.integers(min_value=U64_MAX + 1, max_value=2**80))
def test_kstrtoull_overflow_is_erange_in_every_base(n):
    for spelling in (str(n), f"0x{n:x}", f"0{n:o}"):
        assert errno_of(kstrtoull, spelling.encode()) == errno.ERANGE


# --------------------------------------------------------------------------- kstrtoll

KSTRTOLL_OK = [
    (b"0", 0),
    (b"-0", 0),
    (b"+0", 0),
    (b"-1", -1),
    (b"-1\n", -1),
    (b"+1", 1),
    (b"-010", -8),
    (b"-0x10", -16),
    (b"9223372036854775807", S64_MAX),
    (b"0x7fffffffffffffff", S64_MAX),
    (b"-9223372036854775808", S64_MIN),
    (b"-0x8000000000000000", S64_MIN),
    (b"-1\x00junk", -1),
]

KSTRTOLL_ERR = [
    (b"", errno.EINVAL),
    (b"-", errno.EINVAL),
    (b"-\n", errno.EINVAL),
    (b"--1", errno.EINVAL),
    (b"+-1", errno.EINVAL),
    (b"-+1", errno.EINVAL),  # kstrtoll skips '-' then calls _kstrtoull, which takes no '+'
    (b"- 1", errno.EINVAL),
    (b" -1", errno.EINVAL),
    (b"-1 ", errno.EINVAL),
    (b"-1\n\n", errno.EINVAL),
    (b"-08", errno.EINVAL),
    (b"-0x", errno.EINVAL),
    (b"9223372036854775808", errno.ERANGE),
    (b"0x8000000000000000", errno.ERANGE),
    (b"18446744073709551615", errno.ERANGE),
    (b"-9223372036854775809", errno.ERANGE),
    (b"-18446744073709551615", errno.ERANGE),
    (b"-18446744073709551616", errno.ERANGE),
    (b"-99999999999999999999x", errno.ERANGE),
]


@pytest.mark.parametrize(("data", "expected"), KSTRTOLL_OK)
def test_kstrtoll_accepts(data, expected):
    assert kstrtoll(data) == expected


@pytest.mark.parametrize(("data", "err"), KSTRTOLL_ERR)
def test_kstrtoll_rejects(data, err):
    assert errno_of(kstrtoll, data) == err


@given(st.integers(min_value=S64_MIN, max_value=S64_MAX))
def test_kstrtoll_round_trips(n):
    assert kstrtoll(str(n).encode()) == n
    sign = "-" if n < 0 else ""
    assert kstrtoll(f"{sign}0x{abs(n):x}\n".encode()) == n
    assert kstrtoll(f"{sign}0{abs(n):o}".encode()) == n


@given(
    st.one_of(
        st.integers(max_value=S64_MIN - 1, min_value=-(2**64) + 1),
        st.integers(min_value=S64_MAX + 1, max_value=U64_MAX),
    )
)
def test_kstrtoll_out_of_s64_is_erange(n):
    assert errno_of(kstrtoll, str(n).encode()) == errno.ERANGE


# --------------------------------------------------------------------------- kstrtoint


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"2147483647", 2**31 - 1),
        (b"-2147483648", -(2**31)),
        (b"0x7fffffff", 2**31 - 1),
        (b"-1", -1),
        (b"017", 15),
    ],
)
def test_kstrtoint_accepts(data, expected):
    assert kstrtoint(data) == expected


@pytest.mark.parametrize(
    ("data", "err"),
    [
        (b"2147483648", errno.ERANGE),
        (b"-2147483649", errno.ERANGE),
        (b"0x80000000", errno.ERANGE),
        (b"4294967296", errno.ERANGE),
        (b"99999999999999999999", errno.ERANGE),
        (b"1 ", errno.EINVAL),
        (b"", errno.EINVAL),
    ],
)
def test_kstrtoint_rejects(data, err):
    assert errno_of(kstrtoint, data) == err


# --------------------------------------------------------------------------- parse_flag


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"0", False),
        (b"0\n", False),
        (b"1", True),
        (b"1\n", True),
        (b"2", True),
        (b"+1", True),
        (b"00", False),
        (b"0x0", False),
        (b"0x10", True),
        (b"18446744073709551615", True),
        (b"0\x001", False),
    ],
)
def test_parse_flag_accepts(data, expected):
    assert parse_flag(data) is expected


@pytest.mark.parametrize(
    ("data", "err"),
    [
        (b"", errno.EINVAL),
        (b"\n", errno.EINVAL),
        (b" 1", errno.EINVAL),
        (b"1 ", errno.EINVAL),
        (b"1\t", errno.EINVAL),
        (b"1\n\n", errno.EINVAL),
        (b"-1", errno.EINVAL),
        (b"yes", errno.EINVAL),
        (b"true", errno.EINVAL),
        (b"18446744073709551616", errno.ERANGE),
    ],
)
def test_parse_flag_rejects(data, err):
    assert errno_of(parse_flag, data) == err


# --------------------------------------------------------------------------- parse_pid


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"0", 0),
        (b"1", 1),
        (b"1234\n", 1234),
        (b"  1234  \n", 1234),
        (b"\t\v\f\r 42\r\f\v\t\n", 42),
        (b"\xa042\xa0", 42),
        (b"+12", 12),
        (b" +12\n", 12),
        (b"0x10", 16),
        (b"0X10\n", 16),
        (b"010", 8),
        (b"-0", 0),
        (b"2147483647", 2147483647),
        (b"12\x00 13", 12),
        (b"7\n\x00junk", 7),
    ],
)
def test_parse_pid_accepts(data, expected):
    assert parse_pid(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n",
        b"\n\n",
        b" " * 4096,
        b"\x00",
        b"\x0012",
        b"-1",
        b"-2147483648",
        b"2147483648",
        b"4294967296",
        b"99999999999999999999",
        b"12 13",
        b"12\t13",
        b"1\n2\n",
        b"1,2",
        b"abc",
        b"12abc",
        b"08",
        b"0x",
        b"++1",
        b"-+1",
        b"+-1",
        b"1.5",
        b"\x8512",
    ],
)
def test_parse_pid_rejects_with_einval(data):
    assert errno_of(parse_pid, data) == errno.EINVAL


@given(
    st.integers(min_value=0, max_value=2**31 - 1),
    bytes_from(KERNEL_SPACE, max_size=5),
    bytes_from(KERNEL_SPACE, max_size=5),
)
def test_parse_pid_round_trips_with_any_padding(pid, left, right):
    assert parse_pid(left + str(pid).encode() + right) == pid


@given(st.one_of(st.integers(max_value=-1), st.integers(min_value=2**31)))
def test_parse_pid_out_of_int_range_is_einval(n):
    assert errno_of(parse_pid, str(n).encode()) == errno.EINVAL


def test_pid_oversized_write_goes_through_check_size():
    check_size(b" " * 4096)
    assert errno_of(parse_pid, b" " * 4096) == errno.EINVAL
    assert errno_of(check_size, b" " * 4097) == errno.E2BIG


# --------------------------------------------------------------------------- parse_max_or_int


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"max", None),
        (b"max\n", None),
        (b"  max \t\n", None),
        (b"\xa0max\xa0", None),
        (b"max\x00junk", None),
        (b"0", 0),
        (b"0\n", 0),
        (b" 100 \n", 100),
        (b"+5", 5),
        (b"-0", 0),
        (b"0x10", 16),
        (b"010", 8),
        (b"4194304", PID_MAX_LIMIT),
    ],
)
def test_parse_max_or_int_accepts(data, expected):
    assert parse_max_or_int(data, 0, PID_MAX_LIMIT) == expected


@pytest.mark.parametrize(
    ("data", "err"),
    [
        (b"", errno.EINVAL),
        (b"\n", errno.EINVAL),
        (b"MAX", errno.EINVAL),
        (b"Max", errno.EINVAL),
        (b"max max", errno.EINVAL),
        (b"maximum", errno.EINVAL),
        (b"max1", errno.EINVAL),
        (b"1 2", errno.EINVAL),
        (b"abc", errno.EINVAL),
        (b"08", errno.EINVAL),
        (b"-1", errno.EINVAL),
        (b"4194305", errno.EINVAL),
        (b"9223372036854775807", errno.EINVAL),
        (b"-9223372036854775808", errno.EINVAL),
        (b"9223372036854775808", errno.ERANGE),
        (b"-9223372036854775809", errno.ERANGE),
        (b"99999999999999999999", errno.ERANGE),
    ],
)
def test_parse_max_or_int_rejects(data, err):
    assert errno_of(parse_max_or_int, data, 0, PID_MAX_LIMIT) == err


def test_parse_max_or_int_uses_the_given_bounds():
    assert parse_max_or_int(b"-5", -5, 5) == -5
    assert parse_max_or_int(b"5", -5, 5) == 5
    assert errno_of(parse_max_or_int, b"-6", -5, 5) == errno.EINVAL
    assert errno_of(parse_max_or_int, b"6", -5, 5) == errno.EINVAL


# --------------------------------------------------------------------------- parse_id_list

NBITS = 8


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", set()),
        (b"\n", set()),
        (b"  \t\n", set()),
        (b",", set()),
        (b",,, ,", set()),
        (b"0", {0}),
        (b"7", {7}),
        (b"0-3", {0, 1, 2, 3}),
        (b"0-3,5,7", {0, 1, 2, 3, 5, 7}),
        (b"3,1,2,1", {1, 2, 3}),
        (b"1-3,2-4", {1, 2, 3, 4}),
        (b"2-2", {2}),
        (b"007", {7}),
        (b" 1 , 2 \n", {1, 2}),
        (b"1 2\t3", {1, 2, 3}),
        (b"1\xa02", {1, 2}),
        (b",1,,2,", {1, 2}),
        (b"1\x00,2", {1}),
        (b"all", set(range(NBITS))),
        (b"ALL", set(range(NBITS))),
        (b"All", set(range(NBITS))),
        (b"N", {NBITS - 1}),
        (b"0-N", set(range(NBITS))),
        (b"N-N", {NBITS - 1}),
        (b"0-7:2/4", {0, 1, 4, 5}),
        (b"1-6:1/2", {1, 3, 5}),
        (b"0-6:3/3", set(range(7))),
        (b"0-N:1/N", {0, 7}),
        (b"all:1/2", {0, 2, 4, 6}),
        (b"0-3:0/2", set()),  # kernel checks group_len == 0 and used > group only
        (b"2-5:1/100", {2}),
        # A newline directly after a plain region ends the whole list...
        (b"1\n2", {1}),
        (b"1-2\n5", {1, 2}),
        # ...but is an ordinary separator where the parser is looking for a region.
        (b"1,\n2", {1, 2}),
        (b"1 \n2", {1, 2}),
        (b"0-3:1/2\n5", {0, 2, 5}),
        # After a stride the kernel does not check the next byte: it starts a region.
        (b"0-3:1/2N", {0, 2, 7}),
        (b"0-3:1/2all", set(range(NBITS))),
    ],
)
def test_parse_id_list_accepts(data, expected):
    result = parse_id_list(data, NBITS)
    assert isinstance(result, frozenset)
    assert result == expected


@pytest.mark.parametrize(
    ("data", "err"),
    [
        (b"abc", errno.EINVAL),
        (b"a", errno.EINVAL),
        (b"3-", errno.EINVAL),
        (b"-3", errno.EINVAL),
        (b"1-", errno.EINVAL),
        (b"1-0", errno.EINVAL),
        (b"5-3", errno.EINVAL),
        (b"1--2", errno.EINVAL),
        (b"1-2-3", errno.EINVAL),
        (b"0x1", errno.EINVAL),
        (b"1a", errno.EINVAL),
        (b"+1", errno.EINVAL),
        (b"1.2", errno.EINVAL),
        (b"1;2", errno.EINVAL),
        (b"n", errno.EINVAL),
        (b"N1", errno.EINVAL),
        (b"1N", errno.EINVAL),
        (b"al", errno.EINVAL),
        (b"alls", errno.EINVAL),
        (b"all-3", errno.EINVAL),
        (b"3:1/2", errno.EINVAL),  # a stride needs a range
        (b"0-3:", errno.EINVAL),
        (b"0-3:1", errno.EINVAL),
        (b"0-3:1/", errno.EINVAL),
        (b"0-3:/2", errno.EINVAL),
        (b"0-3:1-2", errno.EINVAL),
        (b"0-3:3/2", errno.EINVAL),  # used > group
        (b"0-3:1/0", errno.EINVAL),  # empty group
        (b"0-3:1/2x", errno.EINVAL),
        (b"8", errno.ERANGE),
        (b"0-8", errno.ERANGE),
        (b"100", errno.ERANGE),
        (b"4294967294", errno.ERANGE),
        (b"4294967296", errno.EOVERFLOW),
        (b"0-4294967296", errno.EOVERFLOW),
        (b"0-7:4294967296/1", errno.EOVERFLOW),
        (b"99999999999999999999999", errno.EOVERFLOW),
        # end + 1 wraps to 0 in unsigned int, so the group is empty: EINVAL, not ERANGE.
        (b"4294967295", errno.EINVAL),
        # The first bad region decides.
        (b"100,abc", errno.ERANGE),
        (b"abc,100", errno.EINVAL),
        (b"1-0,4294967296", errno.EINVAL),
        (b"4294967296,1-0", errno.EOVERFLOW),
        # A shape error wins over a range error within one region.
        (b"9-8", errno.EINVAL),
        (b"9-10:3/2", errno.EINVAL),
    ],
)
def test_parse_id_list_rejects(data, err):
    assert errno_of(parse_id_list, data, NBITS) == err


def test_parse_id_list_uses_nbits_for_all_n_and_range():
    assert parse_id_list(b"all", 1) == {0}
    assert parse_id_list(b"N", 1) == {0}
    assert parse_id_list(b"N", 1024) == {1023}
    assert parse_id_list(b"1023", 1024) == {1023}
    assert errno_of(parse_id_list, b"1024", 1024) == errno.ERANGE
    assert errno_of(parse_id_list, b"1", 1) == errno.ERANGE


@given(
    st.integers(min_value=1, max_value=64).flatmap(
        lambda nbits: st.tuples(st.just(nbits), st.frozensets(st.integers(0, nbits - 1)))
    )
)
def test_parse_id_list_inverts_format(case):
    nbits, ids = case
    assert parse_id_list(format_id_list(ids).encode() + b"\n", nbits) == ids


@given(st.integers(0, 40), st.integers(0, 40), st.integers(0, 45), st.integers(1, 45))
def test_parse_id_list_stride_semantics(start, length, used, group):
    end = start + length
    data = f"{start}-{end}:{used}/{group}".encode()
    if used > group:
        assert errno_of(parse_id_list, data, 128) == errno.EINVAL
    else:
        expected = {i for i in range(start, end + 1) if (i - start) % group < used}
        assert parse_id_list(data, 128) == expected


@given(
    st.lists(st.tuples(st.integers(0, 63), st.integers(0, 63)), max_size=8),
    st.lists(st.sampled_from([",", " ", "\t", ", ", ",,"]), min_size=8, max_size=8),
)
def test_parse_id_list_is_union_of_regions(pairs, separators):
    regions = [(min(a, b), max(a, b)) for a, b in pairs]
    text = "".join(f"{a}-{b}{sep}" for (a, b), sep in zip(regions, separators, strict=False))
    expected = {i for a, b in regions for i in range(a, b + 1)}
    assert parse_id_list(text.encode(), 64) == expected


# --------------------------------------------------------------------------- format_id_list


@pytest.mark.parametrize(
    ("ids", "expected"),
    [
        ([], ""),
        ([5], "5"),
        ([1, 2], "1-2"),
        ([1, 2, 3, 5], "1-3,5"),
        ([0, 1, 2, 3, 5, 7, 8], "0-3,5,7-8"),
        ([8, 7, 5, 3, 2, 1, 0, 5, 5], "0-3,5,7-8"),
        ([0, 2, 4], "0,2,4"),
        (range(1024), "0-1023"),
        (iter([3, 1, 2]), "1-3"),
    ],
)
def test_format_id_list(ids, expected):
    assert format_id_list(ids) == expected


@given(st.frozensets(st.integers(0, 200)))
def test_format_id_list_is_sorted_and_maximal(ids):
    text = format_id_list(ids)
    if not ids:
        assert text == ""
        return
    assert re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", text)
    bounds = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        bounds.append((int(first), int(last or first)))
        if last:
            assert int(first) < int(last)  # a single id is never printed as "a-a"
    assert [i for a, b in bounds for i in range(a, b + 1)] == sorted(ids)
    for (_, prev_end), (next_start, _) in itertools.pairwise(bounds):
        assert next_start > prev_end + 1  # adjacent runs would have been merged
