"""Nothing is lost: a journal of every change, compacted into snapshots.

Every change the registry reports is appended to RUNTIME/state/journal as
one JSON line, written with a single write(2) so a killed daemon loses
nothing the kernel accepted. The cost of persisting a change follows the
size of the change. When the journal has grown past the size of the state,
the whole state is written to a new snapshot and the journal starts again,
so replay stays short and the work stays amortized.

Records are idempotent ("this container exists with these settings", "this
task is here"), and snapshot and journal carry a generation number: a
journal from before the last snapshot is ignored, so a crash at any point of
a compaction replays correctly.

A task is identified by (tid, start time); a restart places the tasks it
knows where they were and the ones forked while it was down by their
ancestry, as the kernel would have.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from containerfs.core.container import Attrs, Container
from containerfs.core.files import Caller
from containerfs.core.hierarchy import Hierarchy
from containerfs.core.options import MountOptions
from containerfs.core.registry import Listener, Registry
from containerfs.core.task import Task
from containerfs.errors import CgroupError
from containerfs.tracking import procscan

log = logging.getLogger(__name__)

ROOT = Caller(0, 0, 0)
MIN_COMPACT = 10_000
#: one record per line; ids as keys become strings, as JSON has it
_LINE = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS
#: Tests only: compact after this many records, so a crash loop kills compactions too.
COMPACT_ENV = "CONTAINERFS_COMPACT_EVERY"

# ---------------------------------------------------------------- records


def hierarchy_record(h: Hierarchy) -> dict[str, Any]:
    return {
        "op": "h",
        "id": h.id,
        "name": h.name,
        "subsys": h.subsystem_names,
        "noprefix": h.noprefix,
        "extended": h.extended,
        "enabled": h.enabled,
        "views": {view: list(spec) for view, spec in sorted(h.views.items())},
    }


def _attrs(a: Attrs) -> list[int]:
    return [a.mode, a.uid, a.gid, a.mtime_ns]


def container_record(c: Container) -> dict[str, Any]:
    """A container's place, owner, mode and every persisted setting."""
    files = {}
    for name, cf in c.hierarchy.files(c).items():
        if cf.read and cf.write and cf.persist:
            try:
                files[name] = (cf.save or cf.read)(c)
            except CgroupError:
                continue
    return {
        "op": "c",
        "h": c.hierarchy.id,
        "path": c.path,
        "attrs": _attrs(c.attrs),
        "creator": list(c.creator),
        "file_attrs": {n: _attrs(a) for n, a in c.file_attrs.items()},
        "files": files,
    }


def task_record(task: Task) -> dict[str, Any]:
    return {
        "op": "t",
        "tid": task.tid,
        "st": task.start_time,
        "cg": {str(hid): c.path for hid, c in task.cgroups.items() if not c.is_root},
    }


def subsystem_record(subsys) -> dict[str, Any]:
    return {"op": "s", "name": subsys.name, "data": subsys.saved()}


# ------------------------------------------------------------------ model


@dataclass
class SavedState:
    """The state as read back from disk, before it is applied."""

    gen: int = 0
    hierarchies: dict[int, dict] = field(default_factory=dict)
    #: (hierarchy id, path) -> container record, in creation order
    containers: dict[tuple[int, str], dict] = field(default_factory=dict)
    #: tid -> (start time, {hierarchy id: path})
    tasks: dict[int, tuple[int | None, dict[int, str]]] = field(default_factory=dict)
    last_hid: int = 0
    #: subsystem name -> what its saved() returned
    subsystems: dict[str, Any] = field(default_factory=dict)

    def apply(self, rec: dict) -> None:
        op = rec["op"]
        if op == "h":
            self.hierarchies[rec["id"]] = rec
            self.last_hid = max(self.last_hid, rec["id"])
        elif op == "h-":
            self.hierarchies.pop(rec["id"], None)
            for key in [k for k in self.containers if k[0] == rec["id"]]:
                del self.containers[key]
            for _st, cg in self.tasks.values():
                cg.pop(rec["id"], None)
        elif op == "c":
            self.containers[(rec["h"], rec["path"])] = rec
        elif op == "c-":
            self.containers.pop((rec["h"], rec["path"]), None)
        elif op == "mv":
            self._rename(rec["h"], rec["old"], rec["new"])
        elif op == "t":
            self.tasks[rec["tid"]] = (rec["st"], {int(k): v for k, v in rec["cg"].items()})
        elif op == "m":
            for tid, st in rec["tasks"]:
                _old_st, cg = self.tasks.get(tid, (st, {}))
                if rec["path"] == "/":
                    cg.pop(rec["h"], None)
                else:
                    cg[rec["h"]] = rec["path"]
                self.tasks[tid] = (st, cg)
        elif op == "x":
            self.tasks.pop(rec["tid"], None)
        elif op == "s":
            self.subsystems[rec["name"]] = rec["data"]
        elif op == "si":
            items = self.subsystems[rec["name"]] = self.subsystems.get(rec["name"]) or {}
            if rec["value"] is None:
                items.pop(rec["key"], None)
            else:
                items[rec["key"]] = rec["value"]

    def _rename(self, hid: int, old: str, new: str) -> None:
        def moved(path: str) -> str | None:
            if path == old or path.startswith(old + "/"):
                return new + path[len(old):]
            return None

        renamed = {}
        for key in list(self.containers):
            if key[0] == hid and (target := moved(key[1])) is not None:
                rec = dict(self.containers.pop(key), path=target)
                renamed[(hid, target)] = rec
        self.containers.update(renamed)
        for _st, cg in self.tasks.values():
            if hid in cg and (target := moved(cg[hid])) is not None:
                cg[hid] = target
        prefix = f"{hid}:"  # subsystem items keyed by Container.key move along

        def moved_key(key: str) -> str:
            if key.startswith(prefix) and (target := moved(key[len(prefix):])) is not None:
                return prefix + target
            return key

        for name, items in list(self.subsystems.items()):
            if isinstance(items, dict):
                self.subsystems[name] = {moved_key(k): v for k, v in items.items()}


