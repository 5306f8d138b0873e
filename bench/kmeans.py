"""coremltools' k-means against palettize.kmeans_solver=exact_dp, side by side.

    python -m bench.kmeans [--no-metrics]

1. Time and weight error on the default model's weights (after calibrate):
   each case palettizes the same weights with coremltools (num_kmeans_workers=1,
   its default, and 2) and with exact_dp (1 and 2 threads). Error is the
   objective each k-means minimises: the sensitivity-weighted squared error for
   sensitive k-means, the plain squared error for data-free k-means, summed over
   the layers, as a ratio to exact_dp's (1.0: the same optimum).
2. The model's metrics with either solver: DVC experiments of the same recipe
   (`dvc exp run --temp -S palettize.kmeans_solver=...`), STS-B and cosine to float.
Writes bench/results/kmeans.json.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"

# name: (palettize overrides, layers (regex over names; None: the whole model))
CASES = {
    "sensitive k-means 4-bit g4 (default), whole model": (
        {"method": "sensitive_kmeans", "n_bits": 4, "group_size": 4}, None),
    "k-means 4-bit g16, whole model": ({"method": "kmeans", "n_bits": 4, "group_size": 16}, None),
    "k-means 8-bit g16, encoder.layer.0 (1.8 M)": (
        {"method": "kmeans", "n_bits": 8, "group_size": 16}, r"encoder\.layer\.0\..*"),
    "sensitive k-means 8-bit g16, encoder.layer.0 (1.8 M)": (
        {"method": "sensitive_kmeans", "n_bits": 8, "group_size": 16}, r"encoder\.layer\.0\..*"),
}
# experiment name: overrides (both solvers for each)
RECIPES = {"default": [], "kmeans-4bit-g16": ["palettize=kmeans"]}


def subset(model, pattern: str | None):
    """The layers to palettize: the whole model, or copies of the matching Linear/Embedding layers."""
    import torch

    from coreml_pipeline.model import compressible_weights

    if pattern is None:
        return copy.deepcopy(model)
    chosen = torch.nn.Module()
    for name, module in compressible_weights(model):
        if re.fullmatch(pattern, name):
            chosen.add_module(name.replace(".", "__"), copy.deepcopy(module))
    return chosen


def error(original, compressed, sensitivity, names) -> tuple[float, dict[str, float]]:
    from coreml_pipeline.model import compressible_weights

    per_layer = {}
    for name, module in compressible_weights(compressed):
        key = names(name)
        diff = (module.weight.detach().double() - original[key].double()) ** 2
        per_layer[key] = float((diff * sensitivity[key].double()).sum() if sensitivity is not None else diff.sum())
    return sum(per_layer.values()), per_layer


def compare(case: str) -> dict:
    from safetensors.torch import load_file

    from coreml_pipeline.config import compose as config
    from coreml_pipeline.model import compressible_weights, load_weights
    from coreml_pipeline.techniques import palettize

    overrides, pattern = CASES[case]
    params = config.load(("model", "palettize"))
    model = load_weights(params["model"], "artifacts/finetune/weights.safetensors")
    sensitivity = load_file("artifacts/calibrate/sensitivity.safetensors")
    original = {f"{n}.weight": m.weight.detach().clone() for n, m in compressible_weights(model)}
    names = (lambda n: f"{n}.weight") if pattern is None else (lambda n: f"{n.replace('__', '.')}.weight")
    base = dataclasses.replace(params["palettize"], granularity="per_grouped_channel", layer_bits={}, **overrides)
    scored = sensitivity if base.method == "sensitive_kmeans" else None  # what the error is weighted by
    weighted = scored
    if pattern is not None and scored is not None:  # the palettizers read sensitivities by the sub-model's names
        weighted = {f"{name.replace('.', '__')}.weight": scored[f"{name}.weight"]
                    for name, _ in compressible_weights(model) if re.fullmatch(pattern, name)}
    runs = {}
    for solver, workers in (("coremltools", 1), ("coremltools", 2), ("exact_dp", 1), ("exact_dp", 2)):
        cfg = dataclasses.replace(base, kmeans_solver=solver, num_kmeans_workers=workers)
        part = subset(model, pattern)
        start = time.perf_counter()
        part = palettize.palettize(part, cfg, weighted)
        seconds = time.perf_counter() - start
        total, per_layer = error(original, part, scored, names)
        runs[f"{solver} x{workers}"] = {"seconds": round(seconds, 2), "error": total, "per_layer": per_layer}
        print(f"{case}: {solver} x{workers} {seconds:.1f} s, error {total:.6g}", flush=True)
    reference = runs["exact_dp x2"]
    for run in runs.values():
        run["error_ratio"] = round(run["error"] / reference["error"], 5)
        run["worst_layer_ratio"] = round(max(run["per_layer"][k] / reference["per_layer"][k]
                                             for k in run["per_layer"] if reference["per_layer"][k] > 0), 5)
        run.pop("per_layer")
    return {"case": case, "params_m": round(sum(v.numel() for k, v in original.items()
                                                 if pattern is None or re.fullmatch(pattern, k[:-7])) / 1e6, 2),
            "runs": runs}


def metrics() -> list[dict]:
    from coreml_pipeline.tools import experiments

    rows = []
    for recipe, overrides in RECIPES.items():
        for solver in ("coremltools", "exact_dp"):
            name = f"solver-{recipe}-{solver.replace('_', '-')}"
            row = experiments.run_experiment(name, [*overrides, f"palettize.kmeans_solver={solver}"])
            m = row["metrics"]
            rows.append({"recipe": recipe, "solver": solver, "stages_run": row["stages_run"],
                         "palettize_seconds": row["compression_seconds"].get("palettize"),
                         **{k: m.get(k) for k in ("package_bytes", "sts_spearman", "mean_cosine", "meets_target")}})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-metrics", action="store_true", help="skip the DVC experiments")
    parser.add_argument("--cases", help="comma-separated indices into CASES (default: all)")
    args = parser.parse_args(argv)
    names = list(CASES)
    chosen = [names[int(i)] for i in args.cases.split(",")] if args.cases else names
    out = {"cases": [compare(case) for case in chosen]}
    if not args.no_metrics:
        out["metrics"] = metrics()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "kmeans.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
