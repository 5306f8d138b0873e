"""The compression steps on a tiny random BERT: structure, not quality."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from coreml_pipeline.config.schema import EmbeddingPaletteConfig, PalettizeConfig, PruneConfig
from coreml_pipeline.families.sentence_embedding import cosine_loss
from coreml_pipeline.model import COREML_PREFIX, compressible_weights, register_metadata, save_weights
from coreml_pipeline.techniques.calibrate import sensitivity
from coreml_pipeline.techniques.palettize import check_all_palettized, keep_pruned_zeros, palettize, zeros_kept
from coreml_pipeline.techniques.prune import prune


def linear_sparsity(model) -> float:
    weights = [m.weight for _, m in compressible_weights(model) if isinstance(m, torch.nn.Linear)]
    return float(sum((w == 0).sum() for w in weights) / sum(w.numel() for w in weights))


def token_batches(n: int, length: int = 12, vocab: int = 1000) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(1, vocab, (1, length), generator=generator) for _ in range(n)]


def pair_batches(n: int) -> list[dict]:
    ids = token_batches(2 * n)
    mask = torch.ones_like(ids[0])
    return [{"a": {"input_ids": ids[2 * i], "attention_mask": mask}, "b": {"input_ids": ids[2 * i + 1], "attention_mask": mask},
             "label": torch.tensor(0.5)} for i in range(n)]


def test_magnitude_prune_hits_target_and_registers_metadata(tiny_bert):
    model = prune(tiny_bert(), PruneConfig(method="magnitude", target_sparsity=0.5))
    assert linear_sparsity(model) == pytest.approx(0.5, abs=0.01)
    query = model.get_submodule("encoder.layer.0.attention.self.query")
    assert getattr(query, f"{COREML_PREFIX}/weight/compression_type").tolist() == [1]


def test_magnitude_n_m_prune(tiny_bert):
    model = prune(tiny_bert(), PruneConfig(method="magnitude", target_sparsity=0.5, n_m_ratio=[2, 4]))
    weight = model.get_submodule("encoder.layer.0.attention.self.query").weight.detach()
    assert torch.all((weight.reshape(-1, 4) == 0).sum(dim=1) >= 2)


def test_sparse_gpt_prunes_with_calibration_data(tiny_bert):
    model = prune(tiny_bert(), PruneConfig(method="sparse_gpt", target_sparsity=0.4), token_batches(4))
    assert linear_sparsity(model) == pytest.approx(0.4, abs=0.02)


def test_sensitivity_covers_every_compressed_weight(tiny_bert):
    model = tiny_bert()
    values = sensitivity(model, pair_batches(2), cosine_loss)
    assert set(values) == {f"{name}.weight" for name, _ in compressible_weights(model)}
    assert all(v.shape == model.get_parameter(k).shape and float(v.max()) <= 1.0 for k, v in values.items())
    assert cosine_loss(model, pair_batches(1)[0]).ndim == 0


def test_sensitivity_equals_skm_palettizers_own(tiny_bert, tmp_path):
    """The stage computes SKMPalettizer.compute_sensitivity's values in place (a third
    of its memory); they must be the same numbers, bit for bit."""
    from coremltools.optimize.torch.palettization import SKMPalettizer, SKMPalettizerConfig

    batches = pair_batches(3)
    model = tiny_bert()
    skm = SKMPalettizer(model, SKMPalettizerConfig.from_dict({"calibration_nsamples": len(batches)}))
    reference = skm.compute_sensitivity(batches, cosine_loss, sensitivity_path=str(tmp_path / "s.pt"))
    values = sensitivity(tiny_bert(), batches, cosine_loss)
    assert values and set(values) <= set(reference)
    for name, value in values.items():
        assert torch.equal(value, reference[name]), name
    assert all(float(v.min()) >= 1e-12 for v in values.values())


@pytest.mark.parametrize("method", ["kmeans", "sensitive_kmeans"])
def test_grouped_palettization_includes_the_word_embedding(tiny_bert, method):
    # 1000 rows do not divide by 16: coremltools alone would skip the word embedding.
    cfg = PalettizeConfig(method=method, n_bits=2, granularity="per_grouped_channel", group_size=16,
                          num_kmeans_workers=1, kmeans_solver="coremltools")
    model = tiny_bert()
    values = sensitivity(model, pair_batches(2), cosine_loss) if method == "sensitive_kmeans" else None
    model = palettize(model, cfg, values)
    check_all_palettized(model, cfg)
    word = model.get_submodule("embeddings.word_embeddings")
    lut = getattr(word, f"{COREML_PREFIX}/weight/lut")
    assert lut.shape[-2] == 4 and lut.shape[1] == 64 // 16  # groups along the hidden axis
    for column in range(0, 64, 16):
        assert torch.unique(word.weight.detach()[:, column:column + 16]).numel() <= 4


def test_embeddings_can_keep_their_own_bits_or_stay_float(tiny_bert):
    cfg = PalettizeConfig(method="kmeans", n_bits=2, granularity="per_tensor", group_size=None,
                          num_kmeans_workers=1, kmeans_solver="coremltools",
                          embeddings=EmbeddingPaletteConfig(n_bits=4))
    model = palettize(tiny_bert(), cfg)
    assert getattr(model.get_submodule("embeddings.word_embeddings"), f"{COREML_PREFIX}/weight/lut").shape[-2] == 16
    assert getattr(model.get_submodule("encoder.layer.0.output.dense"), f"{COREML_PREFIX}/weight/lut").shape[-2] == 4
    cfg.embeddings.enabled = False
    float_model = palettize(tiny_bert(), cfg)
    assert not hasattr(float_model.get_submodule("embeddings.word_embeddings"), f"{COREML_PREFIX}/weight/lut")


def test_group_size_that_divides_nothing_fails_loudly(tiny_bert):
    cfg = PalettizeConfig(method="kmeans", n_bits=2, granularity="per_grouped_channel", group_size=48,
                          num_kmeans_workers=1, kmeans_solver="coremltools")
    model = palettize(tiny_bert(), cfg)
    with pytest.raises(ValueError, match="palettize.group_size=48: coremltools left .* uncompressed"):
        check_all_palettized(model, cfg)


def test_magnitude_zeros_survive_palettization(tiny_bert):
    model = prune(tiny_bert(), PruneConfig(method="magnitude", target_sparsity=0.5))
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".weight")}
    cfg = PalettizeConfig(method="kmeans", n_bits=2, granularity="per_tensor", group_size=None,
                          num_kmeans_workers=1, kmeans_solver="coremltools")
    model = palettize(model, cfg)
    kept, total = zeros_kept(before, model)
    assert total > 0 and kept == total
    query = model.get_submodule("encoder.layer.0.attention.self.query")
    assert getattr(query, f"{COREML_PREFIX}/weight/compression_type").tolist() == [1, 2]


def test_weights_round_trip_with_their_metadata(tiny_bert, tmp_path):
    from safetensors.torch import load_file

    model = prune(tiny_bert(), PruneConfig(method="magnitude", target_sparsity=0.5))
    save_weights(model, tmp_path / "w.safetensors")
    state = load_file(str(tmp_path / "w.safetensors"))
    fresh = tiny_bert()
    register_metadata(fresh, state)
    fresh.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert not list(tmp_path.glob("*.partial"))
    np.testing.assert_array_equal(
        fresh.get_submodule("encoder.layer.1.output.dense").weight.detach().numpy(),
        model.get_submodule("encoder.layer.1.output.dense").weight.detach().numpy())


@pytest.mark.parametrize("method", ["kmeans", "sensitive_kmeans"])
@pytest.mark.parametrize("solver", ["coremltools", "exact_dp"])
def test_sparse_gpt_zeros_survive_palettization(tiny_bert, method, solver):
    model = prune(tiny_bert(), PruneConfig(method="sparse_gpt", target_sparsity=0.4), token_batches(4))
    before = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(".weight")}
    values = sensitivity(model, pair_batches(2), cosine_loss) if method == "sensitive_kmeans" else None
    cfg = PalettizeConfig(method=method, n_bits=2, granularity="per_grouped_channel", group_size=16,
                          num_kmeans_workers=1, kmeans_solver=solver)
    model = palettize(model, cfg, values)
    assert keep_pruned_zeros(model, cfg, before, values) == 2 * 6  # every Linear of both layers
    kept, total = zeros_kept(before, model)
    assert total > 0 and kept == total
    dense = model.get_submodule("encoder.layer.1.intermediate.dense")
    lut = getattr(dense, f"{COREML_PREFIX}/weight/lut")
    assert tuple(lut.shape) == (128 // 16, 1, 4, 1) and torch.all(lut[:, 0, 0, 0] == 0)
    for group, start in enumerate(range(0, 128, 16)):
        block = dense.weight.detach()[start:start + 16]
        assert set(torch.unique(block).tolist()) <= set(lut[group, 0, :, 0].tolist())
    assert getattr(dense, f"{COREML_PREFIX}/weight/compression_type").tolist() == [1, 2]


def test_pruned_weights_drop_what_the_converter_drops(tiny_bert):
    from coreml_pipeline.techniques.precision import snap_like_converter

    model = prune(tiny_bert(), PruneConfig(method="magnitude", target_sparsity=0.3))
    dense = model.get_submodule("encoder.layer.0.intermediate.dense")
    with torch.no_grad():
        dense.weight[0, :4] = torch.tensor([5e-4, -9e-4, 2e-3, -0.5])
    snap_like_converter(model)
    assert dense.weight[0, :4].tolist() == pytest.approx([0.0, 0.0, 2e-3, -0.5])
    assert float(dense.weight.detach().abs()[dense.weight.detach() != 0].min()) >= float(np.finfo(np.float16).eps)


@pytest.mark.parametrize("method", ["kmeans", "sensitive_kmeans"])
def test_exact_dp_keeps_pruned_zeros_at_no_more_weight_error_than_coremltools(tiny_bert, method):
    """exact_dp's sparse tables are optimal with zero as a fixed entry: on every pruned layer the
    (sensitivity-weighted) weight error is at most coremltools' way's (zero fixed, kmeans1d over
    the survivors), on some below it, and the zeros survivors take are zeros of the package too."""
    pruned = prune(tiny_bert(), PruneConfig(method="sparse_gpt", target_sparsity=0.4), token_batches(4))
    before = {k: v.clone() for k, v in pruned.state_dict().items() if k.endswith(".weight")}
    values = sensitivity(pruned, pair_batches(2), cosine_loss) if method == "sensitive_kmeans" else None
    errors = {}
    for solver in ("coremltools", "exact_dp"):
        model = copy.deepcopy(pruned)
        cfg = PalettizeConfig(method=method, n_bits=2, granularity="per_grouped_channel", group_size=16,
                              num_kmeans_workers=1, kmeans_solver=solver)
        model = palettize(model, cfg, values)
        keep_pruned_zeros(model, cfg, before, values)
        errors[solver] = {}
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and f"{name}.weight" in before:
                importance = values[f"{name}.weight"] if values is not None else 1.0
                errors[solver][name] = float((importance * (module.weight.detach() - before[f"{name}.weight"]) ** 2).sum())
    assert errors["exact_dp"].keys() == errors["coremltools"].keys() and len(errors["exact_dp"]) == 12
    for name, error in errors["exact_dp"].items():
        assert error <= errors["coremltools"][name] * (1 + 1e-6), name
    assert sum(errors["exact_dp"].values()) < sum(errors["coremltools"].values()) * 0.999
