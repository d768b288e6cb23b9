"""Run the benchmark: `scripts/bench [--quick] [--out DIR] [--only NAME ...]`.

Runs (in this order, each skippable with --only): `ops` (the client
operations against the floor, the kernel and containerfs), `scale` (10,000
containers, a 10,000-member `tasks`), `daemon` (RSS and CPU at idle and under
a fork storm), `load` (8 concurrent clients), then whichever of the helper
modules bench.subsystems and bench.release exist. Prints the tables, the
ratios and the targets met or missed; writes DIR/results.json and
DIR/latency.png.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import core, load

EXTRAS = ("subsystems", "release")
OWN: dict[str, Callable[[bool], dict]] = {
    "ops": core.run_ops,
    "scale": core.run_scale,
    "daemon": core.run_daemon_cost,
    "load": load.run,
}

# targets of the issue
WITHIN_FLOOR = 1.2
FORK_P99_MS = 10.0
RSS_LIMIT_MB = 100.0
IDLE_CPU_PERCENT = 0.5
FLAT = 1.2


def machine() -> dict:
    model = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def fmt(us: float | None) -> str:
    if us is None:
        return "-"
    return f"{us:.0f}us" if us < 10_000 else f"{us / 1000:.1f}ms"


def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
    if not a or not b or key not in a or key not in b or not b[key]:
        return None
    return a[key] / b[key]


def fr(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def print_ops(ops: dict) -> None:
    targets = [t for t in ("floor", "kernel", "containerfs") if t in ops]
    head = f"{'operation':<14}" + "".join(f"{t + ' med/p99':>22}" for t in targets)
    head += f"{'cfs/floor med,p99':>20}{'cfs/kernel med,p99':>21}"
    print(head)
    for op in core.OPS:
        row = f"{op:<14}"
        for t in targets:
            s = ops[t].get(op)
            cell = f"{fmt(s['median_us'])} / {fmt(s['p99_us'])}" if s and s.get("n") else "n/a"
            row += f"{cell:>22}"
        cfs = ops.get("containerfs", {}).get(op)
        for ref in ("floor", "kernel"):
            other = ops.get(ref, {}).get(op)
            cell = f"{fr(ratio(cfs, other, 'median_us'))}, {fr(ratio(cfs, other, 'p99_us'))}"
            row += f"{cell:>20}" if ref == "floor" else f"{cell:>21}"
        print(row)


def print_scale(scale: dict) -> None:
    for name, res in scale.items():
        print(f"  {name}:")
        for key, s in res.items():
            if "median_us" in s:
                print(f"    {key:<34} median {fmt(s['median_us']):>8}  p99 {fmt(s['p99_us']):>8}")
            else:
                text = ", ".join(
                    f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()
                )
                print(f"    {key:<34} {text}")


def targets(results: dict) -> list[dict]:
    """Each target of the issue with its measured value and met or not."""
    out = []
    ops = results.get("ops", {}).get("ops", {})
    cfs, floor = ops.get("containerfs", {}), ops.get("floor", {})
    for op in core.OPS:
        r = ratio(cfs.get(op), floor.get(op), "median_us")
        if r is not None:
            out.append(
                {
                    "target": f"{op}: median within {WITHIN_FLOOR}x of the floor",
                    "value": f"{r:.2f}x",
                    "met": r <= WITHIN_FLOOR,
                }
            )
    fv = cfs.get("fork visible")
    if fv and fv.get("n"):
        out.append(
            {
                "target": f"fork to visible membership p99 under {FORK_P99_MS:.0f} ms",
                "value": f"{fv['p99_us'] / 1000:.2f} ms",
                "met": fv["p99_us"] / 1000 < FORK_P99_MS,
            }
        )
    scale = results.get("scale", {}).get("scale", {}).get("containerfs", {})
    mem = scale.get("memory")
    if mem:
        out.append(
            {
                "target": f"{mem['containers']} containers, {mem['tasks_spread']} tasks spread: "
                f"RSS under {RSS_LIMIT_MB:.0f} MB",
                "value": f"{mem['rss_mb']:.1f} MB",
                "met": mem["rss_mb"] < RSS_LIMIT_MB,
            }
        )
    for what in ("mkdir", "lookup"):
        small = scale.get(f"{what} @10")
        large = next((v for k, v in scale.items() if k.startswith(f"{what} @1000")), None)
        r = ratio(large, small, "median_us")
        if r is not None:
            out.append(
                {
                    "target": f"{what} cost flat from 10 to 10,000 containers "
                    f"(median ratio <= {FLAT})",
                    "value": f"{r:.2f}x",
                    "met": r <= FLAT,
                }
            )
    for name in EXTRAS:  # a helper module may state targets of its own issue
        out += results.get(name, {}).get("targets", [])
    idle = results.get("daemon", {}).get("daemon", {}).get("idle")
    if idle:
        out.append(
            {
                "target": f"idle daemon CPU under {IDLE_CPU_PERCENT}% of a core "
                f"({idle['tracked_tasks']} tracked tasks)",
                "value": f"{idle['cpu_percent']:.3f}%",
                "met": idle["cpu_percent"] < IDLE_CPU_PERCENT,
            }
        )
    return out


def print_rows(rows: list) -> None:
    for row in rows:
        if isinstance(row, dict):
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
        elif isinstance(row, list | tuple):
            print(f"  {row[0]!s:<40}" + "  ".join(str(cell) for cell in row[1:]))
        else:
            print(f"  {row}")


def run_extra(name: str, quick: bool) -> dict | None:
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"bench.{name}":
            raise
        print(f"\n[{name}] skipped: bench/{name}.py is not there yet")
        return None
    return module.run(quick=quick)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples, shorter runs")
    parser.add_argument("--out", default="bench-results", help="where results go")
    parser.add_argument(
        "--only",
        action="append",
        choices=[*OWN, *EXTRAS],
        help="run only this part (repeatable)",
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("scripts/bench: must run as root (FUSE mounts, cgroup v1 mounts)", file=sys.stderr)
        return 1
    wanted = args.only or [*OWN, *EXTRAS]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"machine": machine(), "quick": args.quick}
    m = results["machine"]
    print(f"containerfs bench on {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, {m['date']}")
    failed = False
    for name in wanted:
        print(f"\n[{name}] running{' (quick)' if args.quick else ''} ...", flush=True)
        try:
            res = OWN[name](args.quick) if name in OWN else run_extra(name, args.quick)
        except Exception:
            traceback.print_exc()
            failed = True
            continue
        if res is None:
            continue
        results[name] = res
        for note in res.get("notes", []):
            print(f"  note: {note}")
        if name == "ops":
            print_ops(res["ops"])
        elif name == "scale":
            print_scale(res["scale"])
        elif name in ("daemon", "load"):
            print_scale({name: res[name]})
        if res.get("table"):
            print_rows(res["table"])
    results["targets"] = targets(results)
    if results["targets"]:
        print("\ntargets:")
        for t in results["targets"]:
            print(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']}")
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(f"\nresults: {out / 'results.json'}")
    if "ops" in results:
        from bench import chart

        png = out / "latency.png"
        chart.draw(results, png)
        print(f"chart:   {png}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
