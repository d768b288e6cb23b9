"""The containerfs command: mount helper, daemon control and query tools.

As a mount helper it follows the mount.fuse3 convention: mount(8) runs
`containerfs SOURCE DIR -o OPTIONS`, which starts the daemon if none runs,
asks it for the hierarchy, binds the hierarchy's directory on DIR and returns
once DIR is live.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

from containerfs import control, mounts
from containerfs.control import ControlError
from containerfs.runtime import Runtime, resolve
from containerfs.tracking import procscan

COMMANDS = ("daemon", "stop", "stats", "hierarchies", "membership", "events")
#: the commands' options that take a separate value, which is not a positional
VALUE_OPTIONS = ("--tracker", "--max-agents", "--agent-timeout")
START_TIMEOUT = 15.0


def fail(message: str, code: int = 1) -> int:
    print(f"containerfs: {message}", file=sys.stderr)
    return code


# ------------------------------------------------------------------ daemon


def ping(rt: Runtime) -> dict | None:
    try:
        return control.request(rt.socket, {"op": "ping"}, timeout=5.0)
    except (OSError, ControlError):
        return None


def ensure_daemon(rt: Runtime, options: list[str] | None = None) -> None:
    """Start a daemon for `rt` (with daemon `options`) unless one answers, and wait for it."""
    if ping(rt) is not None:
        return
    rt.create()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "containerfs", "--runtime-dir", str(rt.path), "daemon", "-f"),
            *(options or ()),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd="/",
    )
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if ping(rt) is not None:
            return
        if proc.poll() is not None and ping(rt) is None:
            # another helper may have won the race to start it; give that one a moment
            time.sleep(0.2)
            if ping(rt) is not None:
                return
            raise RuntimeError(f"the daemon exited with status {proc.returncode}; see {rt.log}")
        time.sleep(0.02)
    raise RuntimeError(f"the daemon did not answer within {START_TIMEOUT:.0f} s; see {rt.log}")


def cmd_daemon(rt: Runtime, args: argparse.Namespace) -> int:
    from containerfs import daemon
    from containerfs.logs import setup_logging
    from containerfs.release import DEFAULT_AGENT_TIMEOUT, DEFAULT_MAX_AGENTS

    max_agents = args.max_agents or DEFAULT_MAX_AGENTS
    agent_timeout = args.agent_timeout or DEFAULT_AGENT_TIMEOUT
    if not args.foreground:
        # the background daemon is this same command with -f: it gets every option
        options = [
            *("--tracker", args.tracker),
            *("--max-agents", str(max_agents), "--agent-timeout", str(agent_timeout)),
            *(("-d",) if args.debug else ()),
        ]
        try:
            ensure_daemon(rt, options)
        except RuntimeError as exc:
            return fail(str(exc))
        return 0
    rt.create()
    setup_logging(rt.log, debug=args.debug, to_stderr=True)
    try:
        daemon.run(
            rt,
            tracker_mode=args.tracker,
            debug=args.debug,
            max_agents=max_agents,
            agent_timeout=agent_timeout,
        )
    except daemon.DaemonError as exc:
        return fail(str(exc))
    return 0


def cmd_stop(rt: Runtime, args: argparse.Namespace) -> int:
    info = ping(rt)
    if info is None:
        return fail(f"no daemon answers at {rt.socket}")
    control.request(rt.socket, {"op": "stop"})
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        task = procscan.read_task(info["pid"])  # None once gone, or a zombie
        if task is None:
            return 0
        time.sleep(0.02)
    return fail(f"daemon {info['pid']} did not stop")


def cmd_stats(rt: Runtime, args: argparse.Namespace) -> int:
    stats = control.request(rt.socket, {"op": "stats"})
    stats.pop("ok", None)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    tracker = stats.pop("tracker")
    rows = [
        ("daemon pid", stats.pop("pid")),
        ("hierarchies", stats.pop("hierarchies")),
        ("containers", stats.pop("containers")),
        ("open files", stats.pop("open_files")),
        ("tracker mode", tracker.pop("mode")),
        *((f"tracker {key}", value) for key, value in tracker.items()),
    ]
    # the other sections (release agents, events) are flat dicts too: name them by section
    for section, values in stats.items():
        if isinstance(values, dict):
            rows += [(f"{section} {key}", value) for key, value in values.items()]
        else:
            rows.append((section, values))
    for label, value in rows:
        # a label longer than the column still gets its space before the value
        print(f"{label:<17} {value}")
    return 0


def cmd_hierarchies(rt: Runtime, args: argparse.Namespace) -> int:
    """/proc/cgroups' format for containerfs's subsystems (the seeds' /proc/containers)."""
    reply = control.request(rt.socket, {"op": "hierarchies"})
    print(
        json.dumps(reply["rows"], indent=2) if args.json else reply["text"],
        end="\n" if args.json else "",
    )
    return 0


def cmd_membership(rt: Runtime, args: argparse.Namespace) -> int:
    """/proc/PID/cgroup's format for containerfs's hierarchies (the seeds' /proc/PID/container)."""
    reply = control.request(rt.socket, {"op": "membership", "pid": args.pid})
    print(
        json.dumps(reply["rows"], indent=2) if args.json else reply["text"],
        end="\n" if args.json else "",
    )
    return 0


def cmd_events(rt: Runtime, args: argparse.Namespace) -> int:
    """The daemon's event stream: its recent history, then with --follow every new event."""
    from containerfs.events import format_event

    try:
        for event in control.stream(rt.socket, {"op": "events", "follow": args.follow}):
            print(json.dumps(event) if args.json else format_event(event), flush=True)
    except (KeyboardInterrupt, BrokenPipeError):
        return 0
    return 0


def _positive(kind: type) -> Callable[[str], float]:
    def parse(text: str) -> float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} is not positive")
        return value

    return parse


