"""A whole params.yaml checked, before any work: every section's shared options
(config/schema.py), then each chosen compression method's own rules and the
joint compressions it refuses (the method classes registered in
techniques/registry.py). The validate stage, sweeps and the mixed-bit tool run
this; a technique stage checks its own method again (registry.method) before
it loads weights, so running one stage by hand is refused the same way."""

from __future__ import annotations

import re
from typing import Any

from coreml_pipeline.config import schema
from coreml_pipeline.techniques import registry

# Importing the method modules registers every method (light: no torch, no coremltools);
# palettize.grouping_axis is the palettize stage's grouping rule, on shapes.
from coreml_pipeline.techniques.methods import finetune, palettize, prune, quantize  # noqa: F401,E402


def validate(params: dict, sections: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The named sections (all when None) as dataclasses, every rule passed; one ConfigError line otherwise."""
    checked = schema.validate(params, sections)
    registry.check(checked)
    if "data" in checked:  # your own table files: read and their columns checked before any model loads
        from coreml_pipeline.families.tables import check_splits

        check_splits(checked["data"])
    return checked


def _groups(layer: dict, pal: Any, group: int) -> bool:
    """Whether the palettize stage can group this layer by ``group``: the axis it groups along
    (grouping_axis, the stage's own rule) divides by it; else coremltools would skip the layer."""
    axis = palettize.grouping_axis(layer["kind"] == "Embedding", layer["shape"], pal, group)
    return layer["shape"][axis] % group == 0


def _block_fits(layer: dict, block: int) -> bool:
    """Whether quantize.block_size blocks this layer's input channels: coremltools' torch quantizer
    needs it to divide them and be smaller (else it skips the layer with a warning); the embedding
    tables' block-wise quantizer needs it to divide their width."""
    width = layer["shape"][1]
    return width % block == 0 and (block < width or layer["kind"] == "Embedding")


def _describe(layer: dict) -> str:
    return f"{layer['name']} ({layer['kind']} {'x'.join(map(str, layer['shape']))})"


def _check_patterns_match(key: str, patterns: dict, names: list[str], what: str) -> None:
    """Every pattern of a per-layer option fully matches one of the layers it applies to."""
    for pattern in patterns:
        if not any(re.fullmatch(pattern, name) for name in names):
            schema.fail(key, pattern, f"allowed: a regex matching {what} layer names such as {', '.join(names[:3])}")


def check_shapes(sections: dict[str, Any], layers: list[dict]) -> None:
    """The options that depend on the model's shapes, against its layer table (the inspect stage's):
    one ConfigError line naming the key, the value, the first layer it does not fit and what fits."""
    pal, quant = sections.get("palettize"), sections.get("quantize")
    if pal is not None and pal.method != "none":
        palettized = [layer for layer in layers if pal.embeddings.enabled or layer["kind"] != "Embedding"]
        _check_patterns_match("palettize.layer_bits", pal.layer_bits, [layer["name"] for layer in palettized],
                              "palettized")
        if pal.granularity == "per_grouped_channel":
            misfit = [layer for layer in palettized if not _groups(layer, pal, pal.group_size)]
            if misfit:
                fits = [g for g in range(1, 257) if all(_groups(layer, pal, g) for layer in palettized)]
                schema.fail("palettize.group_size", pal.group_size,
                            f"divides no channel count of {_describe(misfit[0])}"
                            f"{f' and {len(misfit) - 1} more layer(s)' if len(misfit) > 1 else ''}; allowed with "
                            f"this model: {', '.join(map(str, fits[:12]))}")
        if pal.cluster_dim > 1:
            misfit = [layer for layer in palettized
                      if layer["shape"][pal.embeddings.channel_axis if layer["kind"] == "Embedding" else 0]
                      % pal.cluster_dim]
            if misfit:
                schema.fail("palettize.cluster_dim", pal.cluster_dim,
                            f"does not divide the channel axis of {_describe(misfit[0])}")
    if quant is not None and quant.method != "none":
        _check_patterns_match("quantize.layer_dtypes", quant.layer_dtypes,
                              [layer["name"] for layer in layers if quant.embeddings or layer["kind"] != "Embedding"],
                              "quantized")
    if quant is not None and quant.method != "none" and quant.granularity == "per_block":
        misfit = [layer for layer in layers if not _block_fits(layer, quant.block_size)]
        if misfit:
            fits = [b for b in range(2, 1025) if all(_block_fits(layer, b) for layer in layers)]
            schema.fail("quantize.block_size", quant.block_size,
                        f"does not block the input channels of {_describe(misfit[0])} (it must divide them and "
                        f"be smaller); allowed with this model: {', '.join(map(str, fits[:12])) or 'none'}")


def check_combination(sections: dict[str, Any]) -> None:
    """Every rule across the given sections (built dataclasses), the methods' included."""
    schema.check_combination(sections)
    registry.check(sections)
