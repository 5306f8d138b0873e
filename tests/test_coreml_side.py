"""The Core ML-side path (coremltools.optimize.coreml on the float16 package), on a tiny random BERT."""

from __future__ import annotations

import pytest
import torch

from coreml_pipeline import families
from coreml_pipeline.config.schema import (
    ConvertConfig,
    CoremlConfig,
    PalettizeConfig,
    PruneConfig,
    QuantizeConfig,
)
from coreml_pipeline.coreml import convert
from coreml_pipeline.coreml.compress import compress, load_decoded, plan
from coreml_pipeline.families.sentence_embedding import SentenceEmbeddingConfig
from coreml_pipeline.model import compressible_weights
from coreml_pipeline.validation import check_combination

NONE_PAL = PalettizeConfig(method="none")
RECIPES = {
    "kmeans-4bit-g16": (PruneConfig(), PalettizeConfig(method="kmeans", group_size=16, num_kmeans_workers=1, kmeans_solver="coremltools"),
                        QuantizeConfig(), {"constexpr_lut_to_dense"}),
    "skm-becomes-kmeans": (PruneConfig(), PalettizeConfig(group_size=16, num_kmeans_workers=1, kmeans_solver="coremltools"),
                           QuantizeConfig(),
                           {"constexpr_lut_to_dense"}),
    "exact-dp-custom-lut-function": (PruneConfig(), PalettizeConfig(method="kmeans", group_size=16, num_kmeans_workers=1,
                                                                    kmeans_solver="exact_dp"), QuantizeConfig(),
                                     {"constexpr_lut_to_dense"}),
    "uniform-2bit": (PruneConfig(), PalettizeConfig(method="uniform", n_bits=2, group_size=16, num_kmeans_workers=1),
                         QuantizeConfig(), {"constexpr_lut_to_dense"}),
    "int4-per-block": (PruneConfig(), NONE_PAL, QuantizeConfig(method="linear", dtype="int4", granularity="per_block",
                                                               block_size=32), {"constexpr_blockwise_shift_scale"}),
    "magnitude-kmeans": (PruneConfig(method="magnitude", target_sparsity=0.5),
                         PalettizeConfig(method="kmeans", group_size=16, num_kmeans_workers=1, kmeans_solver="coremltools"), QuantizeConfig(),
                         {"constexpr_lut_to_sparse", "constexpr_sparse_to_dense"}),
    "magnitude-int8": (PruneConfig(method="magnitude", target_sparsity=0.5), NONE_PAL, QuantizeConfig(method="linear"),
                       {"constexpr_sparse_blockwise_shift_scale", "constexpr_sparse_to_dense"}),
    "kmeans-int8-lut": (PruneConfig(), PalettizeConfig(method="kmeans", lut_dtype="int8", group_size=16,
                                                       num_kmeans_workers=1), QuantizeConfig(),
                        {"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale"}),
}


@pytest.fixture(scope="module")
def float_package(tiny_bert, tmp_path_factory):
    path = tmp_path_factory.mktemp("float") / "float16.mlpackage"
    convert.save_package(convert.to_mlmodel(tiny_bert(), families.get(SentenceEmbeddingConfig()), ConvertConfig(seq_len=16)), path)
    return path


@pytest.mark.parametrize("name", list(RECIPES))
def test_same_recipe_on_the_core_ml_side(name, float_package, tiny_bert, tmp_path):
    prune, palettize, quantize, ops = RECIPES[name]
    check_combination({"prune": prune, "palettize": palettize, "quantize": quantize})
    steps, notes = plan(prune, palettize, quantize, CoremlConfig(enabled=True))
    assert ("palettize.method=sensitive_kmeans runs as data-free kmeans" in notes) == (name == "skm-becomes-kmeans")
    custom = [config.mode for _, _, optimization in steps for config in optimization.op_type_configs.values()
              if config is not None and hasattr(config, "lut_function")]
    assert (custom == ["CUSTOM"] * 3) == (palettize.kmeans_solver == "exact_dp"), custom  # linear, conv, gather
    package = tmp_path / "m.mlpackage"
    convert.save_package(compress(float_package, steps, convert.runtime.log), package)
    weights = convert.package_weights(convert.load_program(package))
    bert, reference = tiny_bert(), tiny_bert()
    loaded = load_decoded(bert, package)
    assert loaded >= len(list(compressible_weights(bert)))
    for layer, module in compressible_weights(bert):
        if not isinstance(module, torch.nn.Linear):
            continue
        found = convert.find_weight(weights, f"{layer}.weight", module.weight.numel())
        assert found is not None and set(found[1]) == ops, (layer, found and found[1])
        moved = not torch.equal(module.weight, reference.get_submodule(layer).weight.half().float())
        assert moved, f"{layer} was not compressed"
        if prune.method != "none":
            assert float((module.weight == 0).float().mean()) >= 0.45
    word = convert.find_weight(weights, "embeddings.word_embeddings.weight", 1000 * 64)
    assert word is not None and word[1] != ["const"]
    assert convert.package_bytes(package) < convert.package_bytes(float_package)
