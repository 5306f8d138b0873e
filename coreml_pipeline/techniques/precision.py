"""Make the torch weights exactly what the .mlpackage will decode to.

The converter stores weights in float16 and rebuilds the compressed form from
the torch weight plus its ``_COREML_`` metadata. Two steps lose precision
there: pruned weights below float16 eps are dropped from the sparse data, and
scales (quantization scales, quantized look-up tables, per-channel
palettization scales) are stored as float16. Evaluating the float32 torch
weights would then score a model that is not the one shipped. These functions
apply the same rounding to the torch weights and metadata, so the convert
stage can prove the package equal to them (read-back difference 0 up to
float16 subnormals) and evaluate scores the shipped weights.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from coreml_pipeline.model import (
    PALETTIZATION,
    PRUNING,
    QUANTIZATION,
    compressible_weights,
    compression_metadata,
    compression_types,
)

FLOAT16_EPS = float(np.finfo(np.float16).eps)
# Elements of the (rows x look-up entries) distance array find_indices_for_lut may build at once.
INDEX_SEARCH_ELEMENTS = 1 << 24


def find_indices_for_lut(data: np.ndarray, lut: np.ndarray, vector_axis: int | None = None) -> np.ndarray:
    """coremltools' ``optimize._utils.find_indices_for_lut``, a block of rows at a time.

    The original compares every weight with every look-up entry at once: for an
    8-bit palettized word embedding (30522 x 384 x 256) that is tens of GB, and
    conversion was killed at 24 GB. The nearest entry of each weight does not
    depend on the others, so row blocks (aligned to the tables' row groups) give
    the same indices in bounded memory. Vector tables go to the original.
    """
    from coreml_pipeline.coreml.private import coremltools_find_indices_for_lut

    original = coremltools_find_indices_for_lut()
    if lut.shape[-1] > 1 or data.ndim == 0 or data.shape[0] % lut.shape[0]:
        return original(data, lut, vector_axis)
    # Blocks of whole table rows: any rows when one table spans axis 0, else multiples of its row group.
    shared = lut.shape[0] == 1
    unit = 1 if shared else data.shape[0] // lut.shape[0]
    per_row = max(1, data[0].size * lut.shape[-2])
    step = max(1, INDEX_SEARCH_ELEMENTS // per_row // unit) * unit
    if step >= data.shape[0]:
        return original(data, lut, vector_axis)
    parts = [original(data[start:start + step], lut if shared else lut[start // unit:(start + step) // unit],
                      vector_axis) for start in range(0, data.shape[0], step)]
    # The packed width (uint4, uint6...) rides in the dtype's metadata, which concatenate drops; the
    # converter's sparse look-up op (pruning + palettization) then refuses plain uint8 indices.
    return np.concatenate(parts).view(parts[0].dtype)


@contextmanager
def bounded_index_search():
    """Make the converter (which calls coremltools' find_indices_for_lut for every
    palettized weight) use the row-block search while the block runs."""
    from coreml_pipeline.coreml.private import converter_index_search

    with converter_index_search(find_indices_for_lut):
        yield


def _to_float16_grid(tensor: torch.Tensor) -> torch.Tensor:
    """The nearest float16 values, kept in the tensor's own dtype."""
    return tensor.to(torch.float16).to(tensor.dtype)


def expand_blocks(scale: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Repeat per-block values over their blocks (as the converter does). A scale with fewer
    axes than the weight (GPTQ's (out, 1) for a convolution) covers the missing ones whole."""
    scale = scale.reshape(*scale.shape, *[1] * (len(shape) - scale.ndim))
    for axis, size in enumerate(shape):
        if scale.shape[axis] not in (1, size):
            scale = scale.repeat_interleave(size // scale.shape[axis], dim=axis)
    return scale


def snap_like_converter(model: torch.nn.Module) -> None:
    """The converter stores a pruned weight as sparse data and drops every
    |w| < float16 eps (2**-10) from it; do the same to the torch weights and
    their look-up tables."""
    for _, module in compressible_weights(model):
        if PRUNING not in compression_types(module):
            continue
        with torch.no_grad():
            module.weight[module.weight.abs() < FLOAT16_EPS] = 0.0
            lut = compression_metadata(module, "lut")
            if lut is not None:
                lut[lut.abs() < FLOAT16_EPS] = 0.0


def _requantize(values: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """values = scale * (q - zero_point) with q an integer: the same q with a float16 scale."""
    full_scale = expand_blocks(scale.to(values.dtype), values.shape)
    offset = 0 if zero_point is None else expand_blocks(zero_point.to(values.dtype), values.shape)
    # An all-zero row (a padding embedding) can have a zero scale: its levels are 0.
    ratio = torch.where(full_scale == 0, torch.zeros_like(values), values / torch.where(full_scale == 0, 1, full_scale))
    levels = torch.round(ratio + offset) - offset
    return levels * expand_blocks(_to_float16_grid(scale).to(values.dtype), values.shape)


def match_package_precision(model: torch.nn.Module) -> int:
    """Round every scale to float16 and rebuild the weights from it. Returns how
    many weights changed representation."""
    from coreml_pipeline.coreml.private import lut_to_dense  # the converter's own table decoding

    changed = 0
    for _, module in compressible_weights(model):
        kinds = compression_types(module)
        scale, zero_point = compression_metadata(module, "quantization_scale"), compression_metadata(module, "zero_point")
        lut, channel_scale = compression_metadata(module, "lut"), compression_metadata(module, "palettization_scale")
        weight = module.weight.detach()
        with torch.no_grad():
            if QUANTIZATION in kinds and PALETTIZATION not in kinds:
                module.weight.copy_(_requantize(weight, scale, zero_point))
                scale.copy_(_to_float16_grid(scale))
            elif PALETTIZATION in kinds and (scale is not None or channel_scale is not None):
                vector_axis = compression_metadata(module, "vector_axis")
                vector_axis = None if vector_axis is None else int(vector_axis)
                full_channel_scale = None if channel_scale is None else expand_blocks(channel_scale, weight.shape)
                plain = weight if full_channel_scale is None else weight / full_channel_scale
                lut_np = lut.numpy()
                lut_np = lut_np[..., None] if lut_np.ndim == weight.ndim + 1 else lut_np
                indices = find_indices_for_lut(plain.numpy(), lut_np, vector_axis)
                if scale is not None:  # a quantized look-up table
                    lut.copy_(_requantize(lut, scale.reshape(scale.shape[:lut.ndim]), zero_point if zero_point is None
                                          else zero_point.reshape(zero_point.shape[:lut.ndim])))
                    scale.copy_(_to_float16_grid(scale))
                else:
                    lut.copy_(_to_float16_grid(lut))
                lut_np = lut.numpy()
                lut_np = lut_np[..., None] if lut_np.ndim == weight.ndim + 1 else lut_np
                rebuilt = torch.from_numpy(lut_to_dense(indices, lut_np, vector_axis)).to(weight.dtype)
                if channel_scale is not None:
                    channel_scale.copy_(_to_float16_grid(channel_scale))
                    rebuilt = rebuilt * expand_blocks(channel_scale, weight.shape)
                module.weight.copy_(rebuilt.reshape(weight.shape))
            else:
                continue
        changed += 1
    return changed


def round_like_package(model: torch.nn.Module, log) -> None:
    """Both steps above, as the palettize and quantize stages end."""
    snap_like_converter(model)
    rounded = match_package_precision(model)
    if rounded:
        log.info("rounded the scales of %d weights to float16, as the package stores them", rounded)


def warn_lost_rows(before: dict[str, torch.Tensor], model: torch.nn.Module, log, threshold: float = 0.5) -> int:
    """Warn about output rows whose compressed weights keep less than half their
    content (relative error above ``threshold``). A layer's mean error hides them,
    yet one such row can sink the model: with per-channel scales and a per-tensor
    table, MiniLM's outlier hidden feature (row 99 of each FFN output) loses
    almost all its weights. Returns how many rows were named."""
    named = 0
    for name, module in compressible_weights(model):
        reference = before[f"{name}.weight"].float()
        reference_norm = reference.norm(dim=1)
        error = (module.weight.detach().float() - reference).norm(dim=1)
        lost = torch.nonzero((error > threshold * reference_norm) & (reference_norm > 0)).flatten().tolist()
        if lost:
            named += len(lost)
            log.warning("%s: %d of %d rows keep less than half their weight (relative error > %.2f): rows %s",
                        name, len(lost), reference.shape[0], threshold, lost[:8])
    return named
