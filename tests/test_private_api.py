"""Every private coremltools API the pipeline uses (coreml_pipeline/coreml/private.py): its signature
and behaviour pinned, so that a coremltools change fails here, loudly, and not quietly in a stage."""

from __future__ import annotations

import importlib
import inspect
import sys

import numpy as np
import pytest
import torch

from coreml_pipeline.coreml import private
from coreml_pipeline.model import PALETTIZATION, QUANTIZATION, compression_metadata, compression_types

# Parameter names of each private callable in coremltools 9.0.
SIGNATURES = {
    "coremltools._deps._kmeans1d.cluster": ["array", "k", "weights"],
    "metadata_utils.CompressionMetadata": ["param_name", "quantization_n_bits", "quantization_scale", "zero_point",
                                           "lut", "palettization_scale", "vector_axis", "compression_type"],
    "metadata_utils.register_metadata_version": ["model"],
    "palettize_weights._get_lut_and_indices": ["val", "mode", "nbits", "lut_function", "cluster_dim", "vector_axis"],
    "linear_quantize_weights.blockwise_compress": ["original_data", "nbits", "mode", "signed", "block_sizes"],
    "WeightDecompressor": ["op_selector"],
    "optimize._utils.find_indices_for_lut": ["data", "lut", "vector_axis"],
    "optimize._utils.lut_to_dense": ["indices", "lut", "vector_axis"],
}


def test_every_private_callable_keeps_its_signature():
    assert set(private.PRIVATE_CALLABLES) == set(SIGNATURES)
    for name, function in private.PRIVATE_CALLABLES.items():
        assert list(inspect.signature(function).parameters) == SIGNATURES[name], name


def test_another_coremltools_version_is_refused_in_one_line(monkeypatch):
    import coremltools

    monkeypatch.setattr(coremltools, "__version__", "9.1")
    monkeypatch.delitem(sys.modules, "coreml_pipeline.coreml.private")
    with pytest.raises(ImportError) as error:
        importlib.import_module("coreml_pipeline.coreml.private")
    message = str(error.value)
    assert "\n" not in message and "coremltools 9.1 is installed" in message and "coremltools==9.0" in message
    # A stage's command line prints that one line and exits 2 (runtime.run_cli), no traceback.
    from coreml_pipeline.runtime import run_cli

    def stage_main(argv):
        importlib.import_module("coreml_pipeline.coreml.private")

    assert run_cli(stage_main, []) == 2


def test_exact_kmeans_finds_the_obvious_clusters():
    centroids, clusters = private.kmeans1d([0.0, 0.1, 5.0, 5.2, 9.0], 3)
    np.testing.assert_allclose(centroids, [0.05, 5.1, 9.0])
    assert list(clusters) == [0, 0, 1, 1, 2]
    weighted, _ = private.kmeans1d([0.0, 1.0], 1, weights=[3.0, 1.0])
    np.testing.assert_allclose(weighted, [0.25])


def test_registered_metadata_is_what_the_reader_reads():
    layer = torch.nn.Linear(4, 2)
    lut = torch.arange(4, dtype=torch.float32).reshape(1, 1, 4, 1)
    private.register_compression(layer, lut=lut, compression_type=["palettization"])
    assert torch.equal(compression_metadata(layer, "lut"), lut)
    assert compression_types(layer) == [PALETTIZATION]
    private.register_compression(layer, quantization_n_bits=8, quantization_scale=torch.ones(2, 1),
                                 compression_type=["quantization"])
    assert compression_types(layer) == [PALETTIZATION, QUANTIZATION]  # appended, as coremltools does
    model = torch.nn.Sequential(layer)
    private.register_metadata_version(model)
    assert any("metadata_version" in name for name, _ in model.named_buffers())


def test_uniform_table_and_blockwise_quantization():
    values = np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)
    lut, indices = private.uniform_lut(values, 2)
    np.testing.assert_allclose(np.diff(np.sort(lut.ravel())), np.diff(np.sort(lut.ravel()))[0], rtol=1e-5)
    assert lut.size == 4 and indices.size == values.size
    params = private.blockwise_compress(values, 8, "LINEAR_SYMMETRIC", True, [1, 0])
    assert params.scale.shape == (8, 1)
    np.testing.assert_allclose(params.data * params.scale, values, atol=float(params.scale.max()))
    assert private.blockwise_compress(values, 8, "LINEAR_SYMMETRIC", True, [1, 3]) is None  # 3 does not divide 8


def test_index_search_swap_is_undone_and_decodes_back():
    from coremltools.optimize import _utils

    lut = np.array([-1.0, 0.0, 2.0, 5.0], dtype=np.float32).reshape(1, 1, 4, 1)
    data = np.array([[5.0, -1.0], [0.0, 2.0]], dtype=np.float32)
    indices = private.coremltools_find_indices_for_lut()(data, lut)
    np.testing.assert_array_equal(private.lut_to_dense(indices, lut, None), data)
    replacement = private.coremltools_find_indices_for_lut()
    with private.converter_index_search(lambda *args: replacement(*args)):
        assert _utils.find_indices_for_lut is not private.coremltools_find_indices_for_lut()
    assert _utils.find_indices_for_lut is private.coremltools_find_indices_for_lut()
