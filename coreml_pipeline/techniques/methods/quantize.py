"""quantize.method: none, linear (coremltools' PostTrainingQuantizer, data-free) and gptq
(GPTQ on calibration samples); the algorithms are in techniques/quantize.py."""

from __future__ import annotations

from coreml_pipeline.config.schema import QuantizeConfig, fail
from coreml_pipeline.techniques.registry import Method, pruning_source, register


class QuantizeMethod(Method):
    section = "quantize"

    def apply(self, model, cfg, **inputs):
        from coreml_pipeline.techniques.quantize import quantize_embeddings

        model = self.quantize_layers(model, cfg, **inputs)
        if cfg.embeddings:
            quantize_embeddings(model, cfg)
        return model

    def quantize_layers(self, model, cfg, **inputs):
        raise NotImplementedError


@register
class NoQuantize(QuantizeMethod):
    name = "none"

    def check(self, cfg: QuantizeConfig, prefix: str) -> None:
        if cfg.layer_dtypes:
            fail(f"{prefix}.layer_dtypes", dict(cfg.layer_dtypes), "allowed: {} with method=none")

    def apply(self, model, cfg, **inputs):
        return model


@register
class LinearQuantize(QuantizeMethod):
    """coremltools' PostTrainingQuantizer, data-free."""

    name = "linear"

    def quantize_layers(self, model, cfg, **inputs):
        from coreml_pipeline.techniques.quantize import linear_quantize

        return linear_quantize(model, cfg)


@register
class GPTQ(QuantizeMethod):
    """GPTQ on calibration samples: coremltools' LayerwiseCompressor over the block stack (layers
    outside it quantized data-free), or layer by layer for a network without one."""

    name = "gptq"

    def check(self, cfg: QuantizeConfig, prefix: str) -> None:
        for key, dtype in (("dtype", cfg.dtype), *((f"layer_dtypes.{p}", d) for p, d in cfg.layer_dtypes.items())):
            if not dtype.startswith("u"):
                fail(f"{prefix}.{key}", dtype, "allowed with method=gptq: uint8, uint4 (coremltools GPTQ)")
        if cfg.granularity == "per_tensor":
            fail(f"{prefix}.granularity", cfg.granularity, "allowed with method=gptq: per_channel, per_block")

    def samples_used(self, sections, family) -> dict[str, int]:
        from coreml_pipeline.techniques.layerwise import family_samples

        return {"quantize.num_samples": len(family_samples(family, sections["quantize"].num_samples))}

    def check_with(self, sections) -> None:
        source = pruning_source(sections)
        if source:
            fail("quantize.method", "gptq", f"with {source}: GPTQ updates every weight and refills "
                 "pruned zeros; use quantize.method=linear for sparse quantization")

    def quantize_layers(self, model, cfg, samples=None, blocks=None, device="cpu", family=None, **inputs):
        from coreml_pipeline.techniques import layerwise
        from coreml_pipeline.techniques.quantize import module_config, outside_blocks

        per_layer = {pattern: module_config(cfg, dtype) for pattern, dtype in cfg.layer_dtypes.items()}
        model = layerwise.compress(model, "gptq", module_config(cfg), cfg.num_samples, device, family, samples, blocks,
                                   name_options=per_layer)
        outside_blocks(model, cfg)  # the layers GPTQ left: outside the block stack (a head), grouped convolutions
        return model
