"""Mixed-bit palettization: per-layer bits in the palettize stage, and the
recipe generator's k-means, greedy path and choice (structure, tiny models)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_compression import pair_batches, token_batches

from coreml_pipeline.config.schema import ConfigError, PalettizeConfig, PruneConfig
from coreml_pipeline.families.sentence_embedding import cosine_loss
from coreml_pipeline.model import COREML_PREFIX, compressible_weights
from coreml_pipeline.techniques.calibrate import sensitivity
from coreml_pipeline.techniques.palettize import keep_pruned_zeros, layer_n_bits, palettize, run, zeros_kept
from coreml_pipeline.techniques.prune import prune
from coreml_pipeline.tools import mixed_bit
from coreml_pipeline.validation import validate

MIXED = {
    r"encoder\.layer\.0\..*": 1,  # a pattern for a whole block
    "encoder.layer.1.output.dense": 6,
    "embeddings.word_embeddings": 8,
}


def lut_bits(model, name: str) -> int:
    lut = getattr(model.get_submodule(name), f"{COREML_PREFIX}/weight/lut")
    return int(np.log2(lut.shape[-2]))


def mixed_cfg(method: str, **extra) -> PalettizeConfig:
    return PalettizeConfig(method=method, n_bits=2, granularity="per_grouped_channel", group_size=16,
                           num_kmeans_workers=1, layer_bits=dict(MIXED), kmeans_solver="coremltools", **extra)


@pytest.mark.parametrize("method", ["kmeans", "sensitive_kmeans", "uniform"])
def test_layer_bits_give_each_layer_its_own_table(tiny_bert, method):
    model = tiny_bert()
    values = sensitivity(model, pair_batches(2), cosine_loss) if method == "sensitive_kmeans" else None
    cfg = mixed_cfg(method)
    model = run(model, cfg, values)
    for name, module in compressible_weights(model):
        expected = layer_n_bits(cfg, name, isinstance(module, torch.nn.Embedding))
        assert lut_bits(model, name) == expected, name
    assert lut_bits(model, "encoder.layer.0.attention.self.query") == 1
    assert lut_bits(model, "encoder.layer.1.output.dense") == 6
    assert lut_bits(model, "encoder.layer.1.attention.self.query") == 2  # not named: palettize.n_bits
    word = model.get_submodule("embeddings.word_embeddings")
    assert getattr(word, f"{COREML_PREFIX}/weight/lut").shape[1] == 64 // 16  # its own channel_axis kept
    assert torch.unique(word.weight.detach()[:, :16]).numel() <= 256


def test_layer_bits_reach_the_pruned_zero_repalettization(tiny_bert):
    model = prune(tiny_bert(), PruneConfig(method="sparse_gpt", target_sparsity=0.4), token_batches(4))
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".weight")}
    cfg = mixed_cfg("kmeans")
    model = palettize(model, cfg)
    keep_pruned_zeros(model, cfg, before, None)
    assert zeros_kept(before, model)[0] == zeros_kept(before, model)[1] > 0
    assert lut_bits(model, "encoder.layer.1.output.dense") == 6
    assert lut_bits(model, "encoder.layer.0.output.dense") == 1  # zero plus one centroid


def test_layer_bits_are_validated_before_any_work(tiny_bert):
    def section(**palettize):
        base = {"method": "kmeans", "n_bits": 4, "layer_bits": {}}
        return {"palettize": {**base, **palettize}}

    with pytest.raises(ConfigError, match=r"palettize.layer_bits.encoder.*=5.*allowed: 1, 2, 3, 4, 6, 8"):
        validate(section(layer_bits={"encoder.layer.0.output.dense": 5}), ("palettize",))
    with pytest.raises(ConfigError, match=r"palettize.layer_bits='encoder\.\(' .*regular expression"):
        validate(section(layer_bits={"encoder.(": 4}), ("palettize",))
    with pytest.raises(ConfigError, match="palettize.layer_bits.*allowed: {} with method=none"):
        validate(section(method="none", layer_bits={"x": 4}), ("palettize",))
    cfg = PalettizeConfig(method="kmeans", layer_bits={"decoder.layer.0": 4}, num_kmeans_workers=1,
                          kmeans_solver="coremltools")
    with pytest.raises(ValueError, match="palettize.layer_bits key 'decoder.layer.0' matches no palettized layer"):
        run(tiny_bert(), cfg)


def exact_error(values: np.ndarray, mass: np.ndarray, n_bits: int) -> float:
    from coreml_pipeline.coreml.private import kmeans1d

    centroids, clusters = kmeans1d(values.tolist(), 2 ** n_bits, weights=mass.tolist())
    table = np.asarray(centroids).astype(np.float16).astype(np.float64)
    return float((mass * (values - table[np.asarray(clusters)]) ** 2).sum())


@pytest.mark.parametrize("shape,group,axis", [((64, 384), 16, 0), ((16, 384), 4, 0), ((30522, 4), 4, 1)])
def test_vectorised_kmeans_stays_close_to_the_exact_one(shape, group, axis):
    """The generator's estimate against coremltools' exact 1-D k-means:
    within 15% of its weighted error up to 4 bits, within 2x at 6 and 8 bits (where
    the error itself is tiny). Laplace-like values, as transformer weights are."""
    rng = np.random.default_rng(0)
    weight = (rng.laplace(size=shape) * 0.03).astype(np.float32)
    mass = rng.random(shape).astype(np.float32)
    for n_bits, bound in ((1, 1.01), (2, 1.01), (4, 1.15), (6, 2.0), (8, 2.0)):
        out = mixed_bit.grouped_kmeans(weight, mass, n_bits, axis, group)
        first = (slice(None), slice(0, group)) if axis else (slice(0, group),)
        assert np.unique(out[first]).size <= 2 ** n_bits
        values, weights = weight[first].ravel().astype(np.float64), mass[first].ravel().astype(np.float64)
        mine = float((weights * (values - out[first].ravel()) ** 2).sum())
        assert mine <= bound * exact_error(values, weights, n_bits), n_bits


def test_greedy_path_lowers_the_cheapest_layer_per_byte_first():
    layers = [mixed_bit.Layer("cheap", 1000, 1, False), mixed_bit.Layer("costly", 1000, 1, False)]
    cost = {("cheap", b): 0.001 * (8 - b) for b in mixed_bit.BITS}
    cost.update({("costly", b): 0.1 * (8 - b) for b in mixed_bit.BITS})
    path = mixed_bit.greedy_path(layers, cost)
    assert path[0] == {"cheap": 8, "costly": 8} and path[-1] == {"cheap": 1, "costly": 1}
    assert len(path) == 1 + 2 * (len(mixed_bit.BITS) - 1)
    assert [p["costly"] for p in path[:5]] == [8] * 5  # the cheap layer goes all the way down first
    sizes = [sum(mixed_bit.layer_bytes(layer, p[layer.name]) for layer in layers) for p in path]
    assert sizes == sorted(sizes, reverse=True)


def test_choice_bisects_to_the_smallest_recipe_meeting_the_target():
    path = [{"a": b} for b in (8, 6, 4, 2, 1)]
    cosine_of = {8: 0.999, 6: 0.99, 4: 0.975, 2: 0.9, 1: 0.5}
    drop_of = {8: 0.0, 6: 0.1, 4: 0.3, 2: 2.0, 1: 20.0}
    sizes = {8: 8e6, 6: 6e6, 4: 4e6, 2: 2e6, 1: 1e6}
    calls = []

    def measure(bits):
        calls.append(bits)
        return {"cosine": cosine_of[bits["a"]], "spearman_drop": drop_of[bits["a"]]}

    def size(bits):
        return sizes[bits["a"]]

    def cosine_at_least(value):
        return lambda result: result["cosine"] >= value

    bits, result, measured = mixed_bit.choose(path, measure, size, cosine_at_least(0.97), None)
    assert bits == {"a": 4} and result["cosine"] == 0.975
    assert len(calls) == len(measured) < len(path)  # bisection, each recipe measured once
    both = lambda r: r["cosine"] >= 0.97 and r["spearman_drop"] <= 0.2  # noqa: E731
    assert mixed_bit.choose(path, measure, size, both, None)[0] == {"a": 6}
    bits, result, _ = mixed_bit.choose(path, measure, size, None, 5.0)
    assert bits == {"a": 4} and result["cosine"] == 0.975
    with pytest.raises(ConfigError, match="every layer at 8 bits already misses the target: cosine 0.9990"):
        mixed_bit.choose(path, measure, None, cosine_at_least(0.9999), None)
    with pytest.raises(ConfigError, match="--size-mb 0.5: even every layer at 1 bits is 1.00 MB"):
        mixed_bit.choose(path, None, size, None, 0.5)


def test_refill_spends_a_big_step_down_on_the_layers_that_need_it():
    """A big cheap layer drops a width and saves more than needed; the refill
    raises the small costly layer with what is left, within the budget."""
    layers = [mixed_bit.Layer("big", 8000, 1, False), mixed_bit.Layer("small", 1000, 1, False)]
    cost = {("big", b): 0.01 * (8 - b) for b in mixed_bit.BITS}
    cost.update({("small", b): 0.05 * (8 - b) for b in mixed_bit.BITS})
    size = lambda bits: sum(mixed_bit.layer_bytes(layer, bits[layer.name]) for layer in layers)  # noqa: E731
    start = {"big": 4, "small": 2}
    budget = size({"big": 4, "small": 2}) + 2000
    sequence = mixed_bit.refill(start, layers, cost, mixed_bit.BITS, budget)
    assert [bits["small"] for bits in sequence] == [4, 6, 8] and all(bits["big"] == 4 for bits in sequence)
    assert all(size(bits) <= budget for bits in sequence)
    # choose() takes the refill when its first recipe meeting the cosine is smaller than the path's
    path = [{"big": 8, "small": 8}, {"big": 6, "small": 8}, {"big": 4, "small": 4}]
    measure = lambda bits: {"cosine": 1 - cost["big", bits["big"]] - cost["small", bits["small"]]}  # noqa: E731
    bits, result, _ = mixed_bit.choose(path, measure, size, lambda r: r["cosine"] >= 0.9, None,
                                       lambda start, budget: mixed_bit.refill(start, layers, cost, mixed_bit.BITS,
                                                                              budget))
    assert bits == {"big": 4, "small": 8} and size(bits) < size(path[1]) and result["cosine"] >= 0.9


def test_mixed_bits_refuse_dkm_and_the_core_ml_side():
    from coreml_pipeline.config.schema import CoremlConfig, FinetuneConfig, QuantizeConfig
    from coreml_pipeline.config.schema import PruneConfig as Prune
    from coreml_pipeline.validation import check_combination

    mixed = PalettizeConfig(method="kmeans", layer_bits={"encoder.*": 2})
    with pytest.raises(ConfigError, match="finetune.method='dkm'.*layer_bits"):
        check_combination({"palettize": mixed, "finetune": FinetuneConfig(method="dkm", palettize=mixed)})
    coreml = CoremlConfig(enabled=True, prune=Prune(), palettize=mixed, quantize=QuantizeConfig())
    with pytest.raises(ConfigError, match="coreml.enabled=True.*layer_bits"):
        check_combination({"palettize": mixed, "coreml": coreml})


def test_candidates_are_what_the_palettize_stage_writes(tiny_bert):
    """With exact_dp (what kmeans_solver=auto runs here) the generator's candidates are the palettize
    stage's own output: a mixed recipe assembled from them is, layer for layer, what the stage writes."""
    import copy
    import logging
    import re
    from dataclasses import replace

    model = tiny_bert()
    values = sensitivity(model, pair_batches(2), cosine_loss)
    cfg = PalettizeConfig(method="sensitive_kmeans", n_bits=4, granularity="per_grouped_channel", group_size=16,
                          num_kmeans_workers=1)
    before = {name: module.weight.detach().clone() for name, module in compressible_weights(model)}
    candidates = mixed_bit.stage_candidates(model, cfg, values, (2, 4), logging.getLogger("test"))
    names = list(before)
    assert set(candidates) == {(name, b) for name in names for b in (2, 4)}
    assert all(torch.equal(module.weight, before[name]) for name, module in compressible_weights(model))
    widths = {name: 2 if i % 2 else 4 for i, name in enumerate(names)}
    mixed = run(copy.deepcopy(model), replace(cfg, layer_bits={re.escape(n): b for n, b in widths.items()}), values)
    for name in names:
        assert torch.equal(mixed.get_submodule(name).weight, candidates[name, widths[name]]), name
        assert not torch.equal(candidates[name, 2], candidates[name, 4]), name


