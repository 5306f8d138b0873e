"""Real weights beyond MiniLM, measured through every stage: EfficientNet-Lite0 (its package) on the real
photographs of data/photos, and SmolLM2-135M (GGUF in its package) on the English prose of data/prose.

    python -m bench.real_models                          # every EfficientNet-Lite0 recipe
    python -m bench.real_models --model smollm2          # every SmolLM2-135M recipe
    python -m bench.real_models int8-per-channel
    python -m bench.real_models --model smollm2 --table  # rebuild the table from bench/results/smollm2.json

Each recipe runs dvc.yaml's stages in this process (coreml_pipeline.tools.inprocess) in a temporary
folder, then evaluate again on the calibration split: the dev split the default is chosen on
(EfficientNet: test data/photos/eval, 10 images, dev data/photos/calibration, 6 images; SmolLM2: test
data/prose/eval.txt, dev data/prose/calibration.txt, 16 windows of 128 tokens each). The table goes to
bench/results/<model>.md and between the model's markers in docs/families.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "families.md"
G16 = ["palettize.group_size=16"]
NO_PALETTE = ["palettize=none"]
EFFICIENTNET: list[tuple[str, list[str], str]] = [
    ("kmeans-4bit-g16", ["palettize=kmeans"], "data-free k-means 4-bit, group 16"),
    ("skm-4bit-g16", G16, "sensitive k-means 4-bit, group 16"),
    ("skm-4bit-g4", ["palettize.group_size=4"], "sensitive k-means 4-bit, group 4"),
    ("skm-4bit-g1", [], "sensitive k-means 4-bit, one table per channel (the pipeline's default recipe)"),
    ("skm-6bit-g16", G16 + ["palettize.n_bits=6"], "sensitive k-means 6-bit, group 16"),
    ("skm-8bit-g16", G16 + ["palettize.n_bits=8"], "sensitive k-means 8-bit, group 16"),
    # Written by coreml_pipeline.tools.mixed_bit --meet-target from the default recipe's cached sensitivity
    # (conf/palettize/mixed_effnet_g16.yaml's header: the command and inputs).
    ("mixed-g16-target", ["palettize=mixed_effnet_g16"],
     "mixed 6/8-bit, group 16: the generator's smallest recipe meeting the target on dev"),
    ("int8-per-channel", NO_PALETTE + ["quantize=int8"],
     "linear int8, symmetric, per channel"),
    # Per block does not apply: the stem has 3 input channels and each depthwise conv 1 (validate refuses it).
    ("int4-per-channel", NO_PALETTE + ["quantize=int4_block", "quantize.granularity=per_channel", "~quantize.block_size"],
     "linear int4, symmetric, per channel"),
    ("gptq-uint4-per-channel", NO_PALETTE + ["quantize=gptq", "quantize.granularity=per_channel", "~quantize.block_size"],
     "GPTQ uint4, per channel (depthwise convs data-free)"),
    ("sparsegpt40-skm-4bit-g16", ["prune=sparse_gpt"] + G16,
     "40% SparseGPT (depthwise convs unpruned), then sensitive k-means 4-bit, group 16"),
]
# quantize.layer_dtypes keeping SmolLM2's token embedding and (untied) head at one dtype.
EMBEDDING_HEAD_AT = "quantize.layer_dtypes={{model.embed_tokens:{0},lm_head:{0}}}"
# 16 calibration windows of 128 tokens for the sensitivity, SparseGPT and GPTQ (of the 40 in the dev text).
LM_SAMPLES = ["calibrate.num_samples=16", "prune.num_samples=16", "quantize.num_samples=16"]
SMOLLM2: list[tuple[str, list[str], str]] = [
    ("kmeans-4bit-g16", ["palettize=kmeans"], "data-free k-means 4-bit, group 16"),
    ("skm-4bit-g16", G16, "sensitive k-means 4-bit, group 16"),
    ("skm-4bit-g1", [], "sensitive k-means 4-bit, one table per channel (the pipeline's default recipe)"),
    ("skm-6bit-g16", G16 + ["palettize.n_bits=6"], "sensitive k-means 6-bit, group 16"),
    # Written by coreml_pipeline.tools.mixed_bit --meet-target --bits 6 8 (conf/palettize/mixed_smollm2_g16.yaml's
    # header: the command and inputs).
    ("mixed-g16-target", ["palettize=mixed_smollm2_g16"],
     "mixed 6/8-bit, group 16 (the head at 8): the generator's smallest recipe meeting the target on dev"),
    ("int8-per-channel", NO_PALETTE + ["quantize=int8"], "linear int8, symmetric, per channel"),
    ("int4-per-block-32", NO_PALETTE + ["quantize=int4_block"], "linear int4, symmetric, per block of 32"),
    ("uint4-affine-per-block-32", NO_PALETTE + ["quantize=int4_block", "quantize.dtype=uint4",
                                                "quantize.scheme=affine"],
     "linear uint4, affine, per block of 32: the GGUF's own Q4_1 grid (see below)"),
    ("gptq-uint4-per-block-32", NO_PALETTE + ["quantize=gptq"], "GPTQ uint4, per block of 32"),
    ("sparsegpt40-skm-4bit-g16", ["prune=sparse_gpt"] + G16, "40% SparseGPT, then sensitive k-means 4-bit, group 16"),
    # The fair 4-bit comparison on this GGUF: embedding and head at 8 bits per block of 32, as its Q8_0 has them.
    ("int4-per-block-32-emb8", NO_PALETTE + ["quantize=int4_block", EMBEDDING_HEAD_AT.format("int8")],
     "linear int4, symmetric, per block of 32; embedding and head int8 per block of 32 (Q8_0's grid)"),
    ("uint4-affine-per-block-32-emb8", NO_PALETTE + ["quantize=int4_block", "quantize.dtype=uint4",
                                                     "quantize.scheme=affine", EMBEDDING_HEAD_AT.format("int8")],
     "linear uint4, affine, per block of 32; embedding and head int8 per block of 32: the GGUF's own layout"),
    ("gptq-uint4-per-block-32-emb8", NO_PALETTE + ["quantize=gptq", EMBEDDING_HEAD_AT.format("uint8")],
     "GPTQ uint4, per block of 32; embedding and head uint8 per block of 32"),
]


def image_quality(m: dict) -> str:
    return f"{m['top1_agreement']:.2f} | {m['top5_agreement']:.2f} | {m['kl_divergence']:.3f}"


def text_quality(m: dict) -> str:
    return (f"{m['perplexity']:.2f} | {m['next_token_agreement']:.3f} | "
            f"{m.get('generation_agreement', float('nan')):.2f}")


# name -> (overrides every recipe gets, recipes, table columns per split, one split's figures, doc marker)
MODELS = {
    "efficientnet_lite0": (["model=efficientnet_lite0", f"data.dir={ROOT / 'data/photos'}"], EFFICIENTNET,
                           "top-1 agreement | top-5 | KL", image_quality, "efficientnet",
                           lambda m: f"top-1 {m['top1_agreement']}"),
    "smollm2": (["model=smollm2", f"data.dir={ROOT / 'data/prose'}", *LM_SAMPLES], SMOLLM2,
                "perplexity | next-token agreement | generation agreement", text_quality, "smollm2",
                lambda m: f"perplexity {m['perplexity']}, next-token {m['next_token_agreement']}"),
}
COMPRESSING = ("prune", "calibrate", "palettize", "quantize")


def run_recipe(model: list[str], overrides: list[str], work: Path) -> dict:
    """The recipe's stages in ``work``, timed; then evaluate on the dev split."""
    from coreml_pipeline.config.compose import compose_text
    from coreml_pipeline.tools.inprocess import run_stages

    params = work / "params.yaml"
    params.write_text(compose_text(model + overrides), encoding="utf-8")
    seconds = {}
    start = time.perf_counter()
    for stage in ("inspect", "validate", "prune", "finetune", "calibrate", "palettize", "quantize", "convert",
                  "baseline", "coreml_compress", "evaluate"):
        began = time.perf_counter()
        run_stages(params, only=(stage,))
        seconds[stage] = round(time.perf_counter() - began, 1)
    total = round(time.perf_counter() - start, 1)
    test = json.loads((work / "metrics/evaluate.json").read_text())
    dev_params = yaml.safe_load(params.read_text())
    dev_params["data"]["eval_file"] = dev_params["data"]["calibration_file"]
    params.write_text(yaml.safe_dump(dev_params, sort_keys=False), encoding="utf-8")
    run_stages(params, only=("baseline", "evaluate"))
    dev = json.loads((work / "metrics/evaluate.json").read_text())
    return {"overrides": overrides, "seconds": total, "stage_seconds": seconds,
            "compression_seconds": round(sum(seconds[s] for s in COMPRESSING), 1), "test": test, "dev": dev}


