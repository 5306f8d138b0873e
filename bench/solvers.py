"""coremltools' k-means against exact_dp on every palettization recipe of the docs' tables.

    python -m bench.solvers                      # every recipe (about 40 minutes on 2 cores)
    python -m bench.solvers skm-4bit-g16 ...     # some of them

The evidence for `palettize.kmeans_solver=auto` (exact_dp wherever it applies):
for each palettization recipe of the recipe, technique and mixed-bit tables
(bench/recipes.py), the recipe's own prune and calibrate stages run once, then
its palettize stage runs with each solver on the same weights (the stages'
own code, in this process, on each recipe's composed params.yaml). Per solver:
the palettize stage's time; the objective the k-means minimises (squared
weight error, weighted by the sensitivity for sensitive k-means) summed over
the layers and on the worst layer, as coremltools' / exact_dp's ratio; and the
torch model's quality on the STS-B test split (Spearman x100, mean cosine to
the float embeddings). The solver is chosen on the objective (no test data);
the test split only reports what the choice costs. Recipes exact_dp refuses
(vector entries, quantized tables, per-channel scales: auto keeps coremltools
for them) and recipes trained by fine-tuning first are listed with the reason.
Writes bench/results/solvers.json and .md, and the table in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

from bench.recipes import MIXED, RECIPES, TECHNIQUES

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "benchmarks.md"
SOLVERS = ("coremltools", "exact_dp")


def palettization_recipes() -> list[tuple[str, list[str], str]]:
    """Every recipe of the three tables whose palettize stage runs k-means or may (each name once)."""
    seen, chosen = set(), []
    for name, overrides, what in [*RECIPES, *TECHNIQUES, *MIXED]:
        if name in seen or name.startswith("coreml-") or "palettize=none" in overrides \
                or "palettize=uniform" in overrides:
            continue
        seen.add(name)
        chosen.append((name, overrides, what))
    return chosen


def params_file(folder: Path, overrides: list[str], solver: str) -> Path:
    from coreml_pipeline.config import compose

    path = folder / f"params-{solver}.yaml"
    path.write_text(compose.compose_text([*overrides, f"palettize.kmeans_solver={solver}"]), encoding="utf-8")
    return path


def refusal(params: Path) -> str | None:
    """Why the pipeline refuses this recipe with exact_dp (its one config-error line), or None."""
    from coreml_pipeline import validation
    from coreml_pipeline.config import compose
    from coreml_pipeline.config.schema import ConfigError

    try:
        validation.validate(compose.read_params(params))
    except (ConfigError, ValueError) as error:
        return str(error)
    return None


def stage(name: str, params: Path, *args) -> str:
    """``python -m stages.<name>``, a process of its own as under DVC (portable numerics pin a fresh
    process); its log."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", f"stages.{name}", "--params", str(params), *map(str, args)],
                            cwd=ROOT, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"stages.{name} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return result.stderr


def objective(original: dict, palettized: dict, sensitivity: dict | None) -> dict[str, float]:
    per_layer = {}
    for key, weight in original.items():
        diff = (palettized[key].double() - weight.double()) ** 2
        per_layer[key] = float((diff * sensitivity[key].double()).sum() if sensitivity is not None else diff.sum())
    return per_layer


def quality(model_cfg, data_cfg, weights: Path, float_embeddings) -> dict[str, float]:
    from coreml_pipeline.families.sentence_embedding import encode, fidelity, sts_spearman
    from coreml_pipeline.families.stsb import eval_pairs
    from coreml_pipeline.model import load_tokenizer, load_weights

    pairs = eval_pairs(data_cfg)
    embeddings = encode(load_weights(model_cfg, weights), load_tokenizer(model_cfg), pairs.sentences(), model_cfg)
    scores = fidelity(embeddings, float_embeddings, len(pairs))
    return {"sts_spearman": round(sts_spearman(embeddings, pairs), 4), "mean_cosine": round(scores["mean_cosine"], 6)}


