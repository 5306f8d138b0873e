"""Training-time compression (DKM palettization, QAT, gradual pruning) with coremltools.optimize.torch;
the finetune stage (stages/finetune.py) runs it on the pruned weights."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.nn.utils import parametrize

from coreml_pipeline.config.schema import FinetuneConfig, QuantizeConfig
from coreml_pipeline.model import COREML_PREFIX, PALETTIZATION, compression_types
from coreml_pipeline.runtime import progress
from coreml_pipeline.techniques.methods import finetune as _registers_methods  # noqa: F401
from coreml_pipeline.techniques.registry import get


class FakeQuantize(torch.nn.Module):
    """w -> scale * round(w / scale) in the forward pass, identity gradient
    (straight-through estimator); symmetric or affine, per tensor, channel or block."""

    def __init__(self, cfg: QuantizeConfig):
        super().__init__()
        self.cfg = cfg
        self.levels = 2 ** cfg.n_bits - 1

    def _blocks(self, weight: torch.Tensor) -> torch.Tensor:
        if self.cfg.granularity == "per_tensor":
            return weight.reshape(1, 1, -1)
        block = weight.shape[1] if self.cfg.granularity == "per_channel" else self.cfg.block_size
        return weight.reshape(weight.shape[0], -1, block)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        blocks = self._blocks(weight)
        if self.cfg.scheme == "symmetric":
            scale = blocks.abs().amax(-1, keepdim=True).clamp(min=1e-12) / (self.levels / 2)
            quantized = torch.round(blocks / scale).clamp(-(self.levels + 1) // 2, self.levels // 2) * scale
        else:
            low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
            scale = (high - low).clamp(min=1e-12) / self.levels
            quantized = (torch.round((blocks - low) / scale).clamp(0, self.levels)) * scale + low
        return blocks.add((quantized - blocks).detach()).reshape(weight.shape)


def prepare(model: torch.nn.Module, cfg: FinetuneConfig):
    """Returns (model to train, coremltools compressor or None)."""
    return get("finetune", cfg.method).prepare(model, cfg)


def finish(model: torch.nn.Module, cfg: FinetuneConfig, compressor) -> torch.nn.Module:
    """Plain weights for the downstream stage to store (pruning metadata kept)."""
    return get("finetune", cfg.method).finish(model, cfg, compressor)


def train(model: torch.nn.Module, cfg: FinetuneConfig, data, loss: Callable, log) -> torch.nn.Module:
    """``model`` trained on the batches ``data`` against ``loss(model, batch)`` (the family's
    train_loss, a batch mean) while the finetune method compresses it."""
    torch.manual_seed(cfg.seed)
    model.train()
    model, compressor = prepare(model, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
    recent: list[float] = []
    for step, batch in enumerate(progress(data, f"finetune {cfg.method}", total=cfg.steps, unit="step"), start=1):
        value = loss(model, batch)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        schedule.step()
        if compressor is not None:
            compressor.step()
        recent.append(value.item())
        if step % cfg.log_every == 0 or step == cfg.steps:
            log.info("finetune %s step %d/%d loss %.5f", cfg.method, step, cfg.steps, sum(recent) / len(recent))
            recent = []
    return finish(model, cfg, compressor).eval()


# The methods' algorithms (methods/finetune.py registers the classes that call them).
def dkm_prepare(model: torch.nn.Module, cfg: FinetuneConfig):
    from coremltools.optimize.torch.palettization import DKMPalettizer, DKMPalettizerConfig

    palettize = cfg.palettize
    grouped = palettize.granularity == "per_grouped_channel"
    # Initial tables by exact 1-D k-means (as PostTrainingPalettizer), not DKM's default of
    # 10 random k-means++ runs per group, which takes many minutes per layer on a CPU.
    start = {"kmeans_init": "opt1d", "kmeans_n_init": 1, "weight_threshold": 0}
    linear = {"n_bits": palettize.n_bits, "granularity": palettize.granularity, **start,
              "group_size": palettize.group_size if grouped else None}
    # DKM groups along axis 0 only, and the vocabulary (30522 rows) divides by no useful group:
    # one table per embedding. The palettize stage's per-group tables along the hidden axis
    # then hold the same <= 2**n_bits values.
    embedding = {"n_bits": palettize.embeddings.n_bits or palettize.n_bits, **start}
    compressor = DKMPalettizer(model, DKMPalettizerConfig.from_dict({"module_type_configs": {
        "Linear": linear, "Embedding": embedding if palettize.embeddings.enabled else None}}))
    return compressor.prepare(inplace=True), compressor


def dkm_finish(model: torch.nn.Module, cfg: FinetuneConfig, compressor) -> torch.nn.Module:
    """Plain weights; DKM's own tables dropped (the palettize stage registers the ones it stores)."""
    if compressor is not None:
        model = compressor.finalize(inplace=True)
    # The palettize stage registers the tables it stores; drop DKM's own.
    for _, module in model.named_modules():
        if PALETTIZATION in compression_types(module):
            for name in [n for n, _ in module.named_buffers(recurse=False) if n.startswith(COREML_PREFIX)]:
                delattr(module, name)
    return model


def qat_prepare(model: torch.nn.Module, cfg: FinetuneConfig):
    quantize = cfg.quantize
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or (isinstance(module, torch.nn.Embedding) and quantize.embeddings):
            parametrize.register_parametrization(module, "weight", FakeQuantize(quantize))
    return model, None


def qat_finish(model: torch.nn.Module, cfg: FinetuneConfig, compressor) -> torch.nn.Module:
    if compressor is not None:
        model = compressor.finalize(inplace=True)
    for _, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def gradual_prune_prepare(model: torch.nn.Module, cfg: FinetuneConfig):
    from coremltools.optimize.torch.pruning import MagnitudePruner, MagnitudePrunerConfig

    compressor = MagnitudePruner(model, MagnitudePrunerConfig.from_dict({"module_type_configs": {"Linear": {
        "initial_sparsity": 0.0, "target_sparsity": float(cfg.target_sparsity),
        # reach the target at 3/4 of the run, then train at it
        "scheduler": {"update_steps": list(range(0, max(1, 3 * cfg.steps // 4), max(1, cfg.steps // 20)))}}}}))
    return compressor.prepare(inplace=True), compressor
