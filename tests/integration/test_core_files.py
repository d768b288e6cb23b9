"""Spec sections 3 to 5 on a real mount of a hierarchy without subsystems."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import threading

import pytest

from tests.conftest import read_ids, wait_for, write

ROOT_FILES = {
    "tasks",
    "cgroup.procs",
    "notify_on_release",
    "cgroup.clone_children",
    "release_agent",
    "cgroup.sane_behavior",
}
CHILD_FILES = {"tasks", "cgroup.procs", "notify_on_release", "cgroup.clone_children"}


def err(fn, *args) -> int:
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno
    return 0


def test_listing_modes_and_owners(view):
    assert set(os.listdir(view)) == ROOT_FILES
    st = os.stat(view)
    assert stat.S_IMODE(st.st_mode) == 0o555 and (st.st_uid, st.st_gid) == (0, 0)
    modes = {n: stat.S_IMODE(os.stat(view / n).st_mode) for n in ROOT_FILES}
    assert modes == {
        "tasks": 0o644,
        "cgroup.procs": 0o644,
        "notify_on_release": 0o644,
        "cgroup.clone_children": 0o644,
        "release_agent": 0o644,
        "cgroup.sane_behavior": 0o444,
    }
    assert all(os.stat(view / n).st_size == 0 for n in ROOT_FILES)
    old = os.umask(0o077)
    try:
        os.mkdir(view / "a")
    finally:
        os.umask(old)
    assert set(os.listdir(view / "a")) == CHILD_FILES
    assert stat.S_IMODE(os.stat(view / "a").st_mode) == 0o700
    assert os.stat(view).st_nlink == 3
    ls = subprocess.run(["ls", "-a", str(view / "a")], capture_output=True, text=True).stdout
    assert ls.split() == [".", "..", *sorted(CHILD_FILES)]


def test_reads_of_core_files(view):
    assert (view / "notify_on_release").read_bytes() == b"0\n"
    assert (view / "cgroup.clone_children").read_bytes() == b"0\n"
    assert (view / "release_agent").read_bytes() == b"\n"
    assert (view / "cgroup.sane_behavior").read_bytes() == b"0\n"
    os.mkdir(view / "a")
    assert (view / "a" / "tasks").read_bytes() == b""
    assert (view / "a" / "cgroup.procs").read_bytes() == b""


def test_root_lists_every_task_sorted(view):
    tids = read_ids(view / "tasks")
    assert tids == sorted(set(tids))
    assert os.getpid() in tids and 1 in tids
    procs = read_ids(view / "cgroup.procs")
    assert procs == sorted(set(procs)) and os.getpid() in procs


def test_shell_session_from_the_issue(view):
    """mkdir, echo $$ > tasks, and a child of the shell listed too; rmdir EBUSY until they leave."""
    # the child prints its pid, then becomes cat: the listing must be exactly the two
    script = f"""
        mkdir {view}/a
        echo $$ > {view}/a/tasks
        sh -c 'echo $$; exec cat {view}/a/tasks' > {view.parent}/listing
        rmdir {view}/a 2> {view.parent}/rmdir.err && echo removed
        echo $$ > {view}/tasks
        rmdir {view}/a && echo removed-after
        echo $$
    """
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True).stdout
    shell_pid = int(out.split()[-1])
    child_pid, *listing = [int(x) for x in (view.parent / "listing").read_text().split()]
    assert listing == sorted([shell_pid, child_pid])
    assert "Device or resource busy" in (view.parent / "rmdir.err").read_text()
    assert "removed-after" in out and "removed\n" not in out


def test_new_threads_and_children_after_the_move(view, procs):
    os.mkdir(view / "a")
    py = procs.spawn(
        "python3",
        "-c",
        """
import os, sys, threading, time
sys.stdin.readline()
threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()
pid = os.fork()
if pid == 0:
    time.sleep(1000)