def save(rows: list[dict]) -> list[dict]:
    """After every recipe: the stored rows, each recipe's replaced by the new one (so a run of some
    recipes, or an interrupted one, keeps the others), in the tables' order. Returns them."""
    path = RESULTS / "solvers.json"
    stored = {row["recipe"]: row for row in json.loads(path.read_text())} if path.is_file() else {}
    stored.update({row["recipe"]: row for row in rows})
    order = [name for name, _, _ in palettization_recipes()]
    merged = sorted(stored.values(), key=lambda row: order.index(row["recipe"]) if row["recipe"] in order else 99)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    return merged


def measure(recipes: list[tuple[str, list[str], str]], work: Path) -> list[dict]:
    from safetensors.torch import load_file

    from coreml_pipeline import runtime
    from coreml_pipeline.config import compose
    from coreml_pipeline.families.sentence_embedding import encode, load_bert
    from coreml_pipeline.families.stsb import eval_pairs
    from coreml_pipeline.model import compressible_weights, load_tokenizer, load_weights

    defaults = compose.load(("model", "data", "runtime"), params_file(work, [], "coremltools"))
    runtime.prepare_compute(0, defaults["runtime"])  # this process scores with the stages' pinned numerics
    pairs = eval_pairs(defaults["data"])
    float_embeddings = encode(load_bert(defaults["model"]), load_tokenizer(defaults["model"]), pairs.sentences(),
                              defaults["model"])
    upstream: dict[str, Path] = {}  # prune/calibrate outputs by the sections that made them
    rows = []
    for name, overrides, what in recipes:
        folder = work / name
        folder.mkdir()
        files = {solver: params_file(folder, overrides, solver) for solver in SOLVERS}
        row = {"recipe": name, "what": what, "overrides": overrides}
        if "finetune=dkm" in overrides:
            row["not_run"] = ("DKM trains the tables (minutes); the palettize stage then stores them, and both solvers "
                              "store them exactly (tests/test_finetune.py)")
            rows.append(row)
            continue
        if any(o.startswith("finetune=") for o in overrides):
            row["not_run"] = ("pruned while fine-tuning first (100 training steps, minutes); its palettize stage is "
                              "k-means over pruned weights, as in magnitude40-kmeans-4bit-g16")
            rows.append(row)
            continue
        refused = refusal(files["exact_dp"])
        if refused:
            row["not_run"] = f"exact_dp refuses it, so auto runs coremltools: {refused}"
            rows.append(row)
            continue
        params = compose.load(("model", "data", "prune", "calibrate", "palettize"), files["coremltools"])
        prune_key = json.dumps(str(params["prune"]))
        if prune_key not in upstream:
            upstream[prune_key] = folder / "pruned.safetensors"
            stage("prune", files["coremltools"], "--out", upstream[prune_key])
            stage("finetune", files["coremltools"], "--weights", upstream[prune_key],
                  "--out", folder / "finetuned.safetensors")
            upstream[prune_key] = folder / "finetuned.safetensors"
        weights = upstream[prune_key]
        sensitive = params["palettize"].method == "sensitive_kmeans"
        calibrate_key = prune_key + json.dumps(str(params["calibrate"]))
        if sensitive and calibrate_key not in upstream:
            upstream[calibrate_key] = folder / "sensitivity.safetensors"
            stage("calibrate", files["coremltools"], "--weights", weights, "--out", upstream[calibrate_key])
        # Data-free k-means never reads the sensitivity: the path only satisfies the stage's command line.
        sensitivity = upstream[calibrate_key] if sensitive else folder / "unused.safetensors"
        sensitivity.touch()  # the stage's argument must exist; a data-free palettize never reads it
        model = load_weights(params["model"], weights)
        original = {f"{n}.weight": m.weight.detach().clone() for n, m in compressible_weights(model)}
        weighting = load_file(str(sensitivity)) if sensitive else None
        for solver in SOLVERS:
            out = folder / f"palettized-{solver}.safetensors"
            log = stage("palettize", files[solver], "--weights", weights, "--sensitivity", sensitivity, "--out", out)
            seconds = float(re.search(r"palettize method=.* took ([\d.]+) s", log).group(1))  # the stage's own work
            palettized = {f"{n}.weight": m.weight.detach() for n, m in
                          compressible_weights(load_weights(params["model"], out))}
            row[solver] = {"palettize_seconds": round(seconds, 1),
                           "per_layer": objective(original, palettized, weighting),
                           **quality(params["model"], params["data"], out, float_embeddings)}
        reference = row["exact_dp"]["per_layer"]
        mine = row["coremltools"]["per_layer"]
        row["error_ratio"] = round(sum(mine.values()) / sum(reference.values()), 6)
        row["lowest_layer_ratio"] = round(min(mine[k] / reference[k] for k in reference if reference[k] > 0), 6)
        row["highest_layer_ratio"] = round(max(mine[k] / reference[k] for k in reference if reference[k] > 0), 6)
        for solver in SOLVERS:
            row[solver].pop("per_layer")
        print(json.dumps({k: v for k, v in row.items() if k not in ("what", "overrides")}), flush=True)
        rows.append(row)
        save(rows)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| recipe | palettize s: coremltools | exact_dp | objective, coremltools / exact_dp: total "
             "| lowest layer ratio | highest layer ratio | STS-B test: coremltools | exact_dp | mean cosine: coremltools "
             "| exact_dp |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    skipped = []
    for row in rows:
        if "not_run" in row:
            skipped.append(f"- `{row['recipe']}`: {row['not_run']}")
            continue
        c, e = row["coremltools"], row["exact_dp"]
        lines.append(f"| `{row['recipe']}` | {c['palettize_seconds']} | {e['palettize_seconds']} | "
                     f"{row['error_ratio']:.5f} | {row['lowest_layer_ratio']:.5f} | {row['highest_layer_ratio']:.5f} | "
                     f"{c['sts_spearman']:.2f} | {e['sts_spearman']:.2f} | {c['mean_cosine']:.4f} | "
                     f"{e['mean_cosine']:.4f} |")
    stored = {row["recipe"] for row in rows}
    pending = [f"`{name}`" for name, _, _ in palettization_recipes() if name not in stored]
    text = "\n".join(lines) + "\n" + ("\nNot measured here:\n\n" + "\n".join(skipped) + "\n" if skipped else "")
    if pending:
        text += f"\nNot measured yet (`python -m bench.solvers {' '.join(p.strip('`') for p in pending)}`): " \
                f"{', '.join(pending)}.\n"
    return text


