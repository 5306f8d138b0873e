"""The default recipe as one plain Python script: the same coremltools calls
the pipeline's stages make, in one process, no DVC, no files in between.

    python -m bench.plain_script --out /tmp/plain

What an engineer would write by hand: load the model, score the float model and
convert it (the size baseline), compute the sensitivity, palettize, convert and
read the package back, score the compressed model. `python -m bench` runs it
beside a cold `dvc repro` to measure what the pipeline costs on top.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

from coreml_pipeline import families, runtime
from coreml_pipeline.config import compose as config
from coreml_pipeline.coreml.convert import convert_and_check
from coreml_pipeline.families.sentence_embedding import cosine_loss, encode, evaluate, pair_batches, sts_spearman
from coreml_pipeline.families.stsb import calibration_pairs, eval_pairs
from coreml_pipeline.model import load_float_model, load_tokenizer
from coreml_pipeline.techniques import calibrate, palettize


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--out", required=True, help="folder for the two packages and metrics.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    params = config.load(("model", "data", "prune", "finetune", "calibrate", "palettize", "quantize", "coreml",
                          "convert", "evaluate", "runtime"), args.params)
    model_cfg, out = params["model"], Path(args.out)
    if any(params[name].method != "none" for name in ("prune", "finetune", "quantize")) or params["coreml"].enabled:
        raise SystemExit("bench.plain_script reproduces the default recipe: no prune, finetune, quantize or coreml")
    # The same numerics as the stages (runtime.numerics: portable by default), so that the comparison
    # measures the pipeline's overhead, not the cost of bit-identical CPU code paths
    # (that one is bench/results/numerics_cost.json).
    log = runtime.setup("plain_script", params["calibrate"].seed, numerics=params["runtime"])

    tokenizer, float_model = load_tokenizer(model_cfg), load_float_model(model_cfg)
    pairs = eval_pairs(params["data"])
    float_embeddings = encode(float_model, tokenizer, pairs.sentences(), model_cfg, params["evaluate"].batch_size)
    float_package = convert_and_check(float_model, families.get(model_cfg), params["convert"], out / "float16.mlpackage", log, {})
    float_report = {"spearman": sts_spearman(float_embeddings, pairs), "package_bytes": float_package["package_bytes"]}

    model = copy.deepcopy(float_model)
    calibration = pair_batches(
        calibration_pairs(params["data"], params["calibrate"].num_samples, params["calibrate"].seed), tokenizer,
        model_cfg.max_length)
    sensitivity = calibrate.sensitivity(model, calibration, cosine_loss)
    model = palettize.run(model, params["palettize"], sensitivity, log)
    readback = convert_and_check(model, families.get(model_cfg), params["convert"], out / "model.mlpackage", log, {})
    metrics, _, _ = evaluate(model, float_model, tokenizer, pairs, float_embeddings, model_cfg, params["evaluate"],
                             readback, float_report)
    metrics["seconds"] = round(time.perf_counter() - start, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    log.info("plain script: %s", json.dumps(metrics))


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
