"""Measure compression recipes on the default model, each as a DVC experiment.

    python -m bench.recipes                          # every recipe of the first set
    python -m bench.recipes skm-4bit-g16             # some of them
    python -m bench.recipes --set techniques         # every technique, one row each

Each recipe is `dvc exp run --temp -S ...` on the committed pipeline, so
stages a recipe shares with an earlier one are restored from DVC's run-cache.
Results go to bench/results/<set>.{json,md}, and the table between the set's
markers in its docs page (DOCS: docs/results.md, docs/techniques.md,
docs/sweeps.md) is replaced by the new one.
"""

from __future__ import annotations

import argparse
import json

from coreml_pipeline.tools import experiments

ROOT = experiments.ROOT
RESULTS = ROOT / "bench" / "results"
# The docs page holding each set's marked table (<!-- <set>:start --> ... <!-- <set>:end -->).
DOCS = {"recipes": ROOT / "docs" / "results.md", "techniques": ROOT / "docs" / "techniques.md",
        "mixed": ROOT / "docs" / "sweeps.md", "sweep_cost": ROOT / "docs" / "sweeps.md",
        "bench": ROOT / "docs" / "benchmarks.md", "selection": ROOT / "docs" / "results.md"}

# (name, Hydra overrides, what it is): the recipes the default was chosen from
RECIPES: list[tuple[str, list[str], str]] = [
    ("kmeans-4bit-g16-linear", ["palettize=kmeans", "palettize.embeddings.enabled=false"],
     "k-means 4-bit, group 16, Linear layers only (coremltools' default scope)"),
    ("kmeans-4bit-g16", ["palettize=kmeans"], "k-means 4-bit, group 16, embeddings too"),
    ("skm-4bit-g16", ["palettize.group_size=16"], "sensitive k-means 4-bit, group 16, embeddings too"),
    ("skm-4bit-g8", ["palettize.group_size=8"], "sensitive k-means 4-bit, group 8"),
    ("skm-4bit-g4", ["palettize.group_size=4"], "sensitive k-means 4-bit, group 4 (the default until 2026-12-04)"),
    ("skm-4bit-g1", [], "sensitive k-means 4-bit, one table per channel (the default recipe)"),
    ("skm-4bit-g16-emb6", ["palettize.group_size=16", "palettize.embeddings.n_bits=6"],
     "sensitive k-means 4-bit, group 16, embeddings 6-bit"),
    ("skm-6bit-g16", ["palettize.n_bits=6", "palettize.group_size=16"], "sensitive k-means 6-bit, group 16"),
    ("magnitude40-skm-4bit-g16", ["prune=magnitude", "palettize.group_size=16"],
     "40% magnitude pruning, then sensitive k-means 4-bit, group 16"),
    ("sparsegpt40-skm-4bit-g16", ["prune=sparse_gpt", "palettize.group_size=16"],
     "40% SparseGPT, then sensitive k-means 4-bit, group 16"),
]