def write_docs(text: str) -> None:
    page = DOCS.read_text(encoding="utf-8")
    start, end = "<!-- solvers:start -->", "<!-- solvers:end -->"
    if start in page:
        page = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: f"{start}\n{text}{end}", page, flags=re.S)
        DOCS.write_text(page, encoding="utf-8")


def report() -> str:
    """The table from the stored results, written to solvers.md and the docs page."""
    text = table(json.loads((RESULTS / "solvers.json").read_text(encoding="utf-8")))
    (RESULTS / "solvers.md").write_text(text, encoding="utf-8")
    write_docs(text)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="recipes to measure (default: every palettization recipe)")
    parser.add_argument("--report", action="store_true", help="only rebuild the table from the stored results")
    args = parser.parse_args(argv)
    if args.report:
        print(report())
        return
    known = [name for name, _, _ in palettization_recipes()]
    unknown = [name for name in args.names if name not in known]
    if unknown:
        parser.error(f"unknown recipe {', '.join(unknown)}; allowed: {', '.join(known)}")
    recipes = [r for r in palettization_recipes() if not args.names or r[0] in args.names]
    with tempfile.TemporaryDirectory() as work:
        rows = measure(recipes, Path(work))
    save(rows)
    print(report())


if __name__ == "__main__":
    main()
