"""Training-time compression on a tiny random BERT: structure, not quality."""

from __future__ import annotations

import pytest
import torch
from test_compression import token_batches

from coreml_pipeline.config.schema import FinetuneConfig, PalettizeConfig, QuantizeConfig
from coreml_pipeline.families.sentence_embedding import mean_cosine_loss
from coreml_pipeline.model import COREML_PREFIX, compressible_weights, compression_types
from coreml_pipeline.runtime import log
from coreml_pipeline.techniques import palettize, quantize
from coreml_pipeline.techniques.finetune import train


def random_batches(steps: int, batch_size: int = 4, length: int = 10):
    ids = token_batches(2 * steps * batch_size, length)
    for step in range(steps):
        chunk = ids[2 * step * batch_size:2 * (step + 1) * batch_size]
        a, b = torch.cat(chunk[::2]), torch.cat(chunk[1::2])
        yield {"a": {"input_ids": a, "attention_mask": torch.ones_like(a)},
               "b": {"input_ids": b, "attention_mask": torch.ones_like(b)}, "label": torch.full((batch_size,), 0.6)}


def linear_layers(model):
    return [(n, m) for n, m in compressible_weights(model) if isinstance(m, torch.nn.Linear)]


@pytest.mark.parametrize("solver", ["coremltools", "auto"])  # auto: exact_dp
def test_dkm_learns_tables_that_the_palettize_stage_stores_exactly(tiny_bert, solver):
    pal = PalettizeConfig(method="kmeans", n_bits=2, granularity="per_grouped_channel", group_size=16,
                          num_kmeans_workers=1, kmeans_solver=solver)
    cfg = FinetuneConfig(method="dkm", steps=3, learning_rate=1e-4, log_every=1, palettize=pal)
    model = train(tiny_bert(), cfg, random_batches(3), mean_cosine_loss, log)
    assert not any("/weight/" in k for k in model.state_dict() if COREML_PREFIX in k)  # DKM tables dropped
    trained = {n: m.weight.detach().clone() for n, m in compressible_weights(model)}
    for name, weight in trained.items():
        if weight.shape[0] % 16 == 0 and not name.startswith("embeddings"):
            for start in range(0, weight.shape[0], 16):
                assert torch.unique(weight[start:start + 16]).numel() <= 4, name
    model = palettize.run(model, pal)
    for name, module in linear_layers(model):  # k-means of <= 4 values per group: the same weights
        assert torch.equal(module.weight.detach(), trained[name].half().float()) or \
            float((module.weight.detach() - trained[name]).abs().max()) < 1e-3, name
        assert compression_types(module) == [2]


def test_qat_trains_against_the_quantize_grid(tiny_bert):
    quant = QuantizeConfig(method="linear", dtype="int4", granularity="per_block", block_size=32)
    cfg = FinetuneConfig(method="qat", steps=3, learning_rate=1e-3, log_every=1, quantize=quant)
    reference = tiny_bert()
    model = train(tiny_bert(), cfg, random_batches(3), mean_cosine_loss, log)
    dense = model.get_submodule("encoder.layer.0.intermediate.dense")
    assert not hasattr(dense, "parametrizations")
    weight = dense.weight.detach()
    assert not torch.equal(weight, reference.get_submodule("encoder.layer.0.intermediate.dense").weight)
    for block in weight.reshape(weight.shape[0], -1, 32).reshape(-1, 32):  # int4: at most 16 levels a block
        assert torch.unique(block).numel() <= 16
    model = quantize.run(model, quant)
    assert compression_types(model.get_submodule("encoder.layer.0.intermediate.dense")) == [3]


def test_gradual_pruning_reaches_its_target_and_marks_the_weights(tiny_bert):
    cfg = FinetuneConfig(method="gradual_prune", steps=8, learning_rate=1e-4, target_sparsity=0.5, log_every=4)
    model = train(tiny_bert(), cfg, random_batches(8), mean_cosine_loss, log)
    for name, module in linear_layers(model):
        assert abs(float((module.weight == 0).float().mean()) - 0.5) < 0.02, name
        assert compression_types(module) == [1]
