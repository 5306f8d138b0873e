"""prune.method: none, magnitude (coremltools' MagnitudePruner, data-free) and sparse_gpt
(SparseGPT on calibration samples); the algorithms are in techniques/prune.py."""

from __future__ import annotations

from coreml_pipeline.config.schema import PruneConfig, fail
from coreml_pipeline.techniques.registry import Method, register


class PruneMethod(Method):
    section = "prune"
    # Blocks of output channels pruned together (prune.block_size > 1): magnitude only.
    block_pruning = False

    def check(self, cfg: PruneConfig, prefix: str) -> None:
        if cfg.block_size > 1 and (not self.block_pruning or cfg.n_m_ratio):
            fail(f"{prefix}.block_size", cfg.block_size, "allowed: 1, unless method=magnitude without n_m_ratio")
        self.check_target(cfg, prefix)

    def check_target(self, cfg: PruneConfig, prefix: str) -> None:
        """A pruning method needs a sparsity: target_sparsity or an n:m ratio."""
        if cfg.target_sparsity == 0 and not cfg.n_m_ratio:
            fail(f"{prefix}.target_sparsity", cfg.target_sparsity, f"allowed: (0, 1) when method={self.name}")


@register
class NoPrune(PruneMethod):
    name = "none"

    def check_target(self, cfg: PruneConfig, prefix: str) -> None:
        if cfg.target_sparsity > 0 or cfg.n_m_ratio:
            fail(f"{prefix}.method", cfg.method, "target_sparsity and n_m_ratio need method magnitude or sparse_gpt")

    def apply(self, model, cfg, **inputs):
        return model


@register
class MagnitudePrune(PruneMethod):
    """coremltools' MagnitudePruner, data-free: unstructured, n:m or blocks of output channels."""

    name = "magnitude"
    block_pruning = True

    def apply(self, model, cfg, **inputs):
        from coreml_pipeline.techniques.prune import magnitude_prune

        return magnitude_prune(model, cfg)


@register
class SparseGPT(PruneMethod):
    """SparseGPT on the family's calibration samples: coremltools' LayerwiseCompressor over its
    block stack, or layer by layer (techniques/layerwise.py) for a family without one."""

    name = "sparse_gpt"

    def samples_used(self, sections, family) -> dict[str, int]:
        from coreml_pipeline.techniques.layerwise import family_samples

        return {"prune.num_samples": len(family_samples(family, sections["prune"].num_samples))}

    def apply(self, model, cfg, samples=None, blocks=None, device="cpu", family=None, **inputs):
        """``family`` given: its own calibration samples (and blocks, or layer by layer without a block stack)."""
        from coreml_pipeline.techniques import layerwise
        from coreml_pipeline.techniques.prune import sparse_gpt_options

        return layerwise.compress(model, "sparse_gpt", sparse_gpt_options(cfg), cfg.num_samples, device, family,
                                  samples, blocks)
