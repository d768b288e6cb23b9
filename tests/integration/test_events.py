"""The lifecycle event stream: `containerfs events [--follow] [--json]`."""

from __future__ import annotations

import errno
import json
import queue
import re
import subprocess
import threading

import trio

from containerfs.events import EventStream
from tests.conftest import CLI, wait_for, write
from tests.integration.test_release import (
    as_user,
    empty_into,
    open_up,
    recorder,
    set_agent,
)


def events(cfs) -> list[dict]:
    return [json.loads(line) for line in cfs.cli("events", "--json").stdout.splitlines()]


def about(evs: list[dict], path: str) -> list[str]:
    return [e["event"] for e in evs if e.get("path") == path]


def test_history_of_a_container_life(cfs, procs):
    view = cfs.mount("none,name=ev")
    (view / "a").mkdir()
    empty_into(view / "a", procs)
    wait_for(lambda: "emptied" in about(events(cfs), "/a"), timeout=10)
    (view / "a").rename(view / "b")
    (view / "b").rmdir()
    evs = events(cfs)
    seqs = [e["seq"] for e in evs]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert about(evs, "/a") == ["created", "populated", "emptied"]
    renamed = [e for e in evs if e["event"] == "renamed"]
    assert [(e["path"], e["old_path"]) for e in renamed] == [("/b", "/a")]
    assert about(evs, "/b") == ["renamed", "removed"]
    hids = {e["hierarchy"] for e in evs if "path" in e}
    assert len(hids) == 1
    assert all(isinstance(e["time"], float) for e in evs)
    # the human form: one line per event, with the container as HIERARCHY:PATH
    text = cfs.cli("events").stdout.splitlines()
    assert len(text) == len(evs)
    (hid,) = hids
    assert re.search(rf" #\d+ removed {hid}:/b$", text[-1])


class Follower:
    """A `containerfs events --follow --json` process and the lines it printed."""

    def __init__(self, cfs) -> None:
        self.proc = subprocess.Popen(
            [*CLI, "--runtime-dir", str(cfs.rt), "events", "--follow", "--json"],
            stdout=subprocess.PIPE,
            text=True,
            env=cfs.env,
        )
        self.lines: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def until(self, pred, timeout: float = 30) -> list[dict]:
        """Events read until one satisfies `pred` (that one included)."""
        seen = []
        while True:
            event = self.lines.get(timeout=timeout)
            seen.append(event)
            if pred(event):
                return seen

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def test_follow_streams_new_events_and_lets_go_of_a_reader(cfs, procs):
    view = cfs.mount("none,name=follow")
    (view / "old").mkdir()
    follower = Follower(cfs)
    try:
        # the history first, then what happens while following
        follower.until(lambda e: e["event"] == "created" and e["path"] == "/old")
        wait_for(lambda: cfs.stats()["events"]["subscribers"] == 1, timeout=10)
        (view / "new").mkdir()
        (created,) = follower.until(lambda e: e.get("path") == "/new")
        assert created["event"] == "created"
        empty_into(view / "new", procs)
        seen = follower.until(lambda e: e["event"] == "emptied" and e["path"] == "/new")
        assert [e["event"] for e in seen] == ["populated", "emptied"]
    finally:
        follower.close()
    # the reader went away: the daemon lets go of it and still serves
    wait_for(lambda: cfs.stats()["events"]["subscribers"] == 0, timeout=10)
    (view / "after").mkdir()
    assert "created" in about(events(cfs), "/after")


def test_agent_and_auto_delete_events_in_order(workdir, cfs, procs):
    view = cfs.mount("none,name=agentev,extended")
    agent, _runs = recorder(workdir)
    set_agent(view, agent)
    (view / "z").mkdir()
    for name in ("cgroup.auto_delete", "notify_on_release"):
        assert write(view / "z" / name, b"1") == 0
    empty_into(view / "z", procs)
    wait_for(lambda: "agent_finished" in about(events(cfs), "/z"), timeout=30)
    evs = [e for e in events(cfs) if e.get("path") == "/z"]
    kinds = [e["event"] for e in evs]
    # the agent starts before the container is removed
    assert kinds == [
        "created",
        "populated",
        "emptied",
        "agent_started",
        "auto_delete",
        "removed",
        "agent_finished",
    ]
    started, finished = evs[3], evs[-1]
    assert started["agent"] == str(agent) and started["pid"] == finished["pid"]
    assert finished["status"] == 0 and finished["timed_out"] is False
    assert finished["duration_ms"] >= 0


def test_kill_events_name_each_process(cfs, procs):
    view = cfs.mount("none,name=killev,extended")
    (view / "k").mkdir()
    victims = [procs.sleeper() for _ in range(3)]
    for p in victims:
        assert write(view / "k" / "cgroup.procs", str(p.pid).encode()) == 0
    assert write(view / "k" / "cgroup.kill", b"1") == 0
    for p in victims:
        p.wait(timeout=10)
    wait_for(lambda: "emptied" in about(events(cfs), "/k"), timeout=10)
    killed = [e["pid"] for e in events(cfs) if e["event"] == "killed"]
    assert sorted(killed) == sorted(p.pid for p in victims)


def test_only_root_reads_the_stream(workdir, cfs):
    open_up(workdir)
    code = (
        "import json, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        's.sendall(b\'{"op": "events", "follow": true}\\n\')\n'
        "print(json.loads(s.makefile().readline()).get('errno'))\n"
    )
    result = as_user(code, str(cfs.rt / "control.sock"))
    assert result.stdout.split() == [str(errno.EPERM)], result.stderr


def test_a_slow_reader_is_dropped_with_an_overflow_event():
    stream = EventStream(history=5, buffer=3)
    sub, history = stream.subscribe()
    assert history == []
    for i in range(10):
        stream.publish("created", note=i)
    assert stream.subscribers == set()  # dropped at the fourth event, never waited on
    assert [e["seq"] for e in stream.recent] == [6, 7, 8, 9, 10]  # a bounded history

    async def drain() -> list[dict]:
        out = []
        while (event := await sub.get()) is not None:
            out.append(event)
        return out

    got = trio.run(drain)
    assert [(e["seq"], e["event"]) for e in got] == [
        (1, "created"),
        (2, "created"),
        (3, "created"),
        (4, "overflow"),
    ]


def test_a_reader_that_keeps_up_gets_everything_once():
    stream = EventStream(buffer=4)

    async def main() -> list[int]:
        sub, _ = stream.subscribe()
        got: list[int] = []

        async def read() -> None:
            while (event := await sub.get()) is not None:
                got.append(event["seq"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            for _ in range(50):
                stream.publish("created")
                await trio.sleep(0)
            await trio.sleep(0.01)
            stream.unsubscribe(sub)
        return got

    assert trio.run(main) == list(range(1, 51))