def test_divergence_is_continuous_and_zero_at_equality():
    """The generator's per-layer cost for families other than the sentence embedder (Family.divergence):
    KL(float || compressed) of logits over the last axis, else the relative squared error."""
    from coreml_pipeline.families.causal_lm import CausalLM
    from coreml_pipeline.families.custom import Custom

    logits = torch.randn(1, 5, 11, generator=torch.Generator().manual_seed(0))
    lm = CausalLM.__new__(CausalLM)
    assert lm.divergence(logits, logits) == pytest.approx(0.0, abs=1e-12)
    near, far = lm.divergence(logits + 0.01 * logits.roll(1, -1), logits), lm.divergence(logits.roll(1, -1), logits)
    assert 0 < near < far
    p, q = torch.softmax(logits.double(), -1), torch.softmax((logits + 0.01 * logits.roll(1, -1)).double(), -1)
    assert near == pytest.approx(float((p * (p.log() - q.log())).sum(-1).mean()), rel=1e-9)
    output = torch.randn(2, 3)
    assert Custom.__new__(Custom).divergence(1.1 * output, output) == pytest.approx(0.01, rel=1e-6)


def test_quantize_candidates_are_what_the_quantize_stage_writes(tiny_bert):
    """--technique quantize: each layer's candidate is the quantize stage's data-free output at that dtype, so a
    layer_dtypes recipe assembled from them is, layer for layer, what the stage writes (embeddings included)."""
    import copy
    import logging
    import re
    from dataclasses import replace

    from coreml_pipeline.config.schema import QuantizeConfig
    from coreml_pipeline.techniques.quantize import run as quantize_run

    model = tiny_bert()
    cfg = QuantizeConfig(method="linear", dtype="int8", granularity="per_block", block_size=16)
    candidates = mixed_bit.quantize_candidates(model, cfg, ("int4", "int8"), logging.getLogger("test"))
    names = [name for name, _ in compressible_weights(model)]
    assert set(candidates) == {(name, d) for name in names for d in ("int4", "int8")}
    assert "embeddings.word_embeddings" in names
    dtypes = {name: "int4" if i % 2 else "int8" for i, name in enumerate(names)}
    mixed = quantize_run(copy.deepcopy(model), replace(cfg, layer_dtypes={re.escape(n): d for n, d in dtypes.items()}))
    for name in names:
        assert torch.equal(mixed.get_submodule(name).weight, candidates[name, dtypes[name]]), name
    layer = mixed_bit.Layer("x", 64 * 384, mixed_bit.quantize_scales((64, 384), cfg), False, 64, False, (64, 384))
    assert layer.groups == 64 * 384 // 16
    assert mixed_bit.layer_bytes(layer, "int4") == 64 * 384 // 2 + 2 * layer.groups
    assert mixed_bit.layer_bytes(replace(layer, zero_points=True), "uint8") == 64 * 384 + 3 * layer.groups
