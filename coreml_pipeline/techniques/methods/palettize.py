"""palettize.method: none, kmeans, sensitive_kmeans (k-means weighted by the calibrate
stage's sensitivity) and uniform; the algorithms are in techniques/palettize.py."""

from __future__ import annotations

from coreml_pipeline.config.schema import PalettizeConfig, fail
from coreml_pipeline.techniques.registry import Method, pruning_source, register

# What exact_dp computes: scalar look-up entries in float tables, with or without per-channel scales
# (key, the one value it takes). coremltools' palettizers do the rest.
EXACT_DP_ONLY_WITH = (("cluster_dim", 1),)


def grouping_axis(embedding: bool, shape: tuple[int, ...], cfg: PalettizeConfig, group: int | None) -> int:
    """The axis a layer's channels are grouped along. Embeddings: palettize.embeddings.channel_axis.
    Linear and Conv: output channels (axis 0), as coremltools does; when they do not divide by
    ``group`` but the input channels do (a 1000-class head, an LM head over 50257 tokens), the
    input channels (axis 1), which coremltools also supports, rather than leaving it uncompressed.
    On shapes alone, so that validate applies the palettize stage's own rule before any weight loads."""
    if embedding:
        return cfg.embeddings.channel_axis
    if cfg.granularity != "per_grouped_channel" or shape[0] % group == 0:
        return 0
    return 1 if shape[1] % group == 0 else 0


class PalettizeMethod(Method):
    section = "palettize"
    # Tables found by k-means: palettize.kmeans_solver=exact_dp can compute them.
    kmeans = False
    # Weighted by the calibrate stage's sensitivity (the palettize stage loads it).
    needs_sensitivity = False

    def exact_dp_refusal(self, cfg: PalettizeConfig, prefix: str = "palettize") -> str | None:
        """Why exact_dp cannot compute this section's tables (what is allowed instead), or None."""
        if not self.kmeans:
            return f"allowed with method=kmeans or sensitive_kmeans (got method={cfg.method}): auto or coremltools"
        for key, only in EXACT_DP_ONLY_WITH:
            value = getattr(cfg, key)
            if value != only:
                return (f"allowed with {prefix}.{key}={only} only (got {value}): use kmeans_solver=auto "
                        "(coremltools here) or coremltools")
        return None

    def solver(self, cfg: PalettizeConfig) -> str:
        """The solver that computes the tables: kmeans_solver, with auto resolved to exact_dp wherever it
        applies (the optimal tables, several times faster: docs/benchmarks.md) and coremltools elsewhere."""
        if cfg.kmeans_solver != "auto":
            return cfg.kmeans_solver
        return "coremltools" if self.exact_dp_refusal(cfg) else "exact_dp"

    def check(self, cfg: PalettizeConfig, prefix: str) -> None:
        if cfg.kmeans_solver == "exact_dp":
            refusal = self.exact_dp_refusal(cfg, prefix)
            if refusal:
                fail(f"{prefix}.kmeans_solver", cfg.kmeans_solver, refusal)

    def check_with(self, sections) -> None:
        palettize, quantize = sections["palettize"], sections.get("quantize")
        if quantize is not None and quantize.method != "none":
            fail("quantize.method", quantize.method,
                 f"palettize.method={palettize.method} already compresses every weight; quantize its look-up table "
                 "with palettize.lut_dtype=int8, or set palettize=none for linear quantization")
        source = pruning_source(sections)
        if source and palettize.cluster_dim > 1:
            fail("palettize.cluster_dim", palettize.cluster_dim,
                 f"allowed: 1 with {source} (coremltools has no sparse vector palettization)")
        if source and palettize.lut_dtype:
            # ct.convert 9.0 fails on pruning + palettization + quantized table ("weight should have same rank as scale").
            fail("palettize.lut_dtype", palettize.lut_dtype,
                 f"allowed: null with {source} (coremltools cannot convert sparse palettization "
                 "with a quantized look-up table)")


@register
class NoPalettize(PalettizeMethod):
    name = "none"

    def check(self, cfg: PalettizeConfig, prefix: str) -> None:
        if cfg.layer_bits:
            fail(f"{prefix}.layer_bits", dict(cfg.layer_bits), "allowed: {} with method=none")
        super().check(cfg, prefix)

    def check_with(self, sections) -> None:
        pass

    def apply(self, model, cfg, **inputs):
        return model


@register
class KMeans(PalettizeMethod):
    """k-means look-up tables per group: coremltools' PostTrainingPalettizer, or the exact solver."""

    name = "kmeans"
    kmeans = True

    def apply(self, model, cfg, sensitivity=None, **inputs):
        from coreml_pipeline.techniques.palettize import coremltools_kmeans, exact_palettize

        weights = sensitivity if self.needs_sensitivity else None
        if self.solver(cfg) == "exact_dp":
            return exact_palettize(model, cfg, weights)
        return coremltools_kmeans(model, cfg, weights)


@register
class SensitiveKMeans(KMeans):
    """k-means weighted by the calibrate stage's sensitivity: coremltools' SKMPalettizer, or the exact solver."""

    name = "sensitive_kmeans"
    needs_sensitivity = True

    def check(self, cfg: PalettizeConfig, prefix: str) -> None:
        super().check(cfg, prefix)
        if cfg.cluster_dim > 1:
            fail(f"{prefix}.cluster_dim", cfg.cluster_dim, "allowed: 1 with method=sensitive_kmeans; use kmeans")

    def samples_used(self, sections, family) -> dict[str, int]:
        calibrate = sections["calibrate"]
        return {"calibrate.num_samples": len(family.calibration_samples(calibrate.num_samples, calibrate.seed))}

    def apply(self, model, cfg, sensitivity=None, **inputs):
        if sensitivity is None:
            raise ValueError("palettize.method=sensitive_kmeans needs the calibrate stage's sensitivity")
        return super().apply(model, cfg, sensitivity, **inputs)


@register
class Uniform(PalettizeMethod):
    """Evenly spaced look-up tables (coremltools' Core ML-side UNIFORM mode on torch weights)."""

    name = "uniform"

    def check(self, cfg: PalettizeConfig, prefix: str) -> None:
        if cfg.cluster_dim > 1 or cfg.enable_per_channel_scale or cfg.lut_dtype:
            fail(f"{prefix}.method", cfg.method,
                 "uniform look-up tables take no cluster_dim, enable_per_channel_scale or lut_dtype (coremltools)")
        super().check(cfg, prefix)

    def check_with(self, sections) -> None:
        super().check_with(sections)
        source = pruning_source(sections)
        if source:
            fail("palettize.method", "uniform", f"with {source}: a uniform table has no zero entry, "
                 "pruned zeros would be lost; use kmeans or sensitive_kmeans")

    def apply(self, model, cfg, **inputs):
        from coreml_pipeline.techniques.palettize import uniform_palettize

        return uniform_palettize(model, cfg)
