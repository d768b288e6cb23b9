"""Kill the daemon in the middle of a workload, again and again, and lose nothing.

Two hierarchies side by side (one with cpuset and numtasks, one named with
none), a random workload of mkdir, rmdir, rename, chmod, settings and task
moves, a process that forks while no daemon runs, and journal compactions
often enough that some are killed half-way. After every restart the whole
tree, every setting and mode, and every membership must equal a model of
what the workload saw succeed, in both directions (nothing missing, nothing
extra). The one operation in flight at the kill may or may not have landed.
"""

from __future__ import annotations

import errno
import json
import os
import random
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from containerfs.state import COMPACT_ENV
from tests.conftest import read_ids, wait_for
from tests.integration.test_persistence import crash, served

#: errno a request gets when the daemon dies under it
DEATH = {errno.ENOTCONN, errno.ECONNABORTED}
ROUNDS = 10
SETTINGS = {"a": ("notify_on_release", "numtasks.max"), "b": ("notify_on_release",)}


@dataclass
class Model:
    """What the workload saw succeed: per hierarchy, path -> {file: value, "mode": m}."""

    dirs: dict[str, dict[str, dict[str, object]]] = field(default_factory=dict)
    #: (hierarchy, pid) -> the path the pid is in
    where: dict[tuple[str, int], str] = field(default_factory=dict)

    def copy(self) -> Model:
        return Model({h: {p: dict(v) for p, v in d.items()} for h, d in self.dirs.items()},
                     dict(self.where))

    def occupied(self, h: str, path: str) -> bool:
        return any(hh == h and (w == path or w.startswith(path + "/"))
                   for (hh, _pid), w in self.where.items())


def snapshot(views: dict[str, Path], pids: list[int]) -> Model:
    """The state the daemon shows, in the model's terms."""
    seen = Model()
    for h, view in views.items():
        tree: dict[str, dict[str, object]] = {}
        for root, dirs, _files in os.walk(view):
            rel = "/" + os.path.relpath(root, view) if root != str(view) else "/"
            if rel == "/":
                dirs.sort()
                continue
            entry: dict[str, object] = {"mode": stat.S_IMODE(os.stat(root).st_mode)}
            for name in SETTINGS[h]:
                entry[name] = Path(root, name).read_text().strip()
            tree[rel] = entry
            for pid in read_ids(Path(root, "cgroup.procs")):
                if pid in pids:
                    seen.where[(h, pid)] = rel
        seen.dirs[h] = tree
    return seen