def markdown(rows: list[dict], columns: str, quality) -> str:
    width = columns.count("|") + 1
    blanks = " |" * width
    lines = [f"| recipe | size MB | ratio to fp16 | test: {columns} | dev: {columns} "
             "| meets target on dev | compression s | all stages s |",
             "|---|---:|---:|" + "---:|" * (2 * width) + ":---:|---:|---:|"]
    first = next(row for row in rows if "test" in row)
    float_test, float_dev = reference(first["test"]), reference(first["dev"])
    lines.append(f"| float16 (no compression) | {first['test']['float16_package_bytes'] / 1e6:.2f} | 1.000 "
                 f"| {float_test} | {float_dev} | | | |")
    for row in rows:
        if "error" in row:
            lines.append(f"| `{row['name']}`: {row['description']} | failed: {row['error'].splitlines()[0]} "
                         f"| |{blanks}{blanks} | | |")
            continue
        test, dev = row["test"], row["dev"]
        lines.append(f"| `{row['name']}`: {row['description']} | {test['package_bytes'] / 1e6:.2f} | {test['size_ratio']:.3f} "
                     f"| {quality(test)} | {quality(dev)} | {'yes' if dev['meets_target'] else 'no'} "
                     f"| {row['compression_seconds']:.0f} | {row['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def reference(metrics: dict) -> str:
    """The float model's own figures in a split's columns."""
    if "float_perplexity" in metrics:
        return f"{metrics['float_perplexity']:.2f} | 1.000 | 1.00"
    return "1.00 | 1.00 | 0.000"


def write_doc(table: str, marker: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    begin, end = f"<!-- {marker}:start -->", f"<!-- {marker}:end -->"
    head, rest = text.split(begin, 1)
    DOC.write_text(head + begin + "\n" + table + end + rest.split(end, 1)[1], encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="recipes to run (default: all)")
    parser.add_argument("--model", default="efficientnet_lite0", choices=sorted(MODELS), help="which real model")
    parser.add_argument("--table", action="store_true", help="only rebuild the table from stored results")
    args = parser.parse_args(argv)
    model, recipes, columns, quality, marker, brief = MODELS[args.model]
    known = [name for name, _, _ in recipes]
    unknown = [name for name in args.names if name not in known]
    if unknown:
        parser.error(f"unknown recipe {', '.join(unknown)}; allowed: {', '.join(known)}")
    # The stages run in this process: pin the default numerics before its first torch operation, as
    # a stage's own process does (on an AVX-512 CPU torch would otherwise pick its AVX-512 kernels).
    from coreml_pipeline import numerics
    from coreml_pipeline.config.schema import RuntimeConfig

    numerics.apply(RuntimeConfig().numerics, RuntimeConfig().threads)
    store = RESULTS / f"{args.model}.json"
    stored = {row["name"]: row for row in json.loads(store.read_text())} if store.is_file() else {}
    descriptions = {name: text for name, _, text in recipes}
    sys.path.insert(0, str(ROOT))  # the stages package, for the in-process runs
    for name, overrides, _ in [] if args.table else recipes:
        if args.names and name not in args.names:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            import os

            here = os.getcwd()
            os.chdir(tmp)
            try:
                stored[name] = {"name": name, **run_recipe(model, overrides, Path(tmp))}
            except Exception as exc:  # noqa: BLE001 - a recipe that fails is a row saying why, not a lost run
                stored[name] = {"name": name, "overrides": overrides, "error": f"{type(exc).__name__}: {exc}"[:300]}
                print(f"{name}: failed: {stored[name]['error']}", flush=True)
            finally:
                os.chdir(here)
        if "error" not in stored[name]:
            row = stored[name]
            print(f"{name}: {row['test']['package_bytes']} bytes, test {brief(row['test'])}, dev {brief(row['dev'])}, "
                  f"{row['seconds']} s", flush=True)
        store.write_text(json.dumps(list(stored.values()), indent=2) + "\n", encoding="utf-8")
    rows = [{**stored[n], "description": descriptions[n]} for n in known if n in stored]
    table = markdown(rows, columns, quality)
    (RESULTS / f"{args.model}.md").write_text(table, encoding="utf-8")
    write_doc(table, marker)
    print(table)


if __name__ == "__main__":
    main()
