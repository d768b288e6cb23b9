"""containerfs.signals' protection is of processes, not of pids that may be reused."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT, fuse_available

#: Runs as pid 1 of a fresh pid namespace. Its child A forks B, which imports
#: containerfs.signals (as a daemon would: A is then a protected ancestor); A exits
#: and is reaped; B makes C take A's pid through ns_last_pid and asks whether C,
#: an ordinary process that merely reuses the pid, is protected and can be signalled.
REUSE = r"""
import os, signal, sys, time
ready_r, ready_w = os.pipe()
a = os.fork()
if a == 0:
    b = os.fork()
    if b == 0:
        from containerfs import signals
        parent = os.getppid()
        print("ancestor-protected", signals.is_protected(parent), flush=True)
        os.write(ready_w, b"x")
        while os.path.exists(f"/proc/{parent}"):
            time.sleep(0.01)
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(parent - 1))
        c = os.fork()
        if c == 0:
            signal.pause()
            os._exit(0)
        print("reused", c == parent, flush=True)
        print("reuser-protected", signals.is_protected(c), flush=True)
        print("sent", signals.signal_process(c, signal.SIGKILL), flush=True)
        os.kill(c, signal.SIGKILL)  # in any case: this namespace must end
        os.waitpid(c, 0)
        print("self-protected", signals.is_protected(os.getpid()), flush=True)
        os._exit(0)
    os.read(ready_r, 1)
    os._exit(0)
os.waitpid(a, 0)
while True:
    try:
        os.wait()
    except ChildProcessError:
        break
"""


def test_a_process_reusing_an_ancestors_pid_is_not_protected():
    if fuse_available() is not None or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1)")
    out = subprocess.run(
        ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", sys.executable, "-c", REUSE],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:-1] == [
        "ancestor-protected True",
        "reused True",
        "reuser-protected False",
        "sent True",
        "self-protected True",
    ], out.stderr
