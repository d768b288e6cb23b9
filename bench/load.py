"""Load: concurrent clients doing mkdir, rmdir, reads and task moves.

Shared by the bench (8 clients for 60 s, `--quick` 10 s) and the test suite
(tests/integration/test_load.py, a shorter run). Each client is a forked
process working on the same small tree of names (two levels, eight names a
level), so they collide all the time: mkdir of a name another client just
made, rmdir of a container that just got a task or a child, a move into a
container removed between open and write. Those collisions have exactly one
right answer each, and EXPECTED lists them; anything else is counted as
unexpected.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

from bench.targets import (
    Containerfs,
    alive,
    open_fds,
    read_file,
    rss_bytes,
    sleeper,
    write_file,
    zombie_children,
)

NAMES = [f"l{i}" for i in range(8)]

#: op -> the errno values a correct cgroup v1 filesystem gives under these races
EXPECTED: dict[str, frozenset[int]] = {
    # the name exists; the parent was removed meanwhile (ENOENT, or ENODEV past lookup)
    "mkdir": frozenset({errno.EEXIST, errno.ENOENT, errno.ENODEV}),
    # gone already; still has tasks or children
    "rmdir": frozenset({errno.ENOENT, errno.EBUSY}),
    # the container went away before open (ENOENT) or between open and write (ENODEV)
    "move": frozenset({errno.ENOENT, errno.ENODEV}),
    "read": frozenset({errno.ENOENT, errno.ENODEV}),
}


def random_path(rng: random.Random) -> str:
    depth = rng.choice((1, 1, 2))
    return "/".join(rng.choice(NAMES) for _ in range(depth))


def client(root: Path, seconds: float, seed: int, pids: list[int]) -> dict:
    """One client's loop; returns op -> {"ok": n, errno name: n}."""
    rng = random.Random(seed)
    counts: dict[str, dict[str, int]] = {op: {"ok": 0} for op in EXPECTED}
    unexpected: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        op = rng.choices(("mkdir", "rmdir", "move", "read"), weights=(3, 3, 4, 1))[0]
        path = root / random_path(rng)
        try:
            if op == "mkdir":
                os.mkdir(path)
            elif op == "rmdir":
                os.rmdir(path)
            elif op == "move":
                target = root if rng.random() < 0.2 else path
                write_file(target / "tasks", str(rng.choice(pids)).encode())
            else:
                read_file(path / "tasks")
            counts[op]["ok"] += 1
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            counts[op][name] = counts[op].get(name, 0) + 1
            if exc.errno not in EXPECTED[op]:
                unexpected.append(f"{op} {path.relative_to(root)}: {exc}")
    return {"counts": counts, "unexpected": unexpected[:20]}


def run_clients(root: Path, seconds: float, pids: list[int], clients: int = 8) -> dict:
    """`clients` forked clients for `seconds`; their merged counts."""
    running = []
    for seed in range(clients):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child process
            os.close(r)
            code = 1
            try:
                os.write(w, json.dumps(client(root, seconds, seed, pids)).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(w)
        running.append((pid, r))
    merged: dict[str, dict[str, int]] = {}
    unexpected: list[str] = []
    failed = 0
    for pid, r in running:
        with os.fdopen(r, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0 or not data:
            failed += 1
            continue
        result = json.loads(data)
        unexpected += result["unexpected"]
        for op, counts in result["counts"].items():
            for key, n in counts.items():
                merged.setdefault(op, {})[key] = merged.setdefault(op, {}).get(key, 0) + n
    total = sum(n for counts in merged.values() for n in counts.values())
    return {
        "clients": clients,
        "seconds": seconds,
        "ops": total,
        "ops_per_s": total / seconds,
        "counts": merged,
        "unexpected": unexpected,
        "failed_clients": failed,
    }


def empty_tree(root: Path, pids: list[int]) -> None:
    """Move `pids` back to the root and remove every container, deepest first."""
    for pid in pids:
        with contextlib.suppress(OSError):
            write_file(root / "tasks", str(pid).encode())
    dirs = sorted(
        (Path(d) for d, _, _ in os.walk(root) if Path(d) != root),
        key=lambda p: len(p.parts),
        reverse=True,
    )
    for d in dirs:
        d.rmdir()


def settled_fds(pid: int, baseline: int, timeout: float = 5.0) -> int:
    """The daemon's fd count once it is back to `baseline`, or after `timeout`.

    The daemon closes its end of a control connection a moment after the
    client has its reply, so a count taken at once may still include it.
    """
    deadline = time.monotonic() + timeout
    while (count := open_fds(pid)) > baseline and time.monotonic() < deadline:
        time.sleep(0.05)
    return count


def load_run(root: Path, daemon: int, stats: Callable[[], dict], seconds: float) -> dict:
    """The whole load experiment on a containerfs view, with leak checks.

    `daemon` is the serving daemon's pid and `stats` asks it for its stats.
    Baselines are taken after a short warm-up round (the first requests
    allocate caches), the long round follows, then the tree is emptied and
    the daemon's fds, zombies, open handles, containers and RSS are compared.
    """
    pool = [sleeper() for _ in range(16)]
    pids = [p.pid for p in pool]
    try:
        run_clients(root, min(2.0, seconds / 5), pids)
        empty_tree(root, pids)
        base = {
            "fds": open_fds(daemon),
            "rss_mb": rss_bytes(daemon) / 2**20,
            "containers": stats()["containers"],
        }
        result = run_clients(root, seconds, pids)
        mid_rss = rss_bytes(daemon) / 2**20
        empty_tree(root, pids)
        end = stats()
        result["after"] = {
            "fds": settled_fds(daemon, base["fds"]),
            "zombies": zombie_children(daemon),
            "open_files": end["open_files"],
            "containers": end["containers"],
            "rss_mb_end_of_run": mid_rss,
            "rss_mb": rss_bytes(daemon) / 2**20,
        }
        result["before"] = base
        result["daemon_alive"] = alive(daemon)
    finally:
        for p in pool:
            p.kill()
            p.wait()
    return result


def run(quick: bool = False) -> dict:
    with Containerfs() as target:
        assert target.server_pid is not None
        res = load_run(target.root, target.server_pid, target.stats, 10.0 if quick else 60.0)
    summary = {
        "clients": res["clients"],
        "seconds": res["seconds"],
        "ops_per_s": res["ops_per_s"],
        "unexpected": len(res["unexpected"]),
        "failed_clients": res["failed_clients"],
        "daemon_alive": res["daemon_alive"],
    }
    leaks = {
        "fds": f"{res['before']['fds']} -> {res['after']['fds']}",
        "zombies": len(res["after"]["zombies"]),
        "open_files": res["after"]["open_files"],
        "containers": f"{res['before']['containers']} -> {res['after']['containers']}",
        "rss_mb": f"{res['before']['rss_mb']:.1f} -> {res['after']['rss_mb_end_of_run']:.1f}"
        f" -> {res['after']['rss_mb']:.1f}",
    }
    errors = {
        op: ", ".join(f"{k} {v}" for k, v in sorted(c.items())) for op, c in res["counts"].items()
    }
    return {"load": {"summary": summary, "after": leaks, "results": errors}, "raw": res}
