"""Stage 5, evaluate: quality, fidelity and size of the compressed model.

Linux cannot run a Core ML model, so evaluation runs the compressed torch
weights, which the convert stage proved equal to the ones inside the
.mlpackage (its read-back report). On macOS the package itself is also run
and scored. Writes DVC metrics, a per-layer table (what each weight became)
and plot data.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from scipy.stats import spearmanr

from stages import config, runtime
from stages.data import Pairs, eval_pairs
from stages.model import (COREML_PREFIX, PALETTIZATION, PRUNING, QUANTIZATION, compressible_weights, compression_types,
                          encode, load_float_model, load_tokenizer, load_weights)
from stages.schema import EvaluateConfig, ModelConfig

COMPRESSION_NAMES = {PRUNING: "pruning", PALETTIZATION: "palettization", QUANTIZATION: "quantization"}


def pair_similarities(embeddings: torch.Tensor, num_pairs: int) -> np.ndarray:
    """Cosine of each pair; rows are [all sentence1..., all sentence2...]."""
    a, b = embeddings[:num_pairs], embeddings[num_pairs:]
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).numpy()


def sts_spearman(embeddings: torch.Tensor, pairs: Pairs) -> float:
    """STS-B score: Spearman x100 between pair cosines and the human scores."""
    return float(spearmanr(pair_similarities(embeddings, len(pairs)), pairs.scores).statistic * 100)


def fidelity(compressed: torch.Tensor, reference: torch.Tensor, num_pairs: int) -> dict[str, float]:
    cosine = torch.nn.functional.cosine_similarity(compressed, reference, dim=-1)
    similarity_rho = spearmanr(pair_similarities(compressed, num_pairs), pair_similarities(reference, num_pairs))
    return {
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "similarity_spearman": float(similarity_rho.statistic),
    }


def _metadata(module: torch.nn.Module, key: str):
    return getattr(module, f"{COREML_PREFIX}/weight/{key}", None)


def layer_table(model: torch.nn.Module, reference: torch.nn.Module, readback: dict) -> list[dict]:
    """One row per Linear/Embedding weight: what it became and how far it moved."""
    float_weights = dict(reference.named_parameters())
    rows = []
    for name, module in compressible_weights(model):
        weight = module.weight.detach()
        original = float_weights[f"{name}.weight"].detach()
        technique = "+".join(COMPRESSION_NAMES[k] for k in compression_types(module)) or "none"
        lut, quantized_bits = _metadata(module, "lut"), _metadata(module, "quantization_n_bits")
        # Bits per weight index (palettized), per stored integer (quantized), or float16.
        bits = (int(math.ceil(math.log2(lut.shape[-2]))) if lut is not None
                else int(quantized_bits) if quantized_bits is not None else 16)
        error = float(torch.linalg.vector_norm(weight - original) / torch.linalg.vector_norm(original))
        rows.append({
            "layer": name,
            "shape": "x".join(map(str, weight.shape)),
            "technique": technique,
            # An uncompressed weight the converter folded into another constant has no op of its own.
            "package_ops": "+".join(readback["weights"].get(f"{name}.weight", {"ops": ["folded_const"]})["ops"]),
            "bits": bits,
            "lut_groups": int(np.prod(lut.shape[:-2])) if lut is not None else 0,
            "sparsity": round(float((weight == 0).float().mean()), 6),
            "weight_error": round(error, 6),
            "params": weight.numel(),
        })
    return rows


def coreml_embeddings(package: Path, tokenizer, sentences: list[str], seq_len: int) -> torch.Tensor:
    """Run the .mlpackage itself (macOS only: Linux has no Core ML runtime)."""
    import coremltools as ct

    mlmodel = ct.models.MLModel(str(package))
    rows = []
    for sentence in sentences:
        tokens = tokenizer(sentence, padding="max_length", truncation=True, max_length=seq_len, return_tensors="np")
        out = mlmodel.predict({name: tokens[name].astype(np.int32) for name in ("input_ids", "attention_mask")})
        rows.append(torch.from_numpy(np.asarray(out["embedding"], dtype=np.float32).reshape(-1)))
    return torch.stack(rows)


def evaluate(model, reference, tokenizer, pairs: Pairs, float_embeddings: torch.Tensor, model_cfg: ModelConfig,
             cfg: EvaluateConfig, readback: dict, float_report: dict) -> tuple[dict, list[dict], np.ndarray]:
    embeddings = encode(model, tokenizer, pairs.sentences(), model_cfg, cfg.batch_size)
    spearman = sts_spearman(embeddings, pairs)
    rows = layer_table(model, reference, readback)
    metrics = {
        "sts_spearman": round(spearman, 4),
        "float_sts_spearman": round(float_report["spearman"], 4),
        "spearman_drop": round(float_report["spearman"] - spearman, 4),
        **{k: round(v, 6) for k, v in fidelity(embeddings, float_embeddings, len(pairs)).items()},
        **size_metrics(rows, readback, float_report),
        "num_pairs": len(pairs),
    }
    metrics["quality"] = metrics["sts_spearman"]  # the headline every family's metrics carry
    metrics["meets_target"] = bool(metrics["spearman_drop"] <= cfg.max_spearman_drop
                                   and metrics["mean_cosine"] >= cfg.min_mean_cosine)
    return metrics, rows, pair_similarities(embeddings, len(pairs))


def size_metrics(rows: list[dict], readback: dict, float_report: dict) -> dict:
    total = sum(r["params"] for r in rows)
    return {
        "package_bytes": readback["package_bytes"],
        "float16_package_bytes": float_report["package_bytes"],
        "size_ratio": round(readback["package_bytes"] / float_report["package_bytes"], 4),
        "sparsity": round(sum(r["sparsity"] * r["params"] for r in rows) / total, 6),
        "bits_per_weight": round(8 * readback["package_bytes"] / total, 4),
        "readback_max_abs_diff": readback["max_abs_diff"],
    }


def evaluate_family(family, model, reference_model, samples: list[dict], reference: dict, float_report: dict,
                    cfg: EvaluateConfig, readback: dict, device) -> tuple[dict, list[dict], list[dict]]:
    """Every family but the sentence embedder: the family's scores against the float
    outputs, plus size; (metrics, per-layer rows, per-sample plot rows)."""
    compressed = family.run(model, samples, device)
    metrics, per_sample = family.compare(compressed, reference, samples, float_report, cfg)
    rows = layer_table(model, reference_model, readback)
    return {**metrics, **size_metrics(rows, readback, float_report)}, rows, per_sample


def coreml_outputs(package: Path, family, samples: list[dict]) -> dict | None:
    """The family's summaries of the .mlpackage's own outputs (macOS only), or None when the
    evaluation inputs do not have the traced shapes."""
    import coremltools as ct

    mlmodel = ct.models.MLModel(str(package))
    shapes = {i.name: tuple(i.type.multiArrayType.shape) for i in mlmodel.get_spec().description.input}
    rows = []
    for sample in samples:
        if any(tuple(sample[name].shape) != shapes[name] for name in family.input_names()):
            return None
        feed = {name: sample[name].numpy().astype(np.float32 if sample[name].is_floating_point() else np.int32)
                for name in family.input_names()}
        out = torch.from_numpy(np.asarray(mlmodel.predict(feed)[family.output_name], dtype=np.float32))
        rows.append(family.summary(out, sample))
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def layer_markdown(rows: list[dict]) -> str:
    head = ["layer", "shape", "technique", "package_ops", "bits", "sparsity", "weight_error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_outputs(metrics: dict, rows: list[dict], args) -> None:
    runtime.write_json(metrics, args.metrics)
    layers = Path(args.layers)
    write_csv(rows, layers)
    layers.with_suffix(".md").write_text(layer_markdown(rows), encoding="utf-8")


def family_main(params: dict, args, readback: dict, float_report: dict, log) -> None:
    from stages import families
    from stages.families.base import torch_device

    model_cfg, cfg = params["model"], params["evaluate"]
    family = families.get(model_cfg, params["data"])
    samples = family.eval_samples()
    reference = load_file(args.float_embeddings)
    device = torch_device(model_cfg)
    model = load_weights(model_cfg, args.weights)
    with runtime.timed(log, f"evaluate {len(samples)} samples on {device}"):
        metrics, rows, per_sample = evaluate_family(family, model, family.load_float(), samples, reference,
                                                    float_report, cfg, readback, device)
    if sys.platform == "darwin":
        coreml = coreml_outputs(Path(args.package), family, samples)
        if coreml is not None:
            metrics["coreml_quality"] = family.compare(coreml, reference, samples, float_report, cfg)[0]["quality"]
        metrics["evaluated"] = "torch weights and the Core ML package itself (macOS)"
    else:
        metrics["evaluated"] = ("torch weights proven equal to the .mlpackage's (read back, max abs diff "
                                f"{readback['max_abs_diff']:.3g}); Core ML prediction needs macOS")
    write_outputs(metrics, rows, args)
    write_csv(per_sample, Path(args.similarities))
    write_csv([{"size_mb": round(metrics["package_bytes"] / 1e6, 4), "quality": metrics["quality"]}],
              Path(args.tradeoff))
    log.info("%s: quality %s, %d bytes (%.1f%% of float16), meets target: %s", model_cfg.family,
             metrics["quality"], metrics["package_bytes"], 100 * metrics["size_ratio"], metrics["meets_target"])
    log.info("per layer:\n%s", layer_markdown(rows))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--weights", required=True, help="palettized weights")
    parser.add_argument("--package", required=True, help="the compressed .mlpackage")
    parser.add_argument("--readback", required=True, help="convert stage's read-back report")
    parser.add_argument("--float-embeddings", required=True)
    parser.add_argument("--float-report", required=True)
    parser.add_argument("--metrics", required=True, help="DVC metrics (.json)")
    parser.add_argument("--layers", required=True, help="per-layer table (.csv; a .md is written beside it)")
    parser.add_argument("--similarities", required=True, help="plot data: float vs compressed pair cosines (.csv); "
                        "other families: a per-sample float vs compressed statistic")
    parser.add_argument("--tradeoff", required=True,
                        help="plot data: one row of size and quality (.csv), for `dvc plots diff` across experiments")
    args = parser.parse_args(argv)
    params = config.load(("model", "data", "evaluate", "runtime"), args.params)
    model_cfg, cfg = params["model"], params["evaluate"]
    log = runtime.setup("evaluate", numerics=params["runtime"])

    readback = json.loads(Path(args.readback).read_text())
    float_report = json.loads(Path(args.float_report).read_text())
    if model_cfg.family != "sentence_embedding":
        family_main(params, args, readback, float_report, log)
        return
    float_embeddings = load_file(args.float_embeddings)["embeddings"]
    pairs = eval_pairs(params["data"])
    tokenizer = load_tokenizer(model_cfg)
    model = load_weights(model_cfg, args.weights)
    with runtime.timed(log, f"evaluate {len(pairs)} pairs"):
        metrics, rows, similarities = evaluate(model, load_float_model(model_cfg), tokenizer, pairs,
                                               float_embeddings, model_cfg, cfg, readback, float_report)
    if sys.platform == "darwin":
        coreml = coreml_embeddings(Path(args.package), tokenizer, pairs.sentences(), readback["seq_len"])
        metrics["coreml_sts_spearman"] = round(sts_spearman(coreml, pairs), 4)
        metrics["evaluated"] = "torch weights and the Core ML package itself (macOS)"
    else:
        metrics["evaluated"] = ("torch weights proven equal to the .mlpackage's (read back, max abs diff "
                                f"{readback['max_abs_diff']:.3g}); Core ML prediction needs macOS")

    write_outputs(metrics, rows, args)
    reference_similarities = pair_similarities(float_embeddings, len(pairs))
    write_csv([{"float": round(float(f), 6), "compressed": round(float(c), 6), "human": s}
               for f, c, s in zip(reference_similarities, similarities, pairs.scores)], Path(args.similarities))
    write_csv([{"size_mb": round(metrics["package_bytes"] / 1e6, 4), "sts_spearman": metrics["sts_spearman"],
                "mean_cosine": metrics["mean_cosine"], "quality": metrics["sts_spearman"]}], Path(args.tradeoff))
    log.info("STS-B %.2f (float %.2f), mean cosine %.4f, %d bytes (%.1f%% of float16), meets target: %s",
             metrics["sts_spearman"], metrics["float_sts_spearman"], metrics["mean_cosine"],
             metrics["package_bytes"], 100 * metrics["size_ratio"], metrics["meets_target"])
    log.info("per layer:\n%s", layer_markdown(rows))


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
