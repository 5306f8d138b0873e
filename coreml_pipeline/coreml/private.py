"""The only module that touches private coremltools APIs.

Each entry below says what it is used for and why no public API serves. The
installed coremltools must be the version they were checked against
(CHECKED_VERSION); any other version is refused at import with one line, since
a private function may change or vanish in any release without notice.
tests/test_private_api.py pins each one's signature and behaviour, so that a
change fails loudly there rather than quietly in a stage.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

import coremltools

from coreml_pipeline.config.schema import ConfigError

CHECKED_VERSION = "9.0"



class UnsupportedCoremltools(ConfigError, ImportError):
    """Another coremltools than the one these private APIs were checked against. A ConfigError, so
    that a stage's command line prints its one line and exits 2 instead of a traceback."""


if coremltools.__version__ != CHECKED_VERSION:
    raise UnsupportedCoremltools(
        f"coremltools {coremltools.__version__} is installed; coreml_pipeline uses private coremltools APIs "
        f"checked only against {CHECKED_VERSION} (coreml_pipeline/coreml/private.py); allowed: "
        f"coremltools=={CHECKED_VERSION} (requirements.txt)")

# --- coremltools._deps._kmeans1d -------------------------------------------------------
# The exact weighted 1-D k-means (an O(kn log n) dynamic program) that coremltools' own
# palettizers call. Used for sparse palettization with zero as a fixed entry and for
# mixed-bit cost tables. Public API only reaches it inside a whole palettizer pass.
from coremltools._deps import _kmeans1d  # noqa: E402


def kmeans1d(values: list[float], k: int, weights: list[float] | None = None) -> tuple[list[float], list[int]]:
    """(centroids, cluster index of each value): coremltools' exact 1-D k-means."""
    result = _kmeans1d.cluster(values, k, weights=weights)
    return result.centroids, result.clusters


# --- coremltools.optimize.torch._utils.metadata_utils ---------------------------------
# The `_COREML_/<param>/<key>` buffers ct.convert reads to emit compressed ops, and the
# metadata version it checks. The torch palettizers and quantizers register them; a
# technique that computes its own tables (exact k-means, uniform, zero-keeping k-means,
# embedding quantization) must register the same, and coremltools has no public writer.
from coremltools.optimize.torch._utils.metadata_utils import CompressionMetadata as _CompressionMetadata  # noqa: E402
from coremltools.optimize.torch._utils.metadata_utils import register_metadata_version  # noqa: E402,F401


# --- coremltools.optimize.torch._utils.k_means ----------------------------------------
# KMeans._quantize_centroids: how the torch palettizers quantize one group's look-up table
# (lut_dtype: symmetric linear, one scale per table); exact_dp's int8/uint8 tables are its
# optimal tables quantized the same way. Not exposed outside the palettizers' k-means pass.
def quantize_lut(dtype, centroids):
    """(dequantized entries, scale, zero point or None) of one look-up table, as coremltools' palettizers
    quantize it for lut_dtype ``dtype`` (torch.int8 or torch.uint8)."""
    from coremltools.optimize.torch._utils.k_means import KMeans

    return KMeans._quantize_centroids(dtype, centroids)


def register_compression(module, **fields: Any) -> None:
    """Register ``_COREML_/weight/<field>`` metadata on ``module`` (lut=, compression_type=,
    quantization_n_bits=, quantization_scale=, zero_point=), as coremltools' palettizers do."""
    _CompressionMetadata(param_name="weight", **fields).register(module)


# --- coremltools.optimize.coreml._quantization_passes ---------------------------------
# palettize_weights._get_lut_and_indices: the UNIFORM look-up table, which coremltools offers
# only on the Core ML side (OpPalettizerConfig); applied here to torch weights.
# linear_quantize_weights.blockwise_compress: the per-block scales and offsets of the Core ML
# side, for nn.Embedding tables that coremltools' torch quantizer skips.
# WeightDecompressor: decodes every constexpr op of a saved program back to dense weights,
# the read-back that proves a package holds the torch weights (no public decoder exists).
from coremltools.optimize.coreml._quantization_passes import WeightDecompressor  # noqa: E402,F401
from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights as _linear  # noqa: E402
from coremltools.optimize.coreml._quantization_passes import palettize_weights as _palettize  # noqa: E402


def uniform_lut(values, n_bits: int):
    """(look-up table, indices) of coremltools' UNIFORM palettization of ``values``."""
    return _palettize._get_lut_and_indices(values, "UNIFORM", n_bits, None)


def blockwise_compress(weight, n_bits: int, mode: str, signed: bool, block_sizes: list[int]):
    """coremltools' blockwise linear quantization (data, scale, offset) or None when blocks do not divide."""
    return _linear.blockwise_compress(weight, n_bits, mode, signed, block_sizes)


# --- coremltools.optimize._utils ----------------------------------------------------------
# find_indices_for_lut: the converter calls it for every palettized weight, and it builds a
# (weights x table) array at once (over 2 GB for an SDXL layer); the conversion swaps in a
# row-block version (techniques/precision.py) for its duration. lut_to_dense: the
# converter's own table decoding, to snap torch weights to what the package stores.
from coremltools.optimize import _utils as _optimize_utils  # noqa: E402

_ORIGINAL_FIND_INDICES: Callable = _optimize_utils.find_indices_for_lut


def coremltools_find_indices_for_lut() -> Callable:
    """coremltools' own find_indices_for_lut (as imported, before any swap)."""
    return _ORIGINAL_FIND_INDICES


@contextmanager
def converter_index_search(replacement: Callable) -> Iterator[None]:
    """The converter calls ``replacement`` instead of find_indices_for_lut inside the block."""
    _optimize_utils.find_indices_for_lut = replacement
    try:
        yield
    finally:
        _optimize_utils.find_indices_for_lut = _ORIGINAL_FIND_INDICES


def lut_to_dense(indices, lut, vector_axis):
    return _optimize_utils.lut_to_dense(indices, lut, vector_axis)


# --- coremltools.converters.mil.frontend.milproto.load -----------------------------------
# The MIL program of a saved package without a Core ML runtime (Linux): the read-back and
# the audit's weight comparison walk its ops. MLModel offers no public program loader.
def load_program(spec, weights_dir: str):
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    return milproto_load(spec, spec.specificationVersion, weights_dir)


# What tests/test_private_api.py pins: each private callable by the name used above.
PRIVATE_CALLABLES = {
    "coremltools._deps._kmeans1d.cluster": _kmeans1d.cluster,
    "metadata_utils.CompressionMetadata": _CompressionMetadata,
    "metadata_utils.register_metadata_version": register_metadata_version,
    "palettize_weights._get_lut_and_indices": _palettize._get_lut_and_indices,
    "linear_quantize_weights.blockwise_compress": _linear.blockwise_compress,
    "WeightDecompressor": WeightDecompressor,
    "optimize._utils.find_indices_for_lut": _ORIGINAL_FIND_INDICES,
    "optimize._utils.lut_to_dense": _optimize_utils.lut_to_dense,
}