def test_crash_loop_loses_nothing(cfs, procs, monkeypatch):
    monkeypatch.setenv(COMPACT_ENV, "40")  # the restarted daemons compact often
    views = {"a": cfs.mount("cpuset,numtasks,clone_children"), "b": cfs.mount("none,name=loop")}
    movers = [procs.sleeper().pid for _ in range(3)]
    forker = procs.spawn("sh", "-c", "while read x; do sleep 1000 & done", stdin=subprocess.PIPE,
                         start_new_session=True)
    movers.append(forker.pid)
    model = Model(dirs={"a": {}, "b": {}})
    rng = random.Random(11)
    serial = iter(range(10**6))
    pending: list[Callable[[Model], None]] = []  # the model change of the op in flight
    failures: list[str] = []

    def op() -> tuple[Callable[[], None], Callable[[Model], None]]:
        """One random operation: what it does, and what it changes in the model."""
        h = rng.choice("ab")
        view, dirs = views[h], model.dirs[h]
        paths = sorted(dirs)
        kind = rng.choice(["mkdir", "mkdir", "set", "chmod", "move", "move", "rmdir", "rename"])
        if kind == "mkdir" or not paths:
            parent = rng.choice(["/"] + [p for p in paths if p.count("/") < 3])
            path = f"{parent.rstrip('/')}/c{next(serial)}"
            inherited = dirs.get(parent, {}).get("notify_on_release", "0")
            new = {"mode": 0o755, "notify_on_release": inherited}
            if h == "a":
                new["numtasks.max"] = "max"
            return (lambda: os.mkdir(view / path[1:], 0o755),
                    lambda m: m.dirs[h].__setitem__(path, dict(new)))
        path = rng.choice(paths)
        if kind == "set":
            name = rng.choice(SETTINGS[h])
            # limits stay above what is ever in a container: a fork over one is killed
            value = str(rng.randint(50, 99)) if name == "numtasks.max" else rng.choice("01")
            return (lambda: (view / path[1:] / name).write_text(value),
                    lambda m: m.dirs[h][path].__setitem__(name, value))
        if kind == "chmod":
            mode = rng.choice([0o755, 0o750, 0o700])
            return (lambda: os.chmod(view / path[1:], mode),
                    lambda m: m.dirs[h][path].__setitem__("mode", mode))
        if kind == "move":
            pid = rng.choice(movers)
            return (lambda: (view / path[1:] / "cgroup.procs").write_text(str(pid)),
                    lambda m: m.where.__setitem__((h, pid), path))
        leaf = not any(p.startswith(path + "/") for p in paths)
        if kind == "rmdir" and leaf and not model.occupied(h, path):
            return (lambda: os.rmdir(view / path[1:]), lambda m: m.dirs[h].pop(path))
        if kind == "rename":
            new_path = f"{path.rsplit('/', 1)[0]}/r{next(serial)}"

            def renamed(m: Model) -> None:
                def moved(p: str) -> str:
                    return new_path + p[len(path):] if p == path or p.startswith(path + "/") else p

                m.dirs[h] = {moved(p): v for p, v in m.dirs[h].items()}
                m.where = {k: (moved(w) if k[0] == h else w) for k, w in m.where.items()}

            return (lambda: os.rename(view / path[1:], view / new_path[1:]), renamed)
        return (lambda: None, lambda m: None)

    def workload(stop: threading.Event) -> None:
        while not stop.is_set():
            act, change = op()
            pending.append(change)
            try:
                act()
            except OSError as exc:
                if exc.errno not in DEATH:
                    failures.append(f"{act}: {exc}")
                return
            change(model)
            pending.clear()

    for round_ in range(ROUNDS):
        stop = threading.Event()
        worker = threading.Thread(target=workload, args=(stop,))
        worker.start()
        time.sleep(rng.uniform(0.1, 0.4))
        crash(cfs)
        stop.set()
        worker.join()
        assert not failures, failures
        forker.stdin.write(b"fork\n")  # a fork while no daemon runs
        forker.stdin.flush()
        cfs.start()
        for view in views.values():
            wait_for(lambda v=view: served(v), timeout=10)
        known = sorted({pid for (_h, pid) in model.where} | set(movers))
        wait_for(lambda k=frozenset(known): set(_children(forker.pid)) - k, timeout=10)
        new = sorted(set(_children(forker.pid)) - set(known))
        seen = snapshot(views, known + new)
        candidates = [model] + [_applied(model, change) for change in pending]
        match = next((m for m in candidates if _same(seen, m, known)), None)
        assert match is not None, (round_, _diff(seen, model, known))
        model = match
        pending.clear()
        for h in views:  # forked while down: placed with its parent, in every hierarchy
            for child in new:
                assert seen.where.get((h, child), "/") == model.where.get((h, forker.pid), "/")
                if (h, forker.pid) in model.where:
                    model.where[(h, child)] = model.where[(h, forker.pid)]
    header = json.loads((cfs.rt / "state" / "snapshot").read_text().split("\n", 1)[0])
    assert header["gen"] > ROUNDS  # compactions ran, and some were interrupted


def _children(pid: int) -> list[int]:
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            kids += [int(x) for x in f.read().split()]
    return kids


def _applied(model: Model, change: Callable[[Model], None]) -> Model:
    m = model.copy()
    change(m)
    return m


def _same(seen: Model, model: Model, movers: list[int]) -> bool:
    if seen.dirs != model.dirs:
        return False
    return all(seen.where.get((h, p), "/") == model.where.get((h, p), "/")
               for h in model.dirs for p in movers)


def _diff(seen: Model, model: Model, movers: list[int]) -> dict:
    out = {}
    for h in model.dirs:
        for path in set(seen.dirs[h]) | set(model.dirs[h]):
            if seen.dirs[h].get(path) != model.dirs[h].get(path):
                out[f"{h}:{path}"] = (seen.dirs[h].get(path), model.dirs[h].get(path))
        for p in movers:
            if seen.where.get((h, p), "/") != model.where.get((h, p), "/"):
                out[f"{h}:pid {p}"] = (seen.where.get((h, p)), model.where.get((h, p)))
    return out
