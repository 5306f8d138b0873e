"""Mixed-precision linear quantization (quantize.layer_dtypes): each layer and embedding table at its
own dtype through PostTrainingQuantizer, GPTQ (inside the block stack and the layers it leaves) and
conversion, and every refusal as one line before any work (structure tests on a tiny random BERT)."""

from __future__ import annotations

import pytest
import torch
from test_compression import token_batches

from coreml_pipeline import families
from coreml_pipeline.config.schema import ConfigError, ConvertConfig, QuantizeConfig
from coreml_pipeline.coreml import convert
from coreml_pipeline.families.sentence_embedding import SentenceEmbeddingConfig
from coreml_pipeline.model import compressible_weights, compression_metadata
from coreml_pipeline.techniques import quantize
from coreml_pipeline.validation import check_shapes, validate

MIXED = {r"embeddings\..*": "int8", "encoder.layer.1.output.dense": "int8"}


def bits(model, name: str) -> int:
    return int(compression_metadata(model.get_submodule(name), "quantization_n_bits"))


def levels(model, name: str) -> int:
    """Distinct integer levels of one row block of the weight (scale divided out)."""
    module = model.get_submodule(name)
    scale = compression_metadata(module, "quantization_scale")
    row = module.weight.detach()[0, :32] / scale.reshape(scale.shape[0], -1)[0, 0]
    return int(torch.unique(torch.round(row)).numel())


@pytest.mark.parametrize("method, dtypes", [("linear", ("int4", "int8")), ("gptq", ("uint4", "uint8"))])
def test_each_layer_at_its_own_dtype_through_conversion(method, dtypes, tiny_bert, tmp_path):
    low, high = dtypes
    cfg = QuantizeConfig(method=method, dtype=low, granularity="per_block", block_size=32,
                         layer_dtypes={pattern: high for pattern in MIXED})
    model = quantize.run(tiny_bert(), cfg, token_batches(4))
    for name, _ in compressible_weights(model):
        assert bits(model, name) == (8 if name.startswith("embeddings.") or name == "encoder.layer.1.output.dense"
                                     else 4), name
    assert levels(model, "encoder.layer.1.output.dense") > 16  # more than 4 bits can hold
    assert levels(model, "encoder.layer.0.output.dense") <= 16
    report = convert.convert_and_check(model, families.get(SentenceEmbeddingConfig()), ConvertConfig(seq_len=16),
                                       tmp_path / "m.mlpackage", convert.runtime.log, provenance={})
    assert report["max_abs_diff"] <= 6e-8


def test_without_layer_dtypes_nothing_changes(tiny_bert):
    """An empty mapping quantizes exactly as before it existed (same tensors, bit for bit)."""
    cfg = QuantizeConfig(method="linear", dtype="int4", granularity="per_block", block_size=32)
    plain = quantize.run(tiny_bert(), cfg).state_dict()
    mixed = quantize.run(tiny_bert(), QuantizeConfig(**{**cfg.__dict__, "layer_dtypes": {"nothing": "int4"}}))
    assert all(torch.equal(plain[k], v) for k, v in mixed.state_dict().items())


def test_layer_dtypes_are_refused_in_one_line_before_any_work(tiny_bert):
    def section(**quant):
        return {"quantize": {"method": "linear", "dtype": "int4", "granularity": "per_block", "block_size": 32, **quant}}

    cases = [
        (section(layer_dtypes={"lm_head": "int16"}),
         "config error: quantize.layer_dtypes.lm_head='int16' is not allowed; allowed: int8, uint8, int4, uint4"),
        (section(layer_dtypes={"lm_(": "int8"}),
         "config error: quantize.layer_dtypes='lm_(' is not allowed; allowed: a regular expression"),
        (section(method="none", layer_dtypes={"x": "int8"}),
         "config error: quantize.layer_dtypes={'x': 'int8'} is not allowed; allowed: {} with method=none"),
        (section(method="gptq", dtype="uint4", layer_dtypes={"x": "int8"}),
         "config error: quantize.layer_dtypes.x='int8' is not allowed; allowed with method=gptq: uint8, uint4"),
    ]
    for params, expected in cases:
        with pytest.raises(ConfigError) as raised:
            validate(params, ("quantize",))
        assert str(raised.value).startswith(expected), str(raised.value)
    checked = validate(section(layer_dtypes={"decoder.layer.0": "int8"}), ("quantize",))
    layers = [{"name": "encoder.layer.0.output.dense", "kind": "Linear", "shape": [64, 128]}]
    with pytest.raises(ConfigError, match=r"quantize.layer_dtypes='decoder.layer.0' is not allowed; allowed: a regex "
                                          r"matching quantized layer names such as encoder.layer.0.output.dense"):
        check_shapes(checked, layers)


def test_layer_dtypes_refuse_qat_and_the_core_ml_side():
    from coreml_pipeline.config.schema import CoremlConfig, FinetuneConfig, PalettizeConfig, PruneConfig
    from coreml_pipeline.validation import check_combination

    mixed = QuantizeConfig(method="linear", layer_dtypes={"encoder.*": "int4"})
    off = PalettizeConfig(method="none")
    with pytest.raises(ConfigError, match="finetune.method='qat'.*layer_dtypes"):
        check_combination({"palettize": off, "quantize": mixed, "finetune": FinetuneConfig(method="qat", quantize=mixed)})
    coreml = CoremlConfig(enabled=True, prune=PruneConfig(), palettize=off, quantize=mixed)
    with pytest.raises(ConfigError, match="coreml.enabled=True.*quantize.layer_dtypes"):
        check_combination({"palettize": off, "quantize": mixed, "coreml": coreml})
