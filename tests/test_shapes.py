"""Options that depend on the model's shapes are checked by validate against the inspect stage's
layer table, before any compression work (one line naming the key, the value, a layer and what fits)."""

from __future__ import annotations

import pytest
import yaml

from coreml_pipeline.config.compose import compose_text
from coreml_pipeline.config.schema import ConfigError
from coreml_pipeline.validation import check_shapes, validate

# MiniLM's kinds of layer, as `python -m stages.inspect` writes them.
LAYERS = [{"name": "embeddings.word_embeddings", "kind": "Embedding", "shape": [30522, 384]},
          {"name": "embeddings.position_embeddings", "kind": "Embedding", "shape": [512, 384]},
          {"name": "encoder.layer.0.attention.self.query", "kind": "Linear", "shape": [384, 384]},
          {"name": "encoder.layer.0.intermediate.dense", "kind": "Linear", "shape": [1536, 384]},
          {"name": "encoder.layer.0.output.dense", "kind": "Linear", "shape": [384, 1536]}]


def checked(*overrides: str) -> dict:
    return validate(yaml.safe_load(compose_text(list(overrides))))


@pytest.mark.parametrize("overrides", [[], ["palettize=kmeans"], ["palettize.group_size=1"],
                                       ["palettize=none", "quantize=int4_block"], ["palettize.layer_bits={encoder.*:6}"]])
def test_the_shipped_recipes_fit_minilm(overrides):
    check_shapes(checked(*overrides), LAYERS)


@pytest.mark.parametrize("overrides, message", [
    (["palettize.group_size=7"],
     "config error: palettize.group_size=7 is not allowed; divides no channel count of embeddings.word_embeddings "
     "(Embedding 30522x384) and 4 more layer(s); allowed with this model: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64"),
    (["palettize.group_size=256"],
     "config error: palettize.group_size=256 is not allowed; divides no channel count of embeddings.word_embeddings "
     "(Embedding 30522x384) and 2 more layer(s); allowed with this model: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64"),
    (["palettize.layer_bits={decoder.*:2}"],
     "config error: palettize.layer_bits='decoder.*' is not allowed; allowed: a regex matching palettized layer names "
     "such as embeddings.word_embeddings, embeddings.position_embeddings, encoder.layer.0.attention.self.query"),
    (["palettize=none", "quantize=int4_block", "quantize.block_size=384"],
     "config error: quantize.block_size=384 is not allowed; does not block the input channels of "
     "encoder.layer.0.attention.self.query (Linear 384x384) (it must divide them and be smaller); allowed with this "
     "model: 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96"),
    (["palettize=none", "quantize=int4_block", "quantize.block_size=7"],
     "config error: quantize.block_size=7 is not allowed; does not block the input channels of "
     "embeddings.word_embeddings (Embedding 30522x384) (it must divide them and be smaller); allowed with this "
     "model: 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96"),
    (["palettize=kmeans", "palettize.granularity=per_tensor", "palettize.group_size=null", "palettize.cluster_dim=5",
      "palettize.kmeans_solver=coremltools"],
     "config error: palettize.cluster_dim=5 is not allowed; does not divide the channel axis of "
     "embeddings.word_embeddings (Embedding 30522x384)"),
])
def test_a_shape_dependent_option_that_does_not_fit_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        check_shapes(checked(*overrides), LAYERS)
    assert str(error.value) == message


def test_the_inspect_stage_writes_the_models_layer_table(tmp_path):
    import json

    from stages import inspect

    inspect.main(["--out", str(tmp_path / "layers.json")])
    table = json.loads((tmp_path / "layers.json").read_text())
    assert table["family"] == "sentence_embedding" and len(table["layers"]) == 39  # 3 tables + 6 x 6 Linear
    assert {"name": "embeddings.word_embeddings", "kind": "Embedding", "shape": [30522, 384]} in table["layers"]
    check_shapes(checked(), table["layers"])
