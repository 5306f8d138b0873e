"""Every compression technique, through conversion, on a tiny random BERT.

Structure tests, not quality: each recipe runs the stages' own in-memory
functions (prune, palettize, quantize), is converted with ct.convert, and the
saved program must hold the constexpr ops of that technique and decode to
exactly the torch weights (read back from the package on its own).
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_compression import pair_batches, token_batches

from coreml_pipeline import families
from coreml_pipeline.config.schema import (
    ConvertConfig,
    PalettizeConfig,
    PruneConfig,
    QuantizeConfig,
)
from coreml_pipeline.coreml import convert
from coreml_pipeline.families.sentence_embedding import SentenceEmbeddingConfig, cosine_loss
from coreml_pipeline.model import compressible_weights
from coreml_pipeline.techniques import palettize, quantize
from coreml_pipeline.techniques.calibrate import sensitivity
from coreml_pipeline.techniques.prune import prune
from coreml_pipeline.validation import check_combination

LUT, SPARSE, SCALE = "constexpr_lut_to_dense", "constexpr_sparse_to_dense", "constexpr_blockwise_shift_scale"
LUT_SPARSE, SPARSE_SCALE = "constexpr_lut_to_sparse", "constexpr_sparse_blockwise_shift_scale"
OFF = PalettizeConfig(method="none")


def pal(**options) -> PalettizeConfig:
    options.setdefault("granularity", "per_grouped_channel")
    options.setdefault("group_size", 16 if options["granularity"] == "per_grouped_channel" else None)
    # coremltools' palettizers, as before kmeans_solver=auto; the exact_dp cases name it.
    return PalettizeConfig(**{"method": "kmeans", "n_bits": 4, "num_kmeans_workers": 1, "kmeans_solver": "coremltools",
                              **options})


def quant(**options) -> QuantizeConfig:
    return QuantizeConfig(**{"method": "linear", **options})


MAGNITUDE = PruneConfig(method="magnitude", target_sparsity=0.5)

# name: (prune, palettize, quantize, op chain every Linear weight must end with)
TECHNIQUES = {
    "kmeans-4bit-per-tensor": (None, pal(granularity="per_tensor"), None, [LUT]),
    "kmeans-1bit-per-tensor": (None, pal(n_bits=1, granularity="per_tensor"), None, [LUT]),
    "kmeans-6bit-g16": (None, pal(n_bits=6), None, [LUT]),
    "kmeans-8bit-per-tensor": (None, pal(n_bits=8, granularity="per_tensor"), None, [LUT]),
    "sensitive-kmeans-3bit-g16": (None, pal(method="sensitive_kmeans", n_bits=3), None, [LUT]),
    # The optimal k-means of coreml_pipeline/kmeans.py, registered as coremltools' own metadata.
    "exact-dp-sensitive-4bit-g16": (None, pal(method="sensitive_kmeans", kmeans_solver="exact_dp"), None, [LUT]),
    "exact-dp-kmeans-8bit-per-tensor": (None, pal(n_bits=8, granularity="per_tensor", kmeans_solver="exact_dp"), None,
                                        [LUT]),
    "uniform-3bit-g16": (None, pal(method="uniform", n_bits=3), None, [LUT]),
    "kmeans-per-channel-scale": (None, pal(granularity="per_tensor", enable_per_channel_scale=True), None, [SCALE, LUT]),
    "exact-dp-sensitive-per-channel-scale-g16": (None, pal(method="sensitive_kmeans", enable_per_channel_scale=True,
                                                           kmeans_solver="exact_dp"), None, [SCALE, LUT]),
    "kmeans-int8-lut": (None, pal(lut_dtype="int8"), None, [SCALE, LUT]),
    "exact-dp-sensitive-uint8-lut-g16": (None, pal(method="sensitive_kmeans", lut_dtype="uint8", kmeans_solver="exact_dp"),
                                         None, [SCALE, LUT]),
    "kmeans-vector-cluster-dim-2": (None, pal(granularity="per_tensor", cluster_dim=2), None, [LUT]),
    "int8-per-channel": (None, OFF, quant(), [SCALE]),
    "uint8-affine-per-tensor": (None, OFF, quant(dtype="uint8", scheme="affine", granularity="per_tensor"), [SCALE]),
    "int4-per-block-32": (None, OFF, quant(dtype="int4", granularity="per_block", block_size=32), [SCALE]),
    "gptq-uint4-per-block-32": (None, OFF, quant(method="gptq", dtype="uint4", granularity="per_block", block_size=32),
                                [SCALE]),
    "gptq-uint8-affine": (None, OFF, quant(method="gptq", dtype="uint8", scheme="affine"), [SCALE]),
    "magnitude-only": (MAGNITUDE, OFF, None, [SPARSE]),
    "magnitude-block-2-only": (PruneConfig(method="magnitude", target_sparsity=0.5, block_size=2), OFF, None, [SPARSE]),
    "magnitude-2:4-int8": (PruneConfig(method="magnitude", target_sparsity=0.5, n_m_ratio=[2, 4]), OFF, quant(),
                           [SPARSE_SCALE, SPARSE]),
    "magnitude-kmeans-4bit": (MAGNITUDE, pal(), None, [LUT_SPARSE, SPARSE]),
    # 3 and 6 bits: packed index widths other than 4 and 8 through the sparse look-up op (coreml_pipeline/techniques/precision.py)
    "magnitude-kmeans-3bit": (MAGNITUDE, pal(n_bits=3), None, [LUT_SPARSE, SPARSE]),
    "magnitude-kmeans-6bit": (MAGNITUDE, pal(n_bits=6), None, [LUT_SPARSE, SPARSE]),
    "sparse-gpt-int4-affine": (PruneConfig(method="sparse_gpt", target_sparsity=0.4), OFF,
                               quant(dtype="int4", scheme="affine"), [SPARSE_SCALE, SPARSE]),
    "magnitude-exact-dp-4bit": (MAGNITUDE, pal(kmeans_solver="exact_dp"), None, [LUT_SPARSE, SPARSE]),
    "magnitude-kmeans-per-channel-scale": (MAGNITUDE, pal(granularity="per_tensor", enable_per_channel_scale=True),
                                           None, [LUT_SPARSE, SPARSE, SCALE]),
}


@pytest.mark.parametrize("name", list(TECHNIQUES))
def test_technique_converts_to_its_constexpr_ops_and_reads_back_exactly(name, tiny_bert, tmp_path, monkeypatch):
    from coreml_pipeline.techniques import precision

    # Row blocks as small as on the real model's big weights, so conversion takes that path here too.
    monkeypatch.setattr(precision, "INDEX_SEARCH_ELEMENTS", 1 << 12)
    prune_cfg, palettize_cfg, quantize_cfg, chain = TECHNIQUES[name]
    check_combination({"prune": prune_cfg or PruneConfig(), "palettize": palettize_cfg,
                       "quantize": quantize_cfg or QuantizeConfig()})
    model = tiny_bert()
    if prune_cfg is not None:
        model = prune(model, prune_cfg, token_batches(4))
    values = sensitivity(model, pair_batches(2), cosine_loss) if palettize_cfg.method == "sensitive_kmeans" else None
    model = palettize.run(model, palettize_cfg, values)
    if quantize_cfg is not None:
        model = quantize.run(model, quantize_cfg, token_batches(4))

    report = convert.convert_and_check(model, families.get(SentenceEmbeddingConfig()), ConvertConfig(seq_len=16), tmp_path / "m.mlpackage",
                                       convert.runtime.log, provenance={})
    assert report["max_abs_diff"] <= 6e-8
    linear = [f"{n}.weight" for n, m in compressible_weights(model) if isinstance(m, torch.nn.Linear)]
    chains = {tuple(report["weights"][w]["ops"]) for w in linear}
    assert chains == {tuple(chain)}, chains
    if palettize_cfg.method != "none" or quantize_cfg is not None:  # pruning alone leaves embeddings dense
        assert report["weights"]["embeddings.word_embeddings.weight"]["ops"] != ["const"]
    if prune_cfg is not None:
        assert all(float((m.weight == 0).float().mean()) >= 0.3 for _, m in compressible_weights(model)
                   if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("lut_shape", [(1, 1, 16, 1), (8, 1, 4, 1), (1, 4, 16, 1), (8, 1, 64, 1), (1, 1, 8, 1)])
def test_row_block_index_search_equals_coremltools(lut_shape, monkeypatch):
    import numpy as np
    from coremltools.optimize import _utils

    from coreml_pipeline.coreml import private
    from coreml_pipeline.techniques import precision

    generator = np.random.default_rng(0)
    data = generator.normal(size=(64, 32)).astype(np.float32)
    lut = np.sort(generator.normal(size=lut_shape).astype(np.float32), axis=-2)
    monkeypatch.setattr(precision, "INDEX_SEARCH_ELEMENTS", 2000)  # force many row blocks
    expected = _utils.find_indices_for_lut(data, lut)
    calls = []
    original = private.coremltools_find_indices_for_lut()
    monkeypatch.setattr(private, "coremltools_find_indices_for_lut",
                        lambda: lambda *args: calls.append(1) or original(*args))
    found = precision.find_indices_for_lut(data, lut)
    np.testing.assert_array_equal(found, expected)
    # The packed width (uint3, uint6...) rides in the dtype's metadata; the sparse look-up op needs it.
    assert found.dtype == expected.dtype and found.dtype.metadata == expected.dtype.metadata
    assert len(calls) >= 8
    with precision.bounded_index_search():
        assert _utils.find_indices_for_lut is precision.find_indices_for_lut
        np.testing.assert_array_equal(_utils.find_indices_for_lut(data, lut), expected)
    assert _utils.find_indices_for_lut is not precision.find_indices_for_lut


def test_outlier_row_lost_under_per_channel_scale_is_named(caplog):
    """MiniLM's FFN output has a row (hidden feature 99) whose largest weight
    holds 98% of its norm. Scaled by that maximum onto a table shared with
    ordinary rows, its other weights land on the entries nearest zero, 10-20
    times too large. The stage must name such a row; per-row tables keep it."""
    from transformers import BertConfig, BertModel

    def with_outlier():
        torch.manual_seed(0)
        model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=4096, max_position_embeddings=16), add_pooling_layer=False)
        with torch.no_grad():
            row = model.encoder.layer[0].output.dense.weight[3]
            row.mul_(0.05)  # its largest weight becomes ~150x its median, as in MiniLM
            row[0] = 0.1
        return model.eval()

    log = logging.getLogger("test_outlier")
    caplog.set_level("WARNING")
    palettize.run(with_outlier(), pal(granularity="per_tensor", enable_per_channel_scale=True), log=log)
    lost = [r.getMessage() for r in caplog.records if "encoder.layer.0.output.dense" in r.getMessage()]
    assert lost and "rows [3]" in lost[0], lost
    caplog.clear()
    palettize.run(with_outlier(), pal(granularity="per_grouped_channel", group_size=1), log=log)
    assert not [r for r in caplog.records if "rows keep less than half" in r.getMessage()]