print(pid, threading.enumerate()[-1].native_id, flush=True)
sys.stdin.readline()
""",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert write(view / "a" / "tasks", str(py.pid).encode()) == 0
    py.stdin.write("go\n")
    py.stdin.flush()
    child, thread = map(int, py.stdout.readline().split())
    tids = read_ids(view / "a" / "tasks")
    assert {py.pid, thread, child} <= set(tids)
    assert read_ids(view / "a" / "cgroup.procs") == sorted({py.pid, child})
    os.kill(child, 9)
    wait_for(lambda: child not in read_ids(view / "a" / "tasks"))


def test_tasks_moves_one_thread_procs_moves_all(view, procs):
    ready = threading.Event()
    stop = threading.Event()

    def worker():
        ready.set()
        stop.wait()

    t = threading.Thread(target=worker)
    t.start()
    try:
        ready.wait()
        os.mkdir(view / "one")
        os.mkdir(view / "all")
        assert write(view / "one" / "tasks", str(t.native_id).encode()) == 0
        assert read_ids(view / "one" / "tasks") == [t.native_id]
        assert read_ids(view / "one" / "cgroup.procs") == [os.getpid()]  # the tgid of a member
        assert write(view / "all" / "cgroup.procs", str(t.native_id).encode()) == 0
        assert t.native_id in read_ids(view / "all" / "tasks")
        assert os.getpid() in read_ids(view / "all" / "tasks")
        assert read_ids(view / "one" / "tasks") == []
    finally:
        stop.set()
        t.join()
        write(view / "cgroup.procs", b"0")


def test_zero_is_the_opener(view):
    """`0` in tasks is the opening thread, not its process: written from a second thread."""
    os.mkdir(view / "a")
    results: list[tuple[int, int]] = []
    written, done = threading.Event(), threading.Event()

    def second() -> None:
        results.append((threading.get_native_id(), write(view / "a" / "tasks", b"0")))
        written.set()
        done.wait()  # stay alive (and listed) until the main thread has looked

    t = threading.Thread(target=second)
    t.start()
    try:
        written.wait()
        (tid, code) = results[0]
        assert tid != os.getpid() and code == 0
        assert read_ids(view / "a" / "tasks") == [tid]  # the thread, and only it
        assert os.getpid() in read_ids(view / "tasks")  # the main thread stayed
    finally:
        done.set()
        t.join()
    assert write(view / "a" / "cgroup.procs", b"0\n") == 0
    assert os.getpid() in read_ids(view / "a" / "cgroup.procs")
    write(view / "cgroup.procs", b"0")


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"abc", errno.EINVAL),
        (b"12 13", errno.EINVAL),
        (b"1\n2\n", errno.EINVAL),
        (b"\n", errno.EINVAL),
        (b"-1", errno.EINVAL),
        (b"2147483648", errno.EINVAL),
        (b"2147483647", errno.ESRCH),
        (b" " * 4096, errno.EINVAL),
        (b"1" * 4097, errno.E2BIG),
        (b"9" * 100000, errno.E2BIG),
        (b"0x", errno.EINVAL),
        (b"08", errno.EINVAL),
    ],
)
def test_tasks_bad_input(view, data, expected):
    os.mkdir(view / "a")
    assert write(view / "a" / "tasks", data) == expected
    assert write(view / "a" / "cgroup.procs", data) == expected
    assert (view / "a" / "tasks").read_bytes() == b""  # nothing moved
    assert write(view / "a" / "tasks", b"0") == 0  # and the daemon still serves
    write(view / "tasks", b"0")


def test_tasks_accepts_kernel_spellings(view, procs):
    sleeper = procs.sleeper()
    os.mkdir(view / "a")
    for spelling in (
        f" +{sleeper.pid}\n",
        hex(sleeper.pid),
        "0" + oct(sleeper.pid)[2:],
        f"\t{sleeper.pid}\v",
    ):
        assert write(view / "tasks", b"%d" % sleeper.pid) == 0
        assert write(view / "a" / "tasks", spelling.encode()) == 0, spelling
        assert read_ids(view / "a" / "tasks") == [sleeper.pid]


def test_each_write_on_one_descriptor_is_its_own_command(view, procs):
    a, b = procs.sleeper(), procs.sleeper()
    os.mkdir(view / "x")
    fd = os.open(view / "x" / "tasks", os.O_WRONLY)
    try:
        os.write(fd, str(a.pid).encode())
        os.write(fd, str(b.pid).encode())
        with pytest.raises(OSError) as exc:
            os.write(fd, b"junk")
        assert exc.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    assert read_ids(view / "x" / "tasks") == sorted([a.pid, b.pid])


@pytest.mark.parametrize("name", ["notify_on_release", "cgroup.clone_children"])
def test_flag_files(view, name):
    os.mkdir(view / "a")
    path = view / "a" / name
    for data, expected, value in [
        (b"1", 0, b"1\n"),
        (b"0", 0, b"0\n"),
        (b"7\n", 0, b"1\n"),
        (b"+0", 0, b"0\n"),
        (b"0x10", 0, b"1\n"),
        (b"00", 0, b"0\n"),
    ]:
        assert write(path, data) == expected
        assert path.read_bytes() == value
    for data, expected in [
        (b" 1", errno.EINVAL),
        (b"1 ", errno.EINVAL),
        (b"1\n\n", errno.EINVAL),
        (b"-1", errno.EINVAL),
        (b"\n", errno.EINVAL),
        (b"abc", errno.EINVAL),
        (b"18446744073709551616", errno.ERANGE),
        (b"08", errno.EINVAL),
        (b"1" * 4097, errno.E2BIG),
    ]:
        assert write(path, data) == expected, data
        assert path.read_bytes() == b"0\n", data  # nothing stored changed
    assert write(path, b"1\x00junk") == 0 and path.read_bytes() == b"1\n"


def test_flags_are_inherited_at_mkdir_only(view):
    (view / "notify_on_release").write_bytes(b"1")
    (view / "cgroup.clone_children").write_bytes(b"1")
    os.mkdir(view / "a")
    (view / "notify_on_release").write_bytes(b"0")
    assert (view / "a" / "notify_on_release").read_bytes() == b"1\n"
    assert (view / "a" / "cgroup.clone_children").read_bytes() == b"1\n"
    os.mkdir(view / "b")
    assert (view / "b" / "notify_on_release").read_bytes() == b"0\n"


def test_release_agent_file(view):
    agent = view / "release_agent"
    assert write(agent, b"  /sbin/agent with space \n") == 0
    assert agent.read_bytes() == b"/sbin/agent with space\n"
    assert write(agent, b"/x" * 2048) == errno.E2BIG  # 4096 > 4095
    assert agent.read_bytes() == b"/sbin/agent with space\n"  # and nothing was applied
    assert write(agent, b"/" + b"x" * 4094) == 0
    assert agent.read_bytes() == b"/" + b"x" * 4094 + b"\n"
    assert write(agent, b"\n") == 0
    assert agent.read_bytes() == b"\n"


def test_read_only_and_write_only_errors(view):
    assert write(view / "cgroup.sane_behavior", b"1") == errno.EINVAL
    assert (view / "cgroup.sane_behavior").read_bytes() == b"0\n"


def test_namespace_operations_refused(view):
    os.mkdir(view / "a")
    assert err(os.open, view / "newfile", os.O_CREAT | os.O_WRONLY) == errno.EACCES
    assert err(os.unlink, view / "tasks") == errno.EPERM
    assert err(os.symlink, "x", view / "link") == errno.EPERM
    assert err(os.link, view / "tasks", view / "a" / "hard") == errno.EPERM
    assert err(os.mkfifo, view / "fifo") == errno.EPERM
    assert err(os.mknod, view / "chr", stat.S_IFCHR | 0o600, os.makedev(1, 3)) == errno.EPERM
    assert err(os.mknod, view / "blk", stat.S_IFBLK | 0o600, os.makedev(7, 0)) == errno.EPERM
    assert err(os.mknod, view / "reg", stat.S_IFREG | 0o644) == errno.EACCES
    assert err(os.mkdir, view / "tasks") == errno.EEXIST
    assert err(os.mkdir, view / "a") == errno.EEXIST
    assert err(os.mkdir, view / "bad\nname") == errno.EINVAL
    assert err(os.rmdir, view / "tasks") == errno.ENOTDIR
    assert err(os.rmdir, view / "missing") == errno.ENOENT
    os.mkdir(view / ("n" * 255))
    os.mkdir(view / "sp ace.dots")
    assert {"a", "n" * 255, "sp ace.dots"} <= set(os.listdir(view))


def test_long_names_are_limited_by_the_vfs_only(view):
    """kernfs has no name limit of its own (spec 0): only the VFS's PATH_MAX applies.

    A name is copied in with the path, so 4095 bytes is the most any
    filesystem can get and 4096 is ENAMETOOLONG before cgroupfs (or FUSE)
    sees it. Older kernels' FUSE layer refuses names over 1024 bytes
    (FUSE_NAME_MAX) by itself; containerfs never answers ENAMETOOLONG.
    """
    fd = os.open(view, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if err(lambda n: os.mkdir(n, dir_fd=fd), "n" * 1025) == errno.ENAMETOOLONG:
            pytest.skip("this kernel's FUSE refuses names over 1024 bytes (FUSE_NAME_MAX)")
        os.rmdir("n" * 1025, dir_fd=fd)
        for size in (1025, 4000, 4095):
            name = "n" * size
            os.mkdir(name, dir_fd=fd)
            assert name in os.listdir(view)
            child = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            try:
                assert set(os.listdir(child)) == CHILD_FILES
            finally:
                os.close(child)
            os.rmdir(name, dir_fd=fd)
        for size in (4096, 5000):
            assert err(lambda n: os.mkdir(n, dir_fd=fd), "n" * size) == errno.ENAMETOOLONG
    finally:
        os.close(fd)
    assert set(os.listdir(view)) == ROOT_FILES


def test_rmdir_rules(view):
    assert err(os.rmdir, view) == errno.EBUSY  # the mount root (a mount point, spec 5.2)
    os.makedirs(view / "p" / "c")
    assert err(os.rmdir, view / "p") == errno.EBUSY  # it has a child
    os.rmdir(view / "p" / "c")
    os.rmdir(view / "p")
    assert set(os.listdir(view)) == ROOT_FILES


@pytest.mark.parametrize(("flag", "name"), [(1, "NOREPLACE"), (2, "EXCHANGE"), (4, "WHITEOUT")])
def test_renameat2_with_flags_is_einval(view, flag, name):
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        pytest.skip("the C library has no renameat2")
    os.mkdir(view / "a")
    os.mkdir(view / "b")
    # EXCHANGE needs an existing target and NOREPLACE a missing one, or the VFS answers first
    target = view / ("b" if name == "EXCHANGE" else "new")
    at_fdcwd = -100
    rc = libc.renameat2(at_fdcwd, os.fsencode(view / "a"), at_fdcwd, os.fsencode(target), flag)
    assert (rc, ctypes.get_errno()) == (-1, errno.EINVAL)
    assert set(os.listdir(view)) == ROOT_FILES | {"a", "b"}


def test_a_zombie_is_found_but_nothing_moves(view, procs):
    """Writing a zombie's id succeeds and moves nothing (spec 4.2 step 3)."""
    zombie = procs.spawn("true")  # not waited for until teardown: a zombie meanwhile

    def state() -> str:
        with open(f"/proc/{zombie.pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]

    wait_for(lambda: state() == "Z")
    os.mkdir(view / "a")
    assert write(view / "a" / "tasks", str(zombie.pid).encode()) == 0
    assert write(view / "a" / "cgroup.procs", str(zombie.pid).encode()) == 0
    assert (view / "a" / "tasks").read_bytes() == b""
    assert (view / "a" / "cgroup.procs").read_bytes() == b""
    os.rmdir(view / "a")  # nothing keeps it busy


def test_rename_rules(view):
    os.makedirs(view / "a" / "b")
    os.mkdir(view / "c")
    os.rename(view / "a", view / "a2")
    assert os.path.isdir(view / "a2" / "b")
    assert err(os.rename, view / "a2" / "b", view / "c" / "b") == errno.EIO
    assert err(os.rename, view / "c", view / "a2") == errno.EEXIST
    assert err(os.rename, view / "c", view / "x\ny") == errno.EINVAL
    assert err(os.rename, view / "c" / "tasks", view / "c" / "t2") == errno.ENOTDIR
    assert err(os.rename, view / "c", view / "tasks") == errno.ENOTDIR
    assert err(os.rename, view / "c" / "tasks", view / "a2") == errno.EISDIR
    os.rename(view / "c", view / "c")  # same name: no-op


def test_removed_container_gives_enodev_through_open_files(view):
    os.mkdir(view / "a")
    fd = os.open(view / "a" / "notify_on_release", os.O_RDWR)
    try:
        os.rmdir(view / "a")
        with pytest.raises(OSError) as exc:
            os.write(fd, b"1")
        assert exc.value.errno == errno.ENODEV
        with pytest.raises(OSError) as exc:
            os.pread(fd, 100, 0)
        assert exc.value.errno == errno.ENODEV
    finally:
        os.close(fd)
    os.mkdir(view / "a")  # the name is reusable at once
    assert (view / "a" / "tasks").read_bytes() == b""


def test_removed_container_refuses_a_move_through_an_open_tasks(view, procs):
    sleeper = procs.sleeper()
    os.mkdir(view / "a")
    fd = os.open(view / "a" / "tasks", os.O_WRONLY)
    try:
        os.rmdir(view / "a")
        with pytest.raises(OSError) as exc:
            os.write(fd, str(sleeper.pid).encode())
        assert exc.value.errno == errno.ENODEV
    finally:
        os.close(fd)
    assert sleeper.pid in read_ids(view / "tasks")  # it stayed where it was


def test_truncate_and_append_are_accepted(view):
    with open(view / "notify_on_release", "w") as f:  # O_TRUNC
        f.write("1")
    with open(view / "notify_on_release", "a") as f:
        f.write("0")
    assert (view / "notify_on_release").read_bytes() == b"0\n"
    fd = os.open(view / "notify_on_release", os.O_WRONLY)
    try:
        assert os.write(fd, b"") == 0
    finally:
        os.close(fd)


def test_small_sequential_reads(view):
    fd = os.open(view / "tasks", os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 3):
            chunks.append(chunk)
        whole = b"".join(chunks)
        os.lseek(fd, 0, os.SEEK_SET)
        again = os.read(fd, 1 << 20)
    finally:
        os.close(fd)
    mine = str(os.getpid()).encode()
    assert whole.endswith(b"\n") and mine in whole.split()
    assert again.endswith(b"\n") and mine in again.split()  # lseek(0) regenerates
