"""Linear quantization and GPTQ of torch weights with coremltools.optimize.torch, and
per-row quantization of embedding tables (which coremltools' torch quantizer skips)."""

from __future__ import annotations

import re

import numpy as np
import torch

from coreml_pipeline import runtime
from coreml_pipeline.config.schema import QuantizeConfig, dtype_bits
from coreml_pipeline.model import (
    BERT_BLOCKS,
    QUANTIZATION,
    WEIGHT_LAYER_TYPES,
    compressible_weights,
    compression_metadata,
    compression_types,
    subclass_configs,
)
from coreml_pipeline.techniques.methods import quantize as _registers_methods  # noqa: F401
from coreml_pipeline.techniques.precision import expand_blocks, round_like_package, warn_lost_rows
from coreml_pipeline.techniques.registry import get

SCHEMES = {"symmetric": "LINEAR_SYMMETRIC", "affine": "LINEAR"}


def module_config(cfg: QuantizeConfig, dtype: str | None = None) -> dict:
    """coremltools' module options for the section's settings (at ``dtype``: one layer's, layer_dtypes)."""
    options = {"weight_dtype": dtype or cfg.dtype, "granularity": cfg.granularity, "quantization_scheme": cfg.scheme}
    if cfg.granularity == "per_block":
        options["block_size"] = cfg.block_size
    return options


def linear_quantize(model: torch.nn.Module, cfg: QuantizeConfig) -> torch.nn.Module:
    from coremltools.optimize.torch.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig

    kinds = WEIGHT_LAYER_TYPES
    by_name = subclass_configs(model, kinds, module_config(cfg))
    if cfg.layer_dtypes:  # every layer by its own name: its dtype (the first pattern that fully matches it)
        by_name = {re.escape(name): module_config(cfg, cfg.layer_dtype(name)) for name, module in
                   compressible_weights(model) if not isinstance(module, torch.nn.Embedding)}
    quantizer = PostTrainingQuantizer(model, PostTrainingQuantizerConfig.from_dict({
        "module_type_configs": {kind: module_config(cfg) for kind in kinds}, "module_name_configs": by_name}))
    return quantizer.compress(inplace=True)


def outside_blocks(model: torch.nn.Module, cfg: QuantizeConfig) -> list[str]:
    """GPTQ covers the layers inside the block stack only (LayerwiseCompressor), and no grouped
    (depthwise) convolution (techniques/layerwise.py); a layer it left (a causal LM's head, an
    EfficientNet's depthwise convs) is quantized data-free with the same settings rather than left
    float16. Returns their names."""
    from coremltools.optimize.torch.quantization import PostTrainingQuantizer, PostTrainingQuantizerConfig

    left = [name for name, module in compressible_weights(model)
            if not isinstance(module, torch.nn.Embedding) and QUANTIZATION not in compression_types(module)]
    if left:
        PostTrainingQuantizer(model, PostTrainingQuantizerConfig.from_dict({
            "global_config": None,
            "module_name_configs": {re.escape(name): module_config(cfg, cfg.layer_dtype(name)) for name in left}})
        ).compress(inplace=True)
        runtime.log.info("GPTQ left %d layer(s) (outside the block stack, or grouped convolutions); quantized "
                         "data-free: %s", len(left), ", ".join(left[:4]))
    return left


def quantize_embeddings(model: torch.nn.Module, cfg: QuantizeConfig) -> int:
    """Quantize every nn.Embedding table with one scale per row (per_channel),
    per block of block_size hidden values, or per table. Returns how many."""
    from coreml_pipeline.coreml.private import blockwise_compress, register_compression

    done = 0
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Embedding):
            continue
        weight = module.weight.detach().numpy().astype(np.float32)
        blocks = {"per_tensor": [0, 0], "per_channel": [1, 0], "per_block": [1, cfg.block_size]}[cfg.granularity]
        dtype = cfg.layer_dtype(name)
        n_bits = dtype_bits(dtype)
        params = blockwise_compress(weight, n_bits, SCHEMES[cfg.scheme], not dtype.startswith("u"), blocks)
        if params is None:  # the hidden size does not divide by block_size
            raise ValueError(f"quantize.block_size={cfg.block_size}: does not divide the embedding width "
                             f"{weight.shape[1]}; allowed: a divisor of every layer's input size")
        scale = torch.from_numpy(params.scale.astype(np.float32))
        # An all-zero row (the padding token's) gets scale 0, which the converter
        # would divide by; any positive scale encodes those zeros exactly.
        scale[scale == 0] = 1.0
        offset = None if params.offset is None else torch.from_numpy(params.offset.astype(np.float32))
        levels = torch.from_numpy(params.data.astype(np.float32))
        if offset is not None:
            levels = levels - expand_blocks(offset, levels.shape)
        dequantized = levels * expand_blocks(scale, levels.shape)
        with torch.no_grad():
            module.weight.copy_(dequantized)
        register_compression(module, quantization_n_bits=n_bits, quantization_scale=scale, zero_point=offset,
                             compression_type=["quantization"])  # appended to pruning, if any
        done += 1
    return done


def encode_dead_channels(model: torch.nn.Module) -> int:
    """Give every zero quantization scale the value 1; returns how many. A scale is zero only where its
    weights all are: a channel whose weights are all below float16's range (EfficientNet-Lite0 has such
    nearly dead channels) gets a scale that rounds to zero in the package, and its weights with it.
    Any positive scale encodes those zeros exactly; a zero one made ct.convert write the
    out-of-range int4 value 8 ("Value 8 is outside allowed subbyte datatype range [-8, 7]")."""
    fixed = 0
    for _, module in compressible_weights(model):
        scale = compression_metadata(module, "quantization_scale")
        if scale is None:
            continue
        zero = scale == 0
        fixed += int(zero.sum())
        with torch.no_grad():
            scale[zero] = 1.0
    return fixed


def quantize(model: torch.nn.Module, cfg: QuantizeConfig, samples: list | None = None,
             blocks: str = BERT_BLOCKS, device: str = "cpu", family=None) -> torch.nn.Module:
    """``model`` quantized by the method quantize.method names. ``family`` given, GPTQ takes its
    calibration samples and blocks from it (layer by layer for a network without a block stack)."""
    return get("quantize", cfg.method).apply(model, cfg, samples=samples, blocks=blocks, device=device, family=family)


def run(model: torch.nn.Module, cfg: QuantizeConfig, samples: list | None = None,
        log=None, blocks: str = BERT_BLOCKS, device: str = "cpu", family=None) -> torch.nn.Module:
    """The whole stage on a model in memory: quantize, then round to what the package stores."""
    if cfg.method == "none":
        return model
    log = log or runtime.log
    before = {f"{name}.weight": module.weight.detach().clone() for name, module in compressible_weights(model)}
    model = quantize(model, cfg, samples, blocks, device, family)
    round_like_package(model, log)
    dead = encode_dead_channels(model)  # after rounding: a scale below float16's range rounds to zero
    if dead:
        log.info("%d all-zero channel(s) or block(s) given scale 1 (a zero scale does not convert)", dead)
    warn_lost_rows(before, model, log)
    return model
