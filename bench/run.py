"""``make bench``: run the ``bench/*.py`` benchmarks, print one table and the targets, write results.json.

Each benchmark module has ``run(quick: bool) -> list[dict]`` returning rows
``{"name", "unit", "iotd", "peer_name", "peer", "ratio", ...}`` (extra fields
welcome: ``spread``, ``machine``, ``date``, ``targets`` -- a list of
``"what >= bound: pass|FAIL (value)"`` strings, printed at the end).
``--quick`` runs each for a few seconds (a smoke check, under 4 minutes in
all); ``--only NAME`` runs one module and merges its rows into results.json.

To add a benchmark: put ``bench/NAME.py`` with its ``run(quick)`` next to the
others and add ``"NAME"`` to :data:`MODULES` (a module not listed still runs,
after the listed ones).  ``bench/readme.py`` then renders results.json into
the README's table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results.json")
MODULES = (
    "relay",
    "fanout",
    "push",
    "history",
    "cluster",
    "mqtt",
)
NOT_BENCHES = {"run", "readme"}


def modules(only: str | None) -> list[str]:
    present = {f[:-3] for f in os.listdir(HERE)
               if f.endswith(".py") and not f.startswith("_") and f[:-3] not in NOT_BENCHES}
    names = [n for n in MODULES if n in present] + sorted(present - set(MODULES))
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
    head = ["name", "unit", "iotd", "peer", "peer_name", "ratio", "spread"]
    lines = [head] + [[r.get("name"), r.get("unit"), fmt(r.get("iotd")), fmt(r.get("peer")),
                       r.get("peer_name") or "-", fmt(r.get("ratio")), r.get("spread") or "-"] for r in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def targets(rows: list[dict]) -> list[str]:
    return [f"{r['name']}: {t}" for r in rows for t in r.get("targets", ())]


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
        t0 = time.time()
        try:
            got = load(name).run(args.quick)
        except Exception:
            traceback.print_exc()
            failed.append(name)
            continue
        for row in got:
            row.setdefault("quick", args.quick)
        rows.extend(got)
        print(table(got), flush=True)
        print(f"({time.time() - t0:.0f} s)", flush=True)
    sys.path.insert(0, HERE)
    from _common import machine, merge_results, today

    if args.only:  # one module: its rows replace those of the same name, the others stay
        merge_results(args.json, rows)
    else:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
    print(f"\nAll benchmarks ({machine()}, {today()}; {time.time() - started:.0f} s{', quick' if args.quick else ''}):")
    print(table(rows))
    print("\nTargets:")
    for line in targets(rows):
        print("  " + line)
    print(f"\nwritten to {args.json}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