# ------------------------------------------------------------------- mount


def mount_helper(rt: Runtime, argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="containerfs",
        usage="containerfs SOURCE MOUNTPOINT [-o OPTIONS]",
        description="Mount a view of a containerfs hierarchy on MOUNTPOINT.",
    )
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("-o", dest="options", action="append", default=[])
    # mount(8) may pass these; they mean nothing here
    parser.add_argument("-n", "-s", "-v", dest="ignored", action="count", default=0)
    args = parser.parse_args(argv)
    items = [item for text in args.options for item in text.split(",") if item]
    target = os.path.abspath(args.mountpoint)
    if not os.path.isdir(target):
        return fail(f"mount point {target} is not a directory", 32)
    if "remount" in items:
        try:
            control.request(rt.socket, {"op": "remount", "options": items, "target": target})
        except (ControlError, OSError) as exc:
            return fail(f"remount {target}: {getattr(exc, 'message', exc)}", 32)
        return 0
    try:
        ensure_daemon(rt)
        reply = control.request(rt.socket, {"op": "mount", "options": items, "target": target})
    except ControlError as exc:
        return fail(f"mount {target}: {exc.message}", 32)
    except (OSError, RuntimeError) as exc:
        return fail(f"mount {target}: {exc}", 32)
    try:
        mounts.bind(reply["path"], target, read_only=reply["read_only"])
    except OSError as exc:
        if reply["created"]:
            control.request(rt.socket, {"op": "abandon", "hierarchy": reply["hierarchy"]})
        return fail(f"mount {target}: {exc}", 32)
    control.request(rt.socket, {"op": "view", "hierarchy": reply["hierarchy"], "target": target})
    return 0


# -------------------------------------------------------------------- main


def take_runtime_dir(argv: list[str]) -> tuple[str | None, list[str]]:
    """Remove `--runtime-dir DIR` (or `=DIR`) from anywhere in argv; return (DIR, the rest).

    It is taken out before anything else so that it may come before or after a
    command, and so that its value is never mistaken for the helper's SOURCE
    or MOUNTPOINT. A trailing `--runtime-dir` with no value is left for the
    parser to refuse.
    """
    runtime_dir = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--runtime-dir" and i + 1 < len(argv):
            runtime_dir = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--runtime-dir="):
            runtime_dir = arg.split("=", 1)[1]
        else:
            rest.append(arg)
        i += 1
    return runtime_dir, rest


def helper_shaped(argv: list[str]) -> bool:
    """Whether argv reads as the mount helper's `SOURCE MOUNTPOINT -o OPTIONS`.

    mount(8) passes SOURCE verbatim, and it is free text that may be a
    command's name (`mount -t fuse.containerfs events /mnt/x`). So two
    positionals with -o, or two whose second is a directory, are a mount
    whatever the first one says.
    """
    positionals: list[str] = []
    has_options = False
    args = iter(argv)
    for arg in args:
        if arg == "-o":
            has_options = True
            next(args, None)  # the options themselves, not a positional
        elif arg in VALUE_OPTIONS:
            next(args, None)
        elif arg.startswith("-o"):
            has_options = True
        elif not arg.startswith("-"):
            positionals.append(arg)
    return len(positionals) == 2 and (has_options or os.path.isdir(positionals[1]))


def main(argv: list[str] | None = None) -> int:
    runtime_dir, argv = take_runtime_dir(list(sys.argv[1:] if argv is None else argv))
    rt = resolve(runtime_dir)
    if helper_shaped(argv) or (
        argv and argv[0] not in (*COMMANDS, "-h", "--help") and len(argv) >= 2
    ):
        return mount_helper(rt, argv)

    parser = argparse.ArgumentParser(
        prog="containerfs",
        description="Generic process containers (cgroup v1) in userspace. "
        "Mount with: containerfs SOURCE MOUNTPOINT -o OPTIONS",
    )
    parser.add_argument(
        "--runtime-dir", help="the daemon's runtime directory (before or after the command)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("daemon", help="run the daemon")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    p.add_argument("-d", "--debug", action="store_true", help="debug logging (and FUSE debug)")
    p.add_argument(
        "--tracker",
        choices=("auto", "netlink", "scan"),
        default="auto",
        help="how tasks are followed (default: netlink where allowed)",
    )
    # defaults live in containerfs.release, imported only by the daemon (it pulls in trio)
    p.add_argument(
        "--max-agents",
        type=_positive(int),
        metavar="N",
        help="release agents running at once; the others wait their turn (default 8)",
    )
    p.add_argument(
        "--agent-timeout",
        type=_positive(float),
        metavar="SECONDS",
        help="kill a release agent's process group after this long (default 30)",
    )
    sub.add_parser("stop", help="stop the daemon")
    p = sub.add_parser("stats", help="tracker mode and counters")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("hierarchies", help="subsystems and their hierarchies, as /proc/cgroups")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("membership", help="a task's containers, as /proc/PID/cgroup")
    p.add_argument("pid", type=int)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("events", help="lifecycle events: recent ones, or --follow new ones")
    p.add_argument("--follow", "-F", action="store_true", help="keep printing new events")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args(argv)
    try:
        commands = {
            "daemon": cmd_daemon,
            "stop": cmd_stop,
            "stats": cmd_stats,
            "hierarchies": cmd_hierarchies,
            "membership": cmd_membership,
            "events": cmd_events,
        }
        return commands[args.command](rt, args)
    except ControlError as exc:
        return fail(exc.message)
    except ConnectionError as exc:
        return fail(f"{exc}")
    except FileNotFoundError:
        return fail(f"no daemon answers at {rt.socket}")
