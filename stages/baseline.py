"""The float reference, computed once per model: the uncompressed float16
.mlpackage (the size baseline) and the float32 outputs (the sentence
embeddings; for other families what their scoring keeps of each output) and
float quality (STS-B score, perplexity, accuracy) that evaluate compares every
compressed model against."""

from __future__ import annotations

import argparse
from pathlib import Path

from stages import config, families, numerics, runtime
from stages import provenance as provenance_lib
from stages.convert import convert_and_check
from stages.data import eval_pairs
from stages.evaluate import sts_spearman
from stages.families.base import torch_device
from stages.model import encode, load_float_model, load_tokenizer, save_tensors


def float_provenance(family, params: dict) -> dict[str, str]:
    """What made the float package: the model, conversion and numerics, on this platform."""
    platform = numerics.fingerprint(params["runtime"].numerics, torch_device(params["model"]))
    sections = {name: params[name] for name in ("model", "convert", "runtime")}
    return provenance_lib.collect(sections, [], family.weights_location(), platform)


def family_baseline(family, params: dict, args, log) -> None:
    """Every family but the sentence embedder: outputs on the evaluation samples, and the float package."""
    network = family.load_float()
    samples = family.eval_samples()
    device = torch_device(params["model"])
    with runtime.timed(log, f"float outputs on {len(samples)} samples on {device}"):
        reference = family.run(network, samples, device)
    quality = family.reference_metrics(reference, samples)
    log.info("float model: %s", quality)
    report = convert_and_check(network, family, params["convert"], Path(args.package), log,
                               float_provenance(family, params))
    save_tensors(reference, args.embeddings)
    runtime.write_json({**quality, "package_bytes": report["package_bytes"], "num_samples": len(samples),
                        "readback_max_abs_diff": report["max_abs_diff"]}, args.report)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--package", required=True, help="float16 .mlpackage to write")
    parser.add_argument("--embeddings", required=True,
                        help="float embeddings of the evaluation sentences (other families: float outputs)")
    parser.add_argument("--report", required=True, help="baseline report (.json)")
    args = parser.parse_args(argv)
    params = config.load(("model", "data", "convert", "evaluate", "runtime"), args.params)
    model_cfg = params["model"]
    log = runtime.setup("baseline", numerics=params["runtime"])

    family = families.get(model_cfg, params["data"])
    if model_cfg.family != "sentence_embedding":
        family_baseline(family, params, args, log)
        return
    bert = load_float_model(model_cfg)
    pairs = eval_pairs(params["data"])
    with runtime.timed(log, f"float embeddings of {len(pairs)} pairs"):
        embeddings = encode(bert, load_tokenizer(model_cfg), pairs.sentences(), model_cfg, params["evaluate"].batch_size)
    spearman = sts_spearman(embeddings, pairs)
    log.info("float STS-B Spearman x100: %.2f", spearman)
    report = convert_and_check(bert, family, params["convert"], Path(args.package), log,
                               float_provenance(family, params))
    save_tensors({"embeddings": embeddings.contiguous()}, args.embeddings)
    runtime.write_json({"spearman": spearman, "package_bytes": report["package_bytes"],
                "num_pairs": len(pairs), "readback_max_abs_diff": report["max_abs_diff"]}, args.report)


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
