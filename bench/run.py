"""``make bench``: run every ``bench/*.py`` benchmark, print one table, write results.json.

Each benchmark module has ``run(quick: bool) -> list[dict]`` returning rows
``{"name", "unit", "iotd", "peer_name", "peer", "ratio"}`` (extra fields
welcome).  ``--quick`` runs each for a few seconds (a smoke check);
``--only NAME`` runs one module.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results.json")


def modules(only: str | None) -> list[str]:
    names = sorted(f[:-3] for f in os.listdir(HERE)
                   if f.endswith(".py") and not f.startswith("_") and f != "run.py")
    return [n for n in names if only in (None, n)]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(HERE, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, HERE)
    spec.loader.exec_module(module)
    return module


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def table(rows: list[dict]) -> str:
    head = ["name", "unit", "iotd", "peer", "peer_name", "ratio"]
    lines = [head] + [[r.get("name"), r.get("unit"), fmt(r.get("iotd")), fmt(r.get("peer")),
                       r.get("peer_name") or "-", fmt(r.get("ratio"))] for r in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only")
    parser.add_argument("--json", default=RESULTS)
    args = parser.parse_args()
    rows: list[dict] = []
    failed = []
    started = time.time()
    for name in modules(args.only):
        print(f"== bench/{name}.py {'(quick)' if args.quick else ''}", flush=True)
        try:
            got = load(name).run(args.quick)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        rows.extend(got)
        print(table(got), flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}"
    with open(args.json, "w") as f:
        json.dump(rows, f, indent=1)
    print(f"\nAll benchmarks ({machine}; {time.time() - started:.0f} s{', quick' if args.quick else ''}):")
    print(table(rows))
    print(f"\nwritten to {args.json}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