def _read_lines(path: Path) -> Iterator[dict]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    for line in data.split(b"\n"):
        if not line:
            continue
        try:
            yield orjson.loads(line)
        except orjson.JSONDecodeError:
            log.warning("ignoring a torn journal line in %s", path)


def load(state_dir: Path) -> SavedState:
    """Read the snapshot, then the journal of the same generation."""
    saved = SavedState()
    snapshot = state_dir / "snapshot"
    lines = iter(_read_lines(snapshot))
    header = next(lines, None)
    if header is not None:
        saved.gen = header.get("gen", 0)
        for rec in lines:
            saved.apply(rec)
    journal = iter(_read_lines(state_dir / "journal"))
    jheader = next(journal, None)
    if jheader is not None and jheader.get("gen") == saved.gen:
        for rec in journal:
            saved.apply(rec)
    return saved


# ---------------------------------------------------------------- restore


Placements = dict[tuple[int, int | None], dict[int, Container]]


def restore(registry: Registry, saved: SavedState) -> Placements:
    """Rebuild hierarchies and containers; return saved task placements to apply.

    Settings are written back through the files' own write functions, root
    first and parents before children, so a subsystem validates and enforces
    them as if a person had written them.
    """
    registry._last_hid = max(registry._last_hid, saved.last_hid)
    for hid, rec in sorted(saved.hierarchies.items()):
        subsys = [s for s in rec["subsys"] if s in registry.subsystems]
        opts = MountOptions(
            subsystems=frozenset(subsys), none=not subsys, name=rec["name"],
            noprefix=rec["noprefix"], extended=rec["extended"],
        )
        h = registry.create_hierarchy(opts, frozenset(subsys), hid=hid)
        h.enabled.update({k: v for k, v in rec.get("enabled", {}).items() if k in h.enabled})
        h.views = {view: (sub, bool(ro)) for view, (sub, ro) in rec.get("views", {}).items()}
    for name, data in saved.subsystems.items():
        if name in registry.subsystems and data is not None:
            registry.subsystems[name].restore_saved(data)
    for (hid, path), rec in sorted(saved.containers.items(), key=lambda kv: kv[0][1].count("/")):
        h = registry.hierarchies.get(hid)
        if h is None:
            continue
        c = _restore_container(registry, h, path, rec)
        if c is not None:
            _restore_settings(c, rec)
    placements: Placements = {}
    for tid, (st, cg) in saved.tasks.items():
        where = {}
        for hid, path in cg.items():
            c = _find(registry, hid, path)
            if c is not None:
                where[hid] = c
        placements[(tid, st)] = where
    return placements


def _find(registry: Registry, hid: int, path: str) -> Container | None:
    h = registry.hierarchies.get(hid)
    return h.find(path) if h is not None else None


def _restore_container(registry: Registry, h: Hierarchy, path: str, rec: dict) -> Container | None:
    if path == "/":
        c = h.root
    else:
        parent_path, _, name = path.rpartition("/")
        parent = _find(registry, h.id, parent_path or "/")
        if parent is None:
            log.warning("cannot restore %d:%s: its parent is missing", h.id, path)
            return None
        uid, gid = rec["creator"]
        try:
            c = registry.mkdir(parent, name, uid=uid, gid=gid, mode=rec["attrs"][0])
        except CgroupError as exc:
            log.warning("cannot restore %d:%s: %s", h.id, path, exc)
            return None
    mode, uid, gid, mtime = rec["attrs"]
    c.attrs.mode, c.attrs.uid, c.attrs.gid, c.attrs.mtime_ns = mode, uid, gid, mtime
    for name, (fmode, fuid, fgid, fmtime) in rec.get("file_attrs", {}).items():
        c.file_attrs[name] = Attrs(fmode, fuid, fgid, fmtime, fmtime, fmtime)
    return c


