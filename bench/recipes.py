"""Measure compression recipes on the default model, each as a DVC experiment.

    python -m bench.recipes                # every recipe
    python -m bench.recipes skm-4bit-g16   # some of them

Each recipe is `dvc exp run --temp -S ...` on the committed pipeline, so
stages a recipe shares with an earlier one are restored from DVC's run-cache.
Results go to bench/results/recipes.{json,md}, and the table between the
markers in README.md is replaced by the new one.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"
MARKERS = ("<!-- recipes:start -->", "<!-- recipes:end -->")

# (name, Hydra overrides, what it is)
RECIPES: list[tuple[str, list[str], str]] = [
    ("kmeans-4bit-g16-linear", ["palettize=kmeans", "palettize.embeddings.enabled=false"],
     "k-means 4-bit, group 16, Linear layers only (coremltools' default scope)"),
    ("kmeans-4bit-g16", ["palettize=kmeans"], "k-means 4-bit, group 16, embeddings too"),
    ("skm-4bit-g16", ["palettize.group_size=16"], "sensitive k-means 4-bit, group 16, embeddings too"),
    ("skm-4bit-g8", ["palettize.group_size=8"], "sensitive k-means 4-bit, group 8"),
    ("skm-4bit-g4", [], "sensitive k-means 4-bit, group 4 (the default recipe)"),
    ("skm-4bit-g1", ["palettize.group_size=1"], "sensitive k-means 4-bit, one table per channel"),
    ("skm-4bit-g16-emb6", ["palettize.group_size=16", "palettize.embeddings.n_bits=6"],
     "sensitive k-means 4-bit, group 16, embeddings 6-bit"),
    ("skm-6bit-g16", ["palettize.n_bits=6", "palettize.group_size=16"], "sensitive k-means 6-bit, group 16"),
    ("magnitude40-skm-4bit-g16", ["prune=magnitude", "palettize.group_size=16"],
     "40% magnitude pruning, then sensitive k-means 4-bit, group 16"),
    ("sparsegpt40-skm-4bit-g16", ["prune=sparse_gpt", "palettize.group_size=16"],
     "40% SparseGPT, then sensitive k-means 4-bit, group 16"),
]


def dvc(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "TQDM_DISABLE": "1"}
    return subprocess.run(["dvc", *args], cwd=ROOT, env=env, check=check, capture_output=True, text=True)


def experiment_metrics(name: str) -> dict:
    """Metrics and params of one named experiment, from `dvc exp show --json`."""
    shown = json.loads(dvc("exp", "show", "--json", "--no-fetch").stdout)
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                if rev.get("name") == name:
                    data = rev["data"]
                    return {"metrics": data["metrics"]["metrics/evaluate.json"]["data"],
                            "params": data["params"]["params.yaml"]["data"]}
    raise KeyError(f"experiment {name} not found in dvc exp show")


def run_recipe(name: str, overrides: list[str]) -> dict:
    dvc("exp", "remove", name, check=False)
    args = ["exp", "run", "--temp", "-n", name]
    for override in overrides:
        args += ["-S", override]
    start = time.perf_counter()
    result = dvc(*args, check=False)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    output = result.stdout + result.stderr
    ran = sorted(set(re.findall(r"stage=(\w+) start", output)))
    # Compression time: what the prune, calibrate and palettize stages themselves
    # logged; absent when DVC restored the stage from its run-cache.
    took = {stage: float(secs) for stage, secs in re.findall(r"pipeline\.(\w+) (?:prune|sensitivity|palettize)[^\n]* took ([\d.]+) s", output)}
    return {"name": name, "overrides": overrides, "seconds": round(seconds, 1), "stages_run": ran,
            "compression_seconds": took, **experiment_metrics(name)}


def compression_time(row: dict) -> str:
    if "compression_seconds" not in row:
        return "not recorded"  # measured before the script logged stage times
    took = row["compression_seconds"]
    if "palettize" not in took:
        return "cached"
    return " + ".join(f"{took[s]:.0f}" for s in ("prune", "calibrate", "palettize") if s in took)


def markdown(rows: list[dict], float_row: dict) -> str:
    lines = ["| recipe | size MB | ratio to fp16 | STS-B Spearman | mean cosine | min cosine | meets target "
             "| compression s | experiment s |",
             "|---|---:|---:|---:|---:|---:|:---:|---:|---:|",
             f"| float16 (no compression) | {float_row['bytes'] / 1e6:.2f} | 1.000 | {float_row['spearman']:.2f} "
             "| 1.0000 | 1.0000 | | | |"]
    for row in rows:
        m = row["metrics"]
        lines.append(f"| `{row['name']}`: {row['description']} | {m['package_bytes'] / 1e6:.2f} | {m['size_ratio']:.3f} "
                     f"| {m['sts_spearman']:.2f} | {m['mean_cosine']:.4f} | {m['min_cosine']:.4f} "
                     f"| {'yes' if m['meets_target'] else 'no'} | {compression_time(row)} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def update_readme(table: str) -> None:
    text = README.read_text(encoding="utf-8")
    start, end = text.index(MARKERS[0]) + len(MARKERS[0]), text.index(MARKERS[1])
    README.write_text(text[:start] + "\n" + table + text[end:], encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="recipes to run (default: all)")
    parser.add_argument("--table", action="store_true", help="only rebuild the table from stored results")
    args = parser.parse_args(argv)
    descriptions = {name: text for name, _, text in RECIPES}
    chosen = [(n, o) for n, o, _ in RECIPES if not args.names or n in args.names]
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / "recipes.json"
    previous = {row["name"]: row for row in json.loads(store.read_text())} if store.is_file() else {}
    for name, overrides in [] if args.table else chosen:
        print(f"running {name}: {' '.join(overrides) or '(default config)'}", flush=True)
        row = run_recipe(name, overrides)
        row["description"] = descriptions[name]
        previous[name] = row
        print(f"  {row['metrics']['package_bytes']} bytes, STS-B {row['metrics']['sts_spearman']}, "
              f"cosine {row['metrics']['mean_cosine']}, {row['seconds']} s, ran {row['stages_run']}", flush=True)
        store.write_text(json.dumps(list(previous.values()), indent=2) + "\n")
    rows = [{**previous[n], "description": descriptions[n]} for n, _, _ in RECIPES if n in previous]
    baseline = json.loads((ROOT / "artifacts/baseline/report.json").read_text())
    table = markdown(rows, {"bytes": baseline["package_bytes"], "spearman": baseline["spearman"]})
    (RESULTS / "recipes.md").write_text(table, encoding="utf-8")
    update_readme(table)
    print(table)


if __name__ == "__main__":
    main()
