"""Core ML-side compression (coremltools.optimize.coreml) of a float16 package: the plan of
steps for a recipe, running them, and decoding the result into a torch model to score it."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

from coreml_pipeline import runtime
from coreml_pipeline.config.schema import CoremlConfig, PalettizeConfig, PruneConfig, QuantizeConfig

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
    # Only a named exact_dp: with auto the Core ML side stays coremltools.optimize.coreml's own k-means,
    # the comparison this stage is for.
    exact = palettize.method != "none" and palettize.kmeans_solver == "exact_dp"
    if exact:
        notes.append("palettize.kmeans_solver=exact_dp runs as coremltools' custom lut_function")
    if palettize.method != "none":
        def palette(embedding: bool):
            n_bits = (palettize.embeddings.n_bits or palettize.n_bits) if embedding else palettize.n_bits
            grouped = palettize.granularity == "per_grouped_channel"
            if exact:  # coremltools' own extension point; in custom mode the table function sets the bits
                from coreml_pipeline.kmeans import lut_function

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

    from coreml_pipeline.coreml.convert import find_weight, load_program, package_weights

    weights = package_weights(load_program(package))
    loaded = 0
    with torch.no_grad():
        for name, param in bert.named_parameters():
            found = find_weight(weights, name, param.numel(), prefix)
            if found is not None:  # else folded into another constant by the converter: still float
                param.copy_(torch.from_numpy(found[0].astype("float32")).reshape(param.shape))
                loaded += 1
    return loaded