def _restore_settings(c: Container, rec: dict) -> None:
    table = c.hierarchy.files(c)
    for name, value in rec.get("files", {}).items():
        cf = table.get(name)
        if cf is None or cf.write is None or cf.read is None:
            continue
        if cf.read(c) == value:
            continue
        try:
            cf.write(c, os.fsencode(value), ROOT)
        except CgroupError as exc:
            log.warning("cannot restore %d:%s/%s = %r: %s", c.hierarchy.id, c.path, name,
                        value, exc)


# ---------------------------------------------------------------- journal


class Journal(Listener):
    """Appends each change to the journal; compacts into a snapshot when it grows."""

    def __init__(self, registry: Registry, state_dir: Path) -> None:
        self.registry = registry
        self.dir = state_dir
        self.gen = 0
        self.records = 0
        self.fd = -1
        self.writes = 0
        every = os.environ.get(COMPACT_ENV)
        self.compact_every = int(every) if every else None

    # -------------------------------------------------------------- writing

    def _append(self, rec: dict) -> None:
        os.write(self.fd, orjson.dumps(rec, option=_LINE))
        self.records += 1
        self.writes += 1
        if self.records > (self.compact_every or max(MIN_COMPACT, 2 * self._size())):
            self.compact()

    def _size(self) -> int:
        return len(self.registry.tasks) + len(self.registry.containers)

    def compact(self) -> None:
        """Write the whole state as a new snapshot, then start a new journal."""
        gen = self.gen + 1
        lines = [{"gen": gen}]
        lines += [hierarchy_record(h) for h in self.registry.hierarchies.values()]
        lines += [subsystem_record(s) for s in self.registry.subsystems.values()
                  if s.saved() is not None]
        for h in self.registry.hierarchies.values():
            lines += [container_record(c) for c in h.root.walk()]
        for task in self.registry.tasks.values():
            self._know_start(task)
            lines.append(task_record(task))
        tmp = self.dir / "snapshot.new"
        with open(tmp, "wb") as f:
            f.write(b"".join(orjson.dumps(r, option=_LINE) for r in lines))
        os.replace(tmp, self.dir / "snapshot")
        fd = os.open(self.dir / "journal.new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
                     0o600)
        os.write(fd, orjson.dumps({"gen": gen}, option=_LINE))
        os.replace(self.dir / "journal.new", self.dir / "journal")
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd
        self.gen = gen
        self.records = 0

    def open(self, gen: int) -> None:
        """Start journaling after a restore: a fresh snapshot of what was rebuilt."""
        self.gen = gen
        self.compact()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @staticmethod
    def _know_start(task: Task) -> None:
        if task.start_time is None:
            info = procscan.read_task(task.tid)
            if info is not None:
                task.start_time = info.start_time

    # ----------------------------------------------------------- listeners

    def hierarchy_created(self, h: Hierarchy) -> None:
        self._append(hierarchy_record(h))
        self._append(container_record(h.root))

    def hierarchy_changed(self, h: Hierarchy) -> None:
        self._append(hierarchy_record(h))

    def hierarchy_destroyed(self, h: Hierarchy) -> None:
        self._append({"op": "h-", "id": h.id})

    def container_created(self, c: Container) -> None:
        self._append(container_record(c))

    def container_changed(self, c: Container) -> None:
        self._append(container_record(c))
        if c.is_root:
            self._append(hierarchy_record(c.hierarchy))

    def container_removed(self, c: Container) -> None:
        self._append({"op": "c-", "h": c.hierarchy.id, "path": c.path})

    def container_renamed(self, c: Container, old_path: str) -> None:
        self._append({"op": "mv", "h": c.hierarchy.id, "old": old_path, "new": c.path})

    def tasks_moved(self, dst: Container, tasks) -> None:
        for task in tasks:
            self._know_start(task)
        self._append({"op": "m", "h": dst.hierarchy.id, "path": dst.path,
                      "tasks": [[t.tid, t.start_time] for t in tasks]})

    def task_added(self, task: Task) -> None:
        self._know_start(task)
        if task.start_time is not None:  # gone already: nothing to remember
            self._append(task_record(task))

    def task_removed(self, task: Task) -> None:
        self._append({"op": "x", "tid": task.tid})

    def subsystem_changed(self, subsys, key: str | None) -> None:
        if key is None:
            self._append(subsystem_record(subsys))
        else:
            self._append({"op": "si", "name": subsys.name, "key": key,
                          "value": subsys.saved_item(key)})


def remove_state(state_dir: Path) -> None:
    """Forget everything (after a clean stop with nothing left to keep)."""
    for name in ("snapshot", "journal", "snapshot.new", "journal.new"):
        with contextlib.suppress(FileNotFoundError):
            (state_dir / name).unlink()
