"""What every family's evaluation shares: the per-layer table (what each weight became in the
package), size metrics, Core ML outputs on macOS, and the evaluate stage's output files."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import torch

from coreml_pipeline import runtime
from coreml_pipeline.config.schema import EvaluateConfig
from coreml_pipeline.model import (
    PALETTIZATION,
    PRUNING,
    QUANTIZATION,
    compressible_weights,
    compression_metadata,
    compression_types,
)

COMPRESSION_NAMES = {PRUNING: "pruning", PALETTIZATION: "palettization", QUANTIZATION: "quantization"}








def layer_table(model: torch.nn.Module, reference: torch.nn.Module, readback: dict) -> list[dict]:
    """One row per Linear/Embedding weight: what it became and how far it moved."""
    float_weights = dict(reference.named_parameters())
    rows = []
    for name, module in compressible_weights(model):
        weight = module.weight.detach()
        original = float_weights[f"{name}.weight"].detach()
        technique = "+".join(COMPRESSION_NAMES[k] for k in compression_types(module)) or "none"
        lut, quantized_bits = compression_metadata(module, "lut"), compression_metadata(module, "quantization_n_bits")
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


def write_scores(scores, metrics_path: Path, layers_path: Path, similarities_path: Path, tradeoff_path: Path) -> None:
    """The evaluate stage's outputs: metrics (.json), the per-layer table (.csv and a .md beside
    it), the per-sample plot data and the size/quality row."""
    runtime.write_json(scores.metrics, metrics_path)
    write_csv(scores.layers, layers_path)
    layers_path.with_suffix(".md").write_text(layer_markdown(scores.layers), encoding="utf-8")
    write_csv(scores.per_sample, similarities_path)
    write_csv([scores.tradeoff], tradeoff_path)