KMEANS, NO_PALETTE = ["palettize=kmeans"], ["palettize=none"]
LINEAR_ONLY = ["palettize.embeddings.enabled=false"]
# Every technique of coremltools.optimize, one config switch each (docs/techniques.md).
# Rows named coreml-* are the Core ML side (coremltools.optimize.coreml on the float16 package).
TECHNIQUES: list[tuple[str, list[str], str]] = [
    ("skm-4bit-g4", ["palettize.group_size=4"], "sensitive k-means 4-bit, group 4 (the default until 2026-12-04)"),
    ("kmeans-4bit-per-tensor", KMEANS + ["palettize.granularity=per_tensor", "palettize.group_size=null"],
     "k-means 4-bit, one table per tensor"),
    ("kmeans-4bit-g16", KMEANS, "k-means 4-bit, group 16"),
    ("kmeans-2bit-g16", KMEANS + ["palettize.n_bits=2"], "k-means 2-bit, group 16"),
    ("kmeans-3bit-g16", KMEANS + ["palettize.n_bits=3"], "k-means 3-bit, group 16"),
    ("kmeans-6bit-g16", KMEANS + ["palettize.n_bits=6"], "k-means 6-bit, group 16"),
    ("kmeans-8bit-g16-emb4", KMEANS + ["palettize.n_bits=8", "palettize.embeddings.n_bits=4"],
     "k-means 8-bit, group 16 (embeddings 4-bit)"),
    ("uniform-4bit-g16", ["palettize=uniform"], "uniform (linear histogram) 4-bit tables, group 16"),
    ("kmeans-4bit-channel-scale", KMEANS + ["palettize.granularity=per_tensor", "palettize.group_size=null",
                                            "palettize.enable_per_channel_scale=true"],
     "k-means 4-bit, one table per tensor, per-channel scales"),
    ("kmeans-4bit-g16-int8-lut", KMEANS + ["palettize.lut_dtype=int8"], "k-means 4-bit, group 16, int8 look-up tables"),
    ("int8-per-channel", NO_PALETTE + ["quantize=int8"], "linear int8, symmetric, per channel"),
    ("int4-per-block-32", NO_PALETTE + ["quantize=int4_block"], "linear int4, symmetric, per block of 32"),
    ("uint8-affine-per-tensor", NO_PALETTE + ["quantize=int8", "quantize.dtype=uint8", "quantize.scheme=affine",
                                              "quantize.granularity=per_tensor"], "linear uint8, affine, per tensor"),
    ("gptq-uint4-per-block-32", NO_PALETTE + ["quantize=gptq"], "GPTQ uint4, per block of 32 (64 sentences)"),
    ("magnitude40-kmeans-4bit-g16", ["prune=magnitude"] + KMEANS, "40% magnitude pruning + k-means 4-bit, group 16"),
    ("magnitude-2of4-int8", ["prune=magnitude", "prune.n_m_ratio=[2,4]"] + NO_PALETTE + ["quantize=int8"],
     "2:4 magnitude pruning + int8 per channel (sparse quantization)"),
    ("sparsegpt40-int8", ["prune=sparse_gpt"] + NO_PALETTE + ["quantize=int8"], "40% SparseGPT + int8 per channel"),
    ("coreml-kmeans-4bit-g4", ["palettize.group_size=4", "coreml=compare"],
     "Core ML side: sensitive k-means 4-bit, group 4, as data-free k-means"),
    ("coreml-int4-per-block-32", NO_PALETTE + ["quantize=int4_block", "coreml=compare"],
     "Core ML side: linear int4, per block of 32"),
    ("kmeans-2bit-g16-linear", KMEANS + ["palettize.n_bits=2"] + LINEAR_ONLY,
     "k-means 2-bit, group 16, Linear layers only (post-training)"),
    ("dkm-2bit-g16-linear", KMEANS + ["palettize.n_bits=2"] + LINEAR_ONLY
     + ["finetune=dkm", "finetune.steps=40", "finetune.learning_rate=1e-5", "finetune.log_every=10"],
     "DKM 2-bit, group 16, Linear layers only, 40 steps of 16 pairs"),
    ("qat-int4-per-block-32", NO_PALETTE + ["quantize=int4_block", "finetune=qat", "finetune.steps=100"],
     "QAT int4 per block of 32, 100 steps of 16 pairs"),
    ("gradual40-kmeans-4bit-g16", ["finetune=gradual_prune", "finetune.target_sparsity=0.4", "finetune.steps=100"]
     + KMEANS, "40% pruning while fine-tuning (100 steps) + k-means 4-bit, group 16"),
    ("kmeans-4bit-vector-2", KMEANS + ["palettize.granularity=per_tensor", "palettize.group_size=null",
                                       "palettize.cluster_dim=2"], "vector palettization: 4-bit, 2-D entries, per tensor"),
]
# Mixed-bit recipes written by `python -m coreml_pipeline.tools.mixed_bit` (conf/palettize/mixed_*.yaml) beside
# the best uniform recipe meeting the target (docs/sweeps.md "Mixed-bit recipes").
MIXED: list[tuple[str, list[str], str]] = [
    ("skm-4bit-g4", ["palettize.group_size=4"], "uniform: sensitive k-means 4-bit, group 4 (the default until 2026-12-04)"),
    ("mixed-g16-cos097", ["palettize=mixed_g16_cos097"],
     "mixed 2/4/6-bit, group 16: smallest recipe the generator measured at cosine >= 0.97"),
    ("mixed-g16-margin", ["palettize=mixed_g16_margin"],
     "mixed 2/4/6/8-bit, group 16: smallest recipe the generator measured at cosine >= 0.975, "
     "STS-B within 0.25 of float"),
    ("mixed-g16-11mb", ["palettize=mixed_g16_11mb"],
     "mixed 2/6/8-bit, group 16: best recipe the generator found within 11.6 MB"),
]

# The default chosen on held-out data: the candidates on the STS-B dev split (data.eval_file=sts-dev.csv),
# smallest first; the rule (smallest package meeting the target) picks among the recipes that apply to
# every model family. Their test-split figures are RECIPES' and MIXED's (docs/results.md).
DEV = ["data.eval_file=sts-dev.csv"]
SELECTION: list[tuple[str, list[str], str]] = [
    (f"dev-{name}", overrides + DEV, text) for name, overrides, text in [
        ("mixed-g16-cos097", ["palettize=mixed_g16_cos097"], "mixed 2/4/6-bit, group 16 (MiniLM only)"),
        ("mixed-g16-margin", ["palettize=mixed_g16_margin"], "mixed 2/4/6/8-bit, group 16 (MiniLM only)"),
        ("skm-4bit-g16", ["palettize.group_size=16"], "sensitive k-means 4-bit, group 16"),
        ("skm-4bit-g8", ["palettize.group_size=8"], "sensitive k-means 4-bit, group 8"),
        ("skm-4bit-g4", ["palettize.group_size=4"], "sensitive k-means 4-bit, group 4 (the default until 2026-12-04)"),
        ("mixed-g16-11mb", ["palettize=mixed_g16_11mb"], "mixed 2/6/8-bit, group 16 (MiniLM only)"),
        ("skm-4bit-g1", [], "sensitive k-means 4-bit, one table per channel (the default)"),
    ]
]

