"""Optional stage, coreml_compress: the same recipe on the Core ML side.

coremltools.optimize.coreml compresses the float16 .mlpackage of the baseline
stage directly (prune_weights -> palettize_weights -> linear_quantize_weights,
joint where more than one applies), so that users can compare it with the
torch-side result of the same prune/palettize/quantize settings. The Core ML
side is data-free: sensitive k-means, SparseGPT and GPTQ run as their
data-free forms (k-means, magnitude, linear), which the metrics name.

Linux cannot run the package, so its weights are decoded (the read-back the
convert stage uses), loaded into the torch model and scored exactly as
evaluate scores the torch-side model. With coreml.enabled false the stage
only records that it is off.
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from stages import config, runtime
from stages.schema import CoremlConfig, PalettizeConfig, PruneConfig, QuantizeConfig

if TYPE_CHECKING:
    import torch

# torch, transformers and coremltools are imported where used: with coreml.enabled
# false (the default) the stage only records that, in under a second (bench/pipeline.py).

DATA_FREE = {"sensitive_kmeans": "kmeans", "sparse_gpt": "magnitude", "gptq": "linear"}
QUANT_MODES = {"symmetric": "linear_symmetric", "affine": "linear"}


def _per_type(make, embeddings: bool) -> dict:
    """Linear, convolution and embedding (gather) weights: what the torch side compresses."""
    return {"linear": make(False), "conv": make(False), "gather": make(True) if embeddings else None}


def plan(prune: PruneConfig, palettize: PalettizeConfig, quantize: QuantizeConfig, cfg: CoremlConfig):
    """[(step name, coremltools function, OptimizationConfig)] for the recipe, and notes."""
    import coremltools.optimize.coreml as cto

    steps, notes = [], []
    for section, method in (("prune", prune.method), ("palettize", palettize.method), ("quantize", quantize.method)):
        if method in DATA_FREE:
            notes.append(f"{section}.method={method} runs as data-free {DATA_FREE[method]}")
    if prune.method != "none":
        options = {"weight_threshold": cfg.weight_threshold}
        if prune.n_m_ratio:
            options["n_m_ratio"] = tuple(prune.n_m_ratio)
        else:
            options["target_sparsity"] = float(prune.target_sparsity)
            if prune.block_size > 1:
                options["block_size"] = prune.block_size
        # MagnitudePruner on the torch side prunes Linear and Conv layers only; so does this.
        steps.append(("prune", cto.prune_weights, cto.OptimizationConfig(
            op_type_configs={kind: cto.OpMagnitudePrunerConfig(**options) for kind in ("linear", "conv")})))
    exact = palettize.method != "none" and palettize.kmeans_solver == "exact_dp"
    if exact:
        notes.append("palettize.kmeans_solver=exact_dp runs as coremltools' custom lut_function")
    if palettize.method != "none":
        def palette(embedding: bool):
            n_bits = (palettize.embeddings.n_bits or palettize.n_bits) if embedding else palettize.n_bits
            grouped = palettize.granularity == "per_grouped_channel"
            if exact:  # coremltools' own extension point; in custom mode the table function sets the bits
                from stages.exact_kmeans import lut_function

                table = {"mode": "custom", "lut_function": functools.partial(lut_function, n_bits=n_bits)}
            else:
                table = {"mode": "uniform" if palettize.method == "uniform" else "kmeans", "nbits": n_bits}
            return cto.OpPalettizerConfig(
                **table,
                granularity=palettize.granularity, group_size=palettize.group_size if grouped else 32,
                channel_axis=palettize.embeddings.channel_axis if embedding else 0,
                cluster_dim=palettize.cluster_dim, enable_per_channel_scale=palettize.enable_per_channel_scale,
                num_kmeans_workers=palettize.num_kmeans_workers, weight_threshold=cfg.weight_threshold)

        steps.append(("palettize", cto.palettize_weights, cto.OptimizationConfig(
            op_type_configs=_per_type(palette, palettize.embeddings.enabled))))
        if palettize.lut_dtype:  # quantize the look-up tables (joint compression)
            lut_quant = cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype=palettize.lut_dtype,
                                                    granularity="per_tensor", weight_threshold=0)
            steps.append(("quantize look-up tables", cto.linear_quantize_weights,
                          cto.OptimizationConfig(global_config=lut_quant)))
    if quantize.method != "none":
        def linear(embedding: bool):
            options = {"mode": QUANT_MODES[quantize.scheme], "dtype": quantize.dtype,
                       "granularity": quantize.granularity, "weight_threshold": cfg.weight_threshold}
            if quantize.granularity == "per_block":
                options["block_size"] = quantize.block_size
            return cto.OpLinearQuantizerConfig(**options)

        steps.append(("quantize", cto.linear_quantize_weights, cto.OptimizationConfig(
            op_type_configs=_per_type(linear, quantize.embeddings))))
    return steps, notes


def compress(package: Path, steps, log):
    import coremltools as ct

    mlmodel = ct.models.MLModel(str(package), skip_model_load=True)
    for index, (name, function, optimization) in enumerate(steps):
        with runtime.timed(log, f"coremltools.optimize.coreml {name}"):
            mlmodel = function(mlmodel, optimization, joint_compression=index > 0)
    return mlmodel


def load_decoded(bert: torch.nn.Module, package: Path, prefix: str = "bert") -> int:
    """Copy every weight the package holds, decoded, into ``bert``; returns how many."""
    import torch

    from stages.convert import find_weight, load_program, package_weights

    weights = package_weights(load_program(package))
    loaded = 0
    with torch.no_grad():
        for name, param in bert.named_parameters():
            found = find_weight(weights, name, param.numel(), prefix)
            if found is not None:  # else folded into another constant by the converter: still float
                param.copy_(torch.from_numpy(found[0].astype("float32")).reshape(param.shape))
                loaded += 1
    return loaded


def family_metrics(params: dict, package: Path, float_outputs: Path, float_report: Path) -> dict:
    """Every family but the sentence embedder: the decoded package weights in the float
    network, scored as evaluate scores the torch side."""
    from safetensors.torch import load_file

    from stages import families
    from stages.convert import package_bytes
    from stages.families.base import torch_device

    family = families.get(params["model"], params["data"])
    network = family.load_float()
    loaded = load_decoded(network, package, family.prefix)
    samples = family.eval_samples()
    report = json.loads(float_report.read_text())
    compressed = family.run(network, samples, torch_device(params["model"]))
    metrics, _ = family.compare(compressed, load_file(str(float_outputs)), samples, report, params["evaluate"])
    size = package_bytes(package)
    return {**metrics, "package_bytes": size, "size_ratio": round(size / report["package_bytes"], 4),
            "weights_decoded": loaded}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--float-package", required=True, help="the baseline float16 .mlpackage")
    parser.add_argument("--float-embeddings", required=True)
    parser.add_argument("--float-report", required=True)
    parser.add_argument("--out", required=True, help="folder for the Core ML-side .mlpackage")
    parser.add_argument("--metrics", required=True, help="DVC metrics (.json)")
    args = parser.parse_args(argv)
    params = config.load(("model", "data", "coreml", "evaluate", "runtime"), args.params)
    cfg: CoremlConfig = params["coreml"]

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if not cfg.enabled:
        (out / "README").write_text("coreml.enabled is false: no Core ML-side package\n", encoding="utf-8")
        runtime.write_json({"enabled": False}, args.metrics)
        # The start line sweeps count stages by (runtime.setup would import torch just to log it).
        print("stage=coreml_compress start: coreml.enabled is false; nothing to do", file=sys.stderr)
        return
    from safetensors.torch import load_file

    from stages.convert import package_bytes, save_package
    from stages.data import eval_pairs
    from stages.evaluate import fidelity, sts_spearman
    from stages.model import encode, load_float_model, load_tokenizer

    log = runtime.setup("coreml_compress", numerics=params["runtime"])
    steps, notes = plan(cfg.prune, cfg.palettize, cfg.quantize, cfg)
    if not steps:
        raise ValueError("coreml.enabled: the recipe compresses nothing (prune, palettize and quantize are all none)")
    start = time.perf_counter()
    mlmodel = compress(Path(args.float_package), steps, log)
    seconds = time.perf_counter() - start
    package = out / "model.mlpackage"
    save_package(mlmodel, package)

    model_cfg = params["model"]
    if model_cfg.family != "sentence_embedding":
        metrics = family_metrics(params, package, Path(args.float_embeddings), Path(args.float_report))
        metrics.update({"enabled": True, "steps": [name for name, _, _ in steps], "data_free_substitutes": notes,
                        "compression_seconds": round(seconds, 1)})
        runtime.write_json(metrics, args.metrics)
        log.info("Core ML side: quality %s, %d bytes (%.1f%% of float16)", metrics["quality"],
                 metrics["package_bytes"], 100 * metrics["size_ratio"])
        return
    bert = load_float_model(model_cfg)
    loaded = load_decoded(bert, package)
    pairs = eval_pairs(params["data"])
    embeddings = encode(bert, load_tokenizer(model_cfg), pairs.sentences(), model_cfg, params["evaluate"].batch_size)
    float_report = json.loads(Path(args.float_report).read_text())
    spearman = sts_spearman(embeddings, pairs)
    size = package_bytes(package)
    metrics = {
        "enabled": True,
        "steps": [name for name, _, _ in steps],
        "data_free_substitutes": notes,
        "sts_spearman": round(spearman, 4),
        "spearman_drop": round(float_report["spearman"] - spearman, 4),
        **{k: round(v, 6) for k, v in fidelity(embeddings, load_file(args.float_embeddings)["embeddings"],
                                               len(pairs)).items()},
        "package_bytes": size,
        "size_ratio": round(size / float_report["package_bytes"], 4),
        "compression_seconds": round(seconds, 1),
        "weights_decoded": loaded,
        "num_pairs": len(pairs),
    }
    runtime.write_json(metrics, args.metrics)
    log.info("Core ML side: STS-B %.2f, mean cosine %.4f, %d bytes (%.1f%% of float16)%s", spearman,
             metrics["mean_cosine"], size, 100 * metrics["size_ratio"], f"; {'; '.join(notes)}" if notes else "")


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
