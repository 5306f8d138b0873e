"""What a sweep saves: one Hydra multirun against separate full runs.

    python -m bench.sweep_cost                       # palettize.n_bits=2,3,4,6
    python -m bench.sweep_cost --values 4,6 --key palettize.group_size

Measures, on the default recipe and one after the other on this machine:
1. `python -m coreml_pipeline.tools.sweep -m <key>=<values>`: wall time, and per point the
   stages that really ran (everything else was restored from the run-cache);
2. the same points as separate full runs: `dvc exp run --temp --force`, which
   recomputes every stage and restores nothing.
Writes bench/results/sweep_cost.{json,md} and the table between the sweep_cost markers in docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from bench.recipes import update_readme
from coreml_pipeline.tools import experiments

RESULTS = experiments.ROOT / "bench" / "results"


def run_sweep(key: str, values: list[str], sweep_dir: Path) -> dict:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "coreml_pipeline.tools.sweep", "-m", f"hydra.sweep.dir={sweep_dir}",
                    "sweep.name_prefix=cost", f"{key}={','.join(values)}"], cwd=experiments.ROOT, check=True,
                   capture_output=True, text=True)
    seconds = time.perf_counter() - start
    points = {}
    for path in sweep_dir.glob("*/result.json"):
        result = json.loads(path.read_text())
        value = next(o.split("=", 1)[1] for o in result["overrides"] if o.startswith(f"{key}="))
        points[value] = {"seconds": result["seconds"], "stages_run": result["stages_run"],
                         "package_bytes": result["metrics"]["package_bytes"]}
    return {"seconds": round(seconds, 1), "points": points}


def run_separately(key: str, values: list[str]) -> dict:
    points = {}
    for value in values:
        name = f"full-{key.replace('.', '-')}-{value}"
        row = experiments.run_experiment(name, [f"{key}={value}"], extra_args=["--force"])
        points[value] = {"seconds": row["seconds"], "stages_run": row["stages_run"],
                         "package_bytes": row["metrics"]["package_bytes"]}
        experiments.dvc("exp", "remove", name, check=False)  # the sweep's experiment holds the same result
    return {"seconds": round(sum(p["seconds"] for p in points.values()), 1), "points": points}


def markdown(result: dict) -> str:
    key, sweep, separate = result["key"], result["sweep"], result["separate"]
    lines = [f"| `{key}` | sweep: s | sweep: stages run | separate full run: s | package bytes: sweep, separate |",
             "|---|---:|---|---:|---:|"]
    for value in result["values"]:
        s, f = sweep["points"][value], separate["points"][value]
        lines.append(f"| {value} | {s['seconds']:.0f} | {', '.join(s['stages_run']) or 'none (all restored)'} "
                     f"| {f['seconds']:.0f} | {s['package_bytes']:,}, {f['package_bytes']:,} |")
    lines.append(f"| **all** | **{sweep['seconds']:.0f}** (whole multirun) | | **{separate['seconds']:.0f}** | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--key", default="palettize.n_bits")
    parser.add_argument("--values", default="2,3,4,6")
    args = parser.parse_args(argv)
    values = args.values.split(",")
    sweep_dir = experiments.ROOT / "sweeps" / f"cost-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep = run_sweep(args.key, values, sweep_dir)
    print(f"sweep: {sweep['seconds']} s", flush=True)
    separate = run_separately(args.key, values)
    print(f"separate full runs: {separate['seconds']} s", flush=True)
    result = {"key": args.key, "values": values, "machine": f"{platform.machine()}, {platform.system()}",
              "sweep": sweep, "separate": separate}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "sweep_cost.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "sweep_cost.md").write_text(markdown(result))
    update_readme(markdown(result), "sweep_cost")
    print(markdown(result))


if __name__ == "__main__":
    main()
