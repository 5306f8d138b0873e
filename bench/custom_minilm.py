"""The custom model family on real weights: all-MiniLM-L6-v2 as a user module
(examples/minilm.py), every stage in process, a few palettization recipes,
scored by output PSNR against the float module (the family's metric).

It answers whether the output-probe sensitivity (the custom and sd_unet families'
calibration loss, coreml_pipeline/families/base.py) helps: sensitive k-means weighted by it
against data-free k-means at the same size.

    python -m bench.custom_minilm               # every recipe, about 15 minutes on 2 cores
    python -m bench.custom_minilm "<recipe>"    # one recipe, merged into bench/results/custom_minilm.json
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from coreml_pipeline.config.compose import compose_text
from coreml_pipeline.tools.inprocess import run_stages

ROOT = Path(__file__).resolve().parent.parent
BASE = ["model=custom", "model.module._target_=examples.minilm.bert_encoder", "~model.module.channels",
        "model.example_inputs._target_=examples.minilm.sentence_tokens", "~model.example_inputs.size",
        f"data.dir={ROOT / 'data/stsb'}", "data.eval_max_pairs=64", "calibrate.num_samples=64", "convert.seq_len=32"]
RECIPES = {
    "kmeans-4bit-g16 (data-free)": ["palettize=kmeans", "palettize.group_size=16"],
    "sensitive-kmeans-4bit-g16 (output probe)": ["palettize=sensitive_kmeans", "palettize.group_size=16"],
    "sensitive-kmeans-4bit-g4 (output probe, exact_dp)": ["palettize=sensitive_kmeans", "palettize.group_size=4",
                                                          "palettize.kmeans_solver=exact_dp"],
    "kmeans-2bit-g16 (data-free)": ["palettize=kmeans", "palettize.n_bits=2", "palettize.group_size=16"],
    "sensitive-kmeans-2bit-g16 (output probe)": ["palettize=sensitive_kmeans", "palettize.n_bits=2",
                                                 "palettize.group_size=16"],
    # The embedding tables left float16: does the probe help the Linear layers alone?
    "kmeans-4bit-g16, embeddings float16 (data-free)": ["palettize=kmeans", "palettize.group_size=16",
                                                        "palettize.embeddings.enabled=false"],
    "sensitive-kmeans-4bit-g16, embeddings float16 (output probe)": [
        "palettize=sensitive_kmeans", "palettize.group_size=16", "palettize.embeddings.enabled=false"],
}
KEYS = ("psnr_db", "min_psnr_db", "mean_cosine", "package_bytes", "size_ratio", "readback_max_abs_diff")


def main(argv: list[str] | None = None) -> None:
    """Runs the recipes named on the command line (default: all), merged into the stored results."""
    import sys

    wanted = (sys.argv[1:] if argv is None else argv) or list(RECIPES)
    out = ROOT / "bench" / "results" / "custom_minilm.json"
    results = json.loads(out.read_text())["recipes"] if out.is_file() else {}
    home = Path.cwd()
    for name in wanted:
        overrides = RECIPES[name]
        with tempfile.TemporaryDirectory() as tmp:
            params = Path(tmp) / "params.yaml"
            params.write_text(compose_text(BASE + overrides), encoding="utf-8")
            os.chdir(tmp)
            start = time.perf_counter()
            try:
                run_stages(params)
                metrics = json.loads(Path("metrics/evaluate.json").read_text())
            finally:
                os.chdir(home)
            results[name] = {"overrides": overrides, "seconds": round(time.perf_counter() - start, 1),
                             **{key: metrics[key] for key in KEYS}}
            print(name, results[name], flush=True)
    results = {name: results[name] for name in RECIPES if name in results}
    out.write_text(json.dumps({"base": BASE, "recipes": results}, indent=2) + "\n", encoding="utf-8")
    lines = ["| recipe | PSNR dB (mean / min) | cosine | package MB | ratio to fp16 |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {n} | {r['psnr_db']:.2f} / {r['min_psnr_db']:.2f} | {r['mean_cosine']:.4f} "
              f"| {r['package_bytes'] / 1e6:.2f} | {r['size_ratio']:.3f} |" for n, r in results.items()]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