SETS = {"recipes": RECIPES, "techniques": TECHNIQUES, "mixed": MIXED, "selection": SELECTION}


def run_recipe(name: str, overrides: list[str], timeout: float) -> dict:
    row = experiments.run_experiment(name, overrides, timeout=timeout)
    if "timed_out" in row:
        return row
    # Rows named coreml-* are scored by the Core ML-side stage.
    metrics = row["coreml"] if name.startswith("coreml-") else row["metrics"]
    return {"name": name, "overrides": overrides, "seconds": row["seconds"], "stages_run": row["stages_run"],
            "compression_seconds": row["compression_seconds"], "metrics": metrics, "params": row["params"]}


COMPRESSING_STAGES = ("prune", "finetune", "calibrate", "palettize", "quantize", "coreml_compress")


def compression_time(row: dict) -> str:
    if "compression_seconds" not in row:
        return "not recorded"  # measured before the script logged stage times
    took = row["compression_seconds"]
    if not took:
        return "cached"
    return " + ".join(f"{took[s]:.0f}" for s in COMPRESSING_STAGES if s in took)


def markdown(rows: list[dict], float_row: dict) -> str:
    lines = ["| recipe | size MB | ratio to fp16 | STS-B Spearman | mean cosine | min cosine | meets target "
             "| compression s | experiment s |",
             "|---|---:|---:|---:|---:|---:|:---:|---:|---:|",
             f"| float16 (no compression) | {float_row['bytes'] / 1e6:.2f} | 1.000 | {float_row['spearman']:.2f} "
             "| 1.0000 | 1.0000 | | | |"]
    for row in rows:
        if "timed_out" in row:
            lines.append(f"| `{row['name']}`: {row['description']} | timed out after {row['timed_out']} s "
                         "| | | | | | | |")
            continue
        m = row["metrics"]
        meets = m.get("meets_target", m["spearman_drop"] <= 0.5 and m["mean_cosine"] >= 0.97)
        lines.append(f"| `{row['name']}`: {row['description']} | {m['package_bytes'] / 1e6:.2f} | {m['size_ratio']:.3f} "
                     f"| {m['sts_spearman']:.2f} | {m['mean_cosine']:.4f} | {m['min_cosine']:.4f} "
                     f"| {'yes' if meets else 'no'} | {compression_time(row)} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def update_readme(table: str, set_name: str) -> None:
    """Replace the table between the set's markers in its docs page (DOCS)."""
    page = DOCS[set_name]
    text = page.read_text(encoding="utf-8")
    markers = (f"<!-- {set_name}:start -->", f"<!-- {set_name}:end -->")
    start, end = text.index(markers[0]) + len(markers[0]), text.index(markers[1])
    page.write_text(text[:start] + "\n" + table + text[end:], encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="recipes to run (default: all)")
    parser.add_argument("--table", action="store_true", help="only rebuild the table from stored results")
    parser.add_argument("--set", default="recipes", choices=sorted(SETS), help="which list of recipes")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one recipe may take")
    args = parser.parse_args(argv)
    recipes = SETS[args.set]
    descriptions = {name: text for name, _, text in recipes}
    chosen = [(n, o) for n, o, _ in recipes if not args.names or n in args.names]
    RESULTS.mkdir(parents=True, exist_ok=True)
    store = RESULTS / f"{args.set}.json"
    previous = {row["name"]: row for row in json.loads(store.read_text())} if store.is_file() else {}
    for name, overrides in [] if args.table else chosen:
        print(f"running {name}: {' '.join(overrides) or '(default config)'}", flush=True)
        row = run_recipe(name, overrides, args.timeout)
        row["description"] = descriptions[name]
        previous[name] = row
        if "timed_out" in row:
            print(f"  timed out after {row['timed_out']} s", flush=True)
        else:
            print(f"  {row['metrics']['package_bytes']} bytes, STS-B {row['metrics']['sts_spearman']}, "
                  f"cosine {row['metrics']['mean_cosine']}, {row['seconds']} s, ran {row['stages_run']}", flush=True)
        store.write_text(json.dumps(list(previous.values()), indent=2) + "\n")
    rows = [{**previous[n], "description": descriptions[n]} for n, _, _ in recipes if n in previous]
    scored = [row["metrics"] for row in rows if row.get("metrics")]
    if args.set == "selection" and scored:  # the float model on the dev split, as these runs scored it
        float_row = {"bytes": scored[0]["float16_package_bytes"], "spearman": scored[0]["float_sts_spearman"]}
    else:
        baseline = json.loads((ROOT / "artifacts/baseline/report.json").read_text())
        float_row = {"bytes": baseline["package_bytes"], "spearman": baseline["spearman"]}
    table = markdown(rows, float_row)
    (RESULTS / f"{args.set}.md").write_text(table, encoding="utf-8")
    update_readme(table, args.set)
    print(table)


if __name__ == "__main__":
    main()
