"""Pruning of torch weights: coremltools' magnitude pruner, and SparseGPT through its
LayerwiseCompressor (or layer by layer for families without a block stack)."""

from __future__ import annotations

import torch

from coreml_pipeline.config.schema import PruneConfig
from coreml_pipeline.model import BERT_BLOCKS, WEIGHT_LAYER_TYPES, subclass_configs
from coreml_pipeline.techniques.methods import prune as _registers_methods  # noqa: F401
from coreml_pipeline.techniques.registry import get

# The layers coremltools' MagnitudePruner prunes; embeddings stay dense.


def magnitude_prune(model: torch.nn.Module, cfg: PruneConfig) -> torch.nn.Module:
    from coremltools.optimize.torch.pruning import MagnitudePruner, MagnitudePrunerConfig

    module_cfg = {"target_sparsity": float(cfg.target_sparsity), "block_size": cfg.block_size}
    if cfg.n_m_ratio:
        module_cfg["n_m_ratio"] = tuple(cfg.n_m_ratio)
    pruner = MagnitudePruner(model, MagnitudePrunerConfig.from_dict(
        {"module_type_configs": {kind: module_cfg for kind in WEIGHT_LAYER_TYPES},
         "module_name_configs": subclass_configs(model, WEIGHT_LAYER_TYPES, module_cfg)}))
    pruner.prepare(inplace=True)
    pruner.step()  # one step of the constant scheduler (begin_step 0) applies the full target
    return pruner.finalize(inplace=True)


def sparse_gpt_options(cfg: PruneConfig) -> dict:
    # SparseGPT would also quantize to uint8 by default; this stage only prunes.
    options = {"target_sparsity": float(cfg.target_sparsity), "weight_dtype": "float32"}
    if cfg.n_m_ratio:
        options["n_m_ratio"] = tuple(cfg.n_m_ratio)
    return options


def prune(model: torch.nn.Module, cfg: PruneConfig, samples: list[torch.Tensor] | None = None,
          blocks: str = BERT_BLOCKS, device: str = "cpu") -> torch.nn.Module:
    """``model`` pruned by the method prune.method names (samples: sparse_gpt's calibration inputs)."""
    return get("prune", cfg.method).apply(model, cfg, samples=samples, blocks=blocks, device=device)
