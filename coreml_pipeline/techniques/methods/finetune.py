"""finetune.method: none, dkm (differentiable k-means tables), qat (quantization-aware
training) and gradual_prune; the training loop and the algorithms are in techniques/finetune.py."""

from __future__ import annotations

from coreml_pipeline.config.schema import FinetuneConfig, fail
from coreml_pipeline.techniques.registry import Method, register


class FinetuneMethod(Method):
    section = "finetune"
    # The section this method trains against (finetune.<target> must equal it), and the method
    # that section must have to store the result.
    target: str | None = None
    stored_by: str | None = None

    def prepare(self, model, cfg: FinetuneConfig):
        """(model to train, coremltools compressor or None)."""
        return model, None

    def finish(self, model, cfg: FinetuneConfig, compressor):
        return compressor.finalize(inplace=True) if compressor is not None else model

    def check_with(self, sections) -> None:
        if self.target is None:
            return
        own, method = sections.get(self.target), self.name
        if own is not None and own.method != self.stored_by:
            what = "store the learned tables" if self.target == "palettize" else "store the trained weights"
            fail("finetune.method", method, f"needs {self.target}.method={self.stored_by} to {what} "
                 f"(got {own.method})")
        if own is not None and getattr(sections["finetune"], self.target) != own:
            fail(f"finetune.{self.target}", "(differs)", f"finetune.method={method} trains against the "
                 f"{self.target} section; finetune.{self.target} must equal it (conf/finetune/{method}.yaml "
                 f"interpolates ${{{self.target}}})")


@register
class NoFinetune(FinetuneMethod):
    name = "none"


@register
class DKM(FinetuneMethod):
    """coremltools' DKMPalettizer learns look-up tables while training; palettize (kmeans) stores them."""

    name = "dkm"
    target, stored_by = "palettize", "kmeans"

    def check_with(self, sections) -> None:
        super().check_with(sections)
        palettize = sections.get("palettize")
        if palettize is not None and palettize.layer_bits:
            fail("finetune.method", self.name, "allowed with palettize.layer_bits={} only (DKM trains one bit width)")

    def prepare(self, model, cfg: FinetuneConfig):
        from coreml_pipeline.techniques.finetune import dkm_prepare

        return dkm_prepare(model, cfg)

    def finish(self, model, cfg: FinetuneConfig, compressor):
        from coreml_pipeline.techniques.finetune import dkm_finish

        return dkm_finish(model, cfg, compressor)


@register
class QAT(FinetuneMethod):
    """Quantization-aware training (fake quantization, straight-through); quantize (linear) stores it."""

    name = "qat"
    target, stored_by = "quantize", "linear"

    def check_with(self, sections) -> None:
        super().check_with(sections)
        quantize = sections.get("quantize")
        if quantize is not None and quantize.layer_dtypes:
            fail("finetune.method", self.name, "allowed with quantize.layer_dtypes={} only (QAT trains one dtype)")

    def prepare(self, model, cfg: FinetuneConfig):
        from coreml_pipeline.techniques.finetune import qat_prepare

        return qat_prepare(model, cfg)

    def finish(self, model, cfg: FinetuneConfig, compressor):
        from coreml_pipeline.techniques.finetune import qat_finish

        return qat_finish(model, cfg, compressor)


@register
class GradualPrune(FinetuneMethod):
    """coremltools' MagnitudePruner raising sparsity to finetune.target_sparsity while training."""

    name = "gradual_prune"

    def check_with(self, sections) -> None:
        prune = sections.get("prune")
        if prune is not None and prune.method != "none":
            fail("finetune.method", self.name, f"prunes while training; set prune.method=none (got {prune.method})")

    def prepare(self, model, cfg: FinetuneConfig):
        from coreml_pipeline.techniques.finetune import gradual_prune_prepare

        return gradual_prune_prepare(model, cfg)
