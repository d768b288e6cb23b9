"""Mounting: the helper, mount(8), options, views, the daemon's life."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from containerfs import mounts
from tests.conftest import wait_for


def fuse_views(under: Path) -> list[str]:
    return [
        m.mount_point
        for m in mounts.read_mounts()
        if m.fstype == "fuse.containerfs" and m.mount_point.startswith(str(under))
    ]


def test_mount_with_mount8_and_generic_options(cfs, workdir):
    target = workdir / "m8"
    target.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "fuse.containerfs", "-o", "none,name=m8,nosuid,noexec", "x", str(target)],
        capture_output=True, text=True, env=cfs.env,
    )
    assert proc.returncode == 0, proc.stderr
    assert "tasks" in os.listdir(target)
    assert str(target) in fuse_views(workdir)
    subprocess.run(["umount", str(target)], check=True)
    assert str(target) not in fuse_views(workdir)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("bogus", "'bogus'"),
        ("none,name=a,name=b", "name= given twice"),
        ("name=bad/name", "invalid hierarchy name"),
        ("name=" + "x" * 64, "invalid hierarchy name"),
        ("none", "nothing to mount"),
        ("rw,ro,none,name=a", "'rw' and 'ro'"),
        ("none,name=a,release_agent=/a,release_agent=/b", "release_agent= given twice"),
        ("noprefix,none,name=a", ""),  # no subsystems: allowed, like the kernel
        ("name=missing", "no hierarchy name=missing"),
        ("key=value,none,name=a", "'key=value'"),
        ("numtasks,default_disabled", "default_disabled needs extended"),
    ],
)
def test_bad_options_fail_with_a_message(cfs, workdir, options, message):
    target = workdir / "bad"
    target.mkdir(exist_ok=True)
    proc = cfs.cli("src", str(target), "-o", options, check=False)
    if not message:
        assert proc.returncode == 0, proc.stderr
        subprocess.run(["umount", str(target)], check=True)
        return
    assert proc.returncode == 32
    assert message in proc.stderr
    assert not fuse_views(target)
    assert cfs.daemon_alive()


def test_same_options_show_the_same_hierarchy(cfs):
    a = cfs.mount("none,name=shared")
    b = cfs.mount("none,name=shared")
    c = cfs.mount("name=shared")  # the name alone finds it
    os.mkdir(a / "x")
    assert os.path.isdir(b / "x") and os.path.isdir(c / "x")
    (b / "x" / "notify_on_release").write_bytes(b"1")
    assert (a / "x" / "notify_on_release").read_bytes() == b"1\n"
    other = cfs.mount("none,name=other")
    assert not os.path.exists(other / "x")


def test_hierarchy_lives_while_it_has_children(cfs):
    v = cfs.mount("none,name=keep")
    os.mkdir(v / "kid")
    (v / "kid" / "notify_on_release").write_bytes(b"1")
    subprocess.run(["umount", str(v)], check=True)
    assert cfs.stats()["hierarchies"] == 1
    again = cfs.mount("none,name=keep")
    assert (again / "kid" / "notify_on_release").read_bytes() == b"1\n"
    os.rmdir(again / "kid")
    subprocess.run(["umount", str(again)], check=True)
    # no children and no view: destroyed, and then the daemon has nothing left to serve
    wait_for(lambda: not cfs.daemon_alive(), timeout=10)


def test_read_only_view(cfs):
    v = cfs.mount("none,name=ro,ro")
    with pytest.raises(OSError) as exc:
        os.mkdir(v / "x")
    assert exc.value.errno == 30  # EROFS


def test_mount_point_must_exist(cfs, workdir):
    proc = cfs.cli("src", str(workdir / "nowhere"), "-o", "none,name=a", check=False)
    assert proc.returncode == 32 and "not a directory" in proc.stderr


def test_helper_starts_the_daemon_itself(workdir):
    from tests.conftest import CLI, fuse_available

    if fuse_available():
        pytest.skip(fuse_available())
    rt = workdir / "auto-rt"
    target = Path(tempfile.mkdtemp(dir=workdir))
    env = {**os.environ, "CONTAINERFS_RUNTIME_DIR": str(rt)}
    try:
        subprocess.run([*CLI, "src", str(target), "-o", "none,name=auto"], check=True, env=env,
                       timeout=60)
        assert "tasks" in os.listdir(target)
        out = subprocess.run([*CLI, "stats"], env=env, capture_output=True, text=True, check=True)
        assert "tracker mode" in out.stdout
    finally:
        subprocess.run([*CLI, "stop"], env=env, capture_output=True)
    assert not fuse_views(workdir)


def test_stop_unmounts_every_view(cfs, workdir):
    cfs.mount("none,name=a")
    cfs.mount("none,name=b")
    assert len(fuse_views(workdir)) == 3  # two views and the daemon's own mount
    cfs.cli("stop")
    wait_for(lambda: not cfs.daemon_alive(), timeout=10)
    assert fuse_views(workdir) == []


def test_one_daemon_per_runtime_dir(cfs):
    proc = cfs.cli("daemon", "-f", check=False)
    assert proc.returncode != 0 and "already serves" in proc.stderr
    assert cfs.daemon_alive()


def test_background_daemon_keeps_its_options(workdir):
    """`containerfs daemon` without -f starts `daemon -f` with every option it was given.

    Also: `--runtime-dir` may follow the command, and every `stats` line has
    its value apart from its label, however long the label.
    """
    from tests.conftest import CLI, fuse_available

    if fuse_available():
        pytest.skip(fuse_available())
    rt = workdir / "bg-rt"
    # a runtime dir the commands must NOT use, should --runtime-dir be ignored
    env = {**os.environ, "CONTAINERFS_RUNTIME_DIR": str(workdir / "elsewhere")}
    try:
        subprocess.run([*CLI, "--runtime-dir", str(rt), "daemon", "--tracker", "scan", "-d"],
                       check=True, env=env, timeout=60)
        out = subprocess.run([*CLI, "stats", "--json", "--runtime-dir", str(rt)], env=env,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        stats = json.loads(out.stdout)
        assert stats["tracker"]["mode"] == "scan"
        with open(f"/proc/{stats['pid']}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert b"-d" in argv
        text = subprocess.run([*CLI, f"--runtime-dir={rt}", "stats"], env=env,
                              capture_output=True, text=True, check=True, timeout=60).stdout
        assert re.search(r"^tracker mode +scan$", text, re.M)
        for key, value in stats["tracker"].items():
            if key != "mode":
                assert re.search(rf"^tracker {key} +\d+$", text, re.M), (key, value, text)
    finally:
        subprocess.run([*CLI, "stop", "--runtime-dir", str(rt)], env=env, capture_output=True,
                       timeout=60)
    assert not (workdir / "elsewhere").exists()


@pytest.mark.parametrize("source", ["events", "stats", "daemon"])
def test_a_source_named_like_a_command_still_mounts(cfs, workdir, source):
    """mount(8) passes SOURCE verbatim: `events DIR -o OPTIONS` is a mount, not `events`."""
    target = workdir / "m8"
    target.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "fuse.containerfs", "-o", "none,name=q", source, str(target)],
        capture_output=True, text=True, env=cfs.env, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert str(target) in fuse_views(workdir)
    direct = workdir / "direct"
    direct.mkdir()
    cfs.cli(source, str(direct), "-o", "none,name=q")
    os.mkdir(target / "x")
    assert os.path.isdir(direct / "x")
    os.rmdir(target / "x")
    assert "tracker mode" in cfs.cli("stats").stdout  # and the commands are still commands
    for view in (target, direct):
        subprocess.run(["umount", str(view)], check=True)
