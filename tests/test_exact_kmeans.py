"""The optimal 1-D k-means (coreml_pipeline/kmeans.py) and palettize.kmeans_solver=exact_dp.

coremltools' kmeans1d is the reference: on the same (weighted) data the exact
solver must reach the same optimal cost, and through the palettize stage the
same look-up tables and metadata as SKMPalettizer wherever every weight has
some importance.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from coreml_pipeline.config.schema import ConfigError, PalettizeConfig
from coreml_pipeline.kmeans import cluster_groups, weighted_error
from coreml_pipeline.techniques import palettize
from coreml_pipeline.validation import validate


def kmeans1d_error(values: np.ndarray, k: int, weights: np.ndarray | None) -> float:
    from coreml_pipeline.coreml.private import kmeans1d

    found, clusters = kmeans1d(values, k, weights=weights)
    centroids, labels = np.asarray(found), np.asarray(clusters)
    return float((((centroids[labels] - values) ** 2) * (1.0 if weights is None else weights)).sum())


@pytest.mark.parametrize("weighted", [False, True])
def test_same_optimal_cost_as_coremltools_kmeans1d(weighted):
    """Ties, duplicates and groups with fewer distinct values than k included."""
    generator = np.random.default_rng(1)
    for trial in range(40):
        n, k = int(generator.integers(1, 400)), int(generator.choice([2, 3, 16, 64, 256]))
        # Rounded values: many ties, and groups with fewer distinct values than k.
        values = np.round(generator.standard_t(4, size=(3, n)), int(generator.integers(0, 4)))
        weights = generator.random((3, n)) + 1e-3 if weighted else None
        centroids, labels = cluster_groups(values, k, weights)
        assert centroids.shape == (3, k) and labels.shape == (3, n)
        for group in range(3):
            w = None if weights is None else weights[group]
            expected = kmeans1d_error(values[group], k, w)
            got = weighted_error(values[group:group + 1], centroids[group:group + 1], labels[group:group + 1],
                                 None if w is None else w[None])
            assert got == pytest.approx(expected, rel=1e-9, abs=1e-12), (trial, group, n, k)
            distinct = len(np.unique(values[group]))
            used = centroids[group, :min(k, distinct)]
            assert np.all(np.diff(used) >= 0) and np.all(centroids[group, min(k, distinct):] == 0)


def test_zero_importance_never_worse_than_kmeans1d_and_never_nan():
    """Sensitivities are often exactly zero (no gradient reached a weight). kmeans1d
    then returns NaN centroids (a cluster of total weight zero) or a worse partition;
    the exact solver stays finite and at or below kmeans1d's cost."""
    generator = np.random.default_rng(2)
    worse = nan = 0
    for trial in range(40):
        n, k = int(generator.integers(20, 300)), int(generator.choice([4, 16]))
        values = np.round(generator.normal(size=(1, n)), 2)
        weights = generator.random((1, n)) * (generator.random((1, n)) > 0.4)
        centroids, labels = cluster_groups(values, k, weights)
        assert np.isfinite(centroids).all()
        got, expected = weighted_error(values, centroids, labels, weights), kmeans1d_error(values[0], k, weights[0])
        nan += int(np.isnan(expected))
        if not np.isnan(expected):
            assert got <= expected * (1 + 1e-9) + 1e-12, trial
            worse += int(got < expected * (1 - 1e-6))
    assert nan + worse > 0  # the case is real: kmeans1d fails on some of these groups


def test_values_without_importance_take_their_nearest_entry():
    """A zero-importance value (an embedding row no calibration token used) costs
    nothing anywhere; coremltools' kmeans1d leaves it in whatever segment the
    optimum's boundaries put it, the exact solver gives it the nearest entry."""
    values = np.array([[-1.0, -0.9, -0.2, -0.1, 0.3, 1.0, 1.1]])
    weights = np.array([[1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]])
    centroids, labels = cluster_groups(values, 2, weights)
    np.testing.assert_allclose(centroids[0], [-0.95, 1.05])
    assert labels[0].tolist() == [0, 0, 0, 0, 1, 1, 1]


def _prefix_sums(values: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    unique, inverse = np.unique(values, return_inverse=True)
    merged = np.bincount(inverse, weights=weights)
    x = unique - (merged * unique).sum() / merged.sum() if merged.sum() > 0 else unique - unique.mean()
    sums = [np.concatenate([[0.0], np.cumsum(merged * x ** power)]) for power in range(3)]
    return sums[0], sums[1], sums[2], unique.size


def test_rows_skipped_by_the_bound_leave_the_partition_as_the_full_dynamic_program_gives_it():
    """_segments skips the rows a near-optimal partition proves useless and computes only row n
    of the last layer; every start must equal the full dynamic program's, ties among
    zero-importance values (a group no calibration token reached) included."""
    from coreml_pipeline.kmeans import _layers, _segments, _starts

    generator = np.random.default_rng(3)
    for trial in range(120):
        n, k = int(generator.integers(2, 20000)), int(generator.choice([2, 3, 16, 64, 256]))
        values = generator.standard_normal(n) * 10 ** generator.uniform(-3, 1)
        if trial % 3 == 0:
            values = np.round(values, 2)
        weights = generator.random(n) ** 3
        if trial % 2 == 0:
            weights[generator.random(n) < 0.5] = 0.0
        if trial % 11 == 0:
            weights[:] = 0.0
        p0, p1, p2, points = _prefix_sums(values, weights)
        clusters = min(k, points)
        full = np.zeros((clusters, points + 1), dtype=np.int32)
        empty = np.empty(0)  # no bound and no fixed entry: every row of each layer but the last
        _layers(p0, p1, p2, points, clusters, np.inf, full, empty, empty, np.empty(0, dtype=np.int64))
        assert np.array_equal(_segments(p0, p1, p2, points, clusters), _starts(full, points, clusters)), trial


def test_the_order_the_sort_leaves_equal_values_in_changes_nothing():
    """numpy's argsort is not stable and orders ties differently on different vector units: the
    merged points' weights are summed in index order, so any sorting order gives the same bits."""
    from coreml_pipeline.kmeans import _cluster_one

    generator = np.random.default_rng(4)
    values = np.round(generator.standard_normal(3000), 1)
    values[generator.random(3000) < 0.2] = -0.0
    values[generator.random(3000) < 0.2] = 0.0
    weights = generator.random(3000) * 1e-3 + generator.random(3000) ** 9
    index = np.arange(values.size)
    results = []
    for tie_key in (index, -index, generator.random(values.size)):  # ties in index order, reversed, shuffled
        order = np.lexsort((tie_key, values))
        centroids, labels = np.zeros(16), np.zeros(values.size, dtype=np.int64)
        _cluster_one(values, weights, order, 16, centroids, labels)
        results.append((centroids.tobytes(), labels.tobytes()))
    assert results[0] == results[1] == results[2]


def _keeping_zero_reference(values: np.ndarray, weights: np.ndarray, k: int) -> float:
    """The least weighted error of a table with entry 0 at zero and k - 1 free entries, where every
    exact zero takes entry 0, by the plain O(k n^2) recurrence over the sorted distinct values."""
    unique, inverse = np.unique(values, return_inverse=True)
    w = np.bincount(inverse, weights=weights)
    n = unique.size

    def free(j, i):  # one free entry for points j..i-1: their weighted mean (any value when weightless)
        weight = w[j:i].sum()
        if 0.0 in unique[j:i]:
            return np.inf  # an exact zero must stay zero
        return 0.0 if weight == 0 else float((w[j:i] * (unique[j:i] - (w[j:i] * unique[j:i]).sum() / weight) ** 2).sum())

    at_zero = lambda j, i: float((w[j:i] * unique[j:i] ** 2).sum())  # noqa: E731
    inf = np.inf
    # best[i][c][z]: points before i covered by c free segments, z: the zero segment used
    best = np.full((n + 1, k, 2), inf)
    best[0][0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(i):
            for c in range(k):
                for z in range(2):
                    if best[j][c][z] == inf:
                        continue
                    if c + 1 < k:
                        best[i][c + 1][z] = min(best[i][c + 1][z], best[j][c][z] + free(j, i))
                    if z == 0:
                        best[i][c][1] = min(best[i][c][1], best[j][c][0] + at_zero(j, i))
    no_zero_segment = best[n, :, 0] if 0.0 not in unique else np.full(k, inf)
    return float(min(best[n, :, 1].min(), no_zero_segment.min()))


def test_tables_keeping_zero_are_optimal_and_keep_every_zero():
    """Sparse palettization's tables (entry 0 at zero): the least weighted error over every
    table with a zero entry (a plain recurrence checks it), every exact zero stays zero, and the
    error is never above coremltools' way (zero fixed, kmeans1d over the surviving values)."""
    from coreml_pipeline.techniques.palettize import _zero_and_kmeans

    generator = np.random.default_rng(6)
    better = 0
    for trial in range(60):
        n, k = int(generator.integers(1, 50)), int(generator.choice([2, 4, 8]))
        values = np.round(generator.standard_normal(n), int(generator.integers(1, 3)))
        values[generator.random(n) < 0.4] = 0.0
        if trial % 5 == 0:
            values = np.abs(values)  # one side of zero only
        weights = generator.random(n) + 1e-3
        if trial % 3 == 0:
            weights[generator.random(n) < 0.3] = 0.0
        tables, labels = cluster_groups(values[None], k, weights[None], keep_zero=True)
        assert tables[0, 0] == 0.0 and np.all(np.diff(tables[0, 1:][tables[0, 1:] != 0]) > 0), trial
        got = weighted_error(values[None], tables, labels, weights[None])
        assert got == pytest.approx(_keeping_zero_reference(values, weights, k), rel=1e-9, abs=1e-12), trial
        assert np.all(tables[0, labels[0]][values == 0] == 0), trial
        if (values != 0).any() and weights.all():
            kept, _ = _zero_and_kmeans(values.astype(np.float32), int(np.log2(k)), weights)
            theirs = float((weights * (kept - values) ** 2).sum())
            assert got <= theirs * (1 + 1e-6) + 1e-9, trial
            better += int(got < theirs * (1 - 1e-6))
    assert better > 0  # survivors near zero taking the zero entry frees an entry for the rest


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="non-negative"):
        cluster_groups(np.ones((1, 4)), 2, -np.ones((1, 4)))
    with pytest.raises(ValueError, match="groups, n"):
        cluster_groups(np.ones(4), 2)


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("embed", torch.nn.Embedding(50, 32))
    model.add_module("dense", torch.nn.Linear(32, 48))
    return model


def skm_and_exact_dp(**options) -> tuple[dict, dict, dict]:
    """SKMPalettizer's and exact_dp's state dicts of the tiny model (3 bits, group 8) with positive random
    importance everywhere (so the optimum is unique), and that importance."""
    cfg = PalettizeConfig(method="sensitive_kmeans", n_bits=3, group_size=8, num_kmeans_workers=1,
                          kmeans_solver="coremltools", **options)
    generator = torch.Generator().manual_seed(0)
    sensitivity = {f"{name}.weight": torch.rand(m.weight.shape, generator=generator) + 0.01
                   for name, m in tiny_model().named_children()}
    reference = palettize.palettize(tiny_model(), cfg, sensitivity).state_dict()
    exact = palettize.palettize(tiny_model(), dataclasses.replace(cfg, kmeans_solver="exact_dp"), sensitivity)
    return reference, exact.state_dict(), sensitivity


def test_exact_dp_registers_the_tables_skm_palettizer_would(tmp_path):
    """Positive importance everywhere: the optimum is unique, so the exact solver's
    weights, tables, compression types and metadata version equal SKMPalettizer's."""
    reference, exact, _ = skm_and_exact_dp()
    assert sorted(exact) == sorted(reference)
    for key, value in reference.items():
        assert exact[key].shape == value.shape and exact[key].dtype == value.dtype, key
        torch.testing.assert_close(exact[key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.mark.parametrize("lut_dtype", ["int8", "uint8"])
def test_exact_dp_quantizes_its_tables_as_skm_palettizer_does(lut_dtype):
    """lut_dtype: the optimal tables quantized as coremltools' palettizers quantize theirs. With positive
    importance the optimum is unique, so the quantized tables, their scales (and uint8's zero points),
    compression types and metadata equal SKMPalettizer's; each weight then takes its nearest quantized entry
    (coremltools keeps its cluster's), so the weighted error is never above SKMPalettizer's."""
    reference, exact, sensitivity = skm_and_exact_dp(lut_dtype=lut_dtype)
    assert sorted(exact) == sorted(reference)
    assert any(key.endswith("quantization_scale") for key in reference)
    assert any(key.endswith("zero_point") for key in reference) == (lut_dtype == "uint8")
    original = tiny_model().state_dict()
    for key, value in reference.items():
        assert exact[key].shape == value.shape and exact[key].dtype == value.dtype, key
        if key.endswith(".weight"):
            errors = [float((sensitivity[key].double() * (state[key].double() - original[key].double()) ** 2).sum())
                      for state in (reference, exact)]
            assert errors[1] <= errors[0] * (1 + 1e-12), (key, errors)
        else:
            torch.testing.assert_close(exact[key], value, rtol=1e-6, atol=1e-7, msg=key)


def test_exact_dp_data_free_error_is_never_above_coremltools():
    """Data-free, coremltools rounds weights to 4 decimals before its k-means
    (enable_fast_kmeans_mode); the exact solver clusters the weights themselves."""
    cfg = PalettizeConfig(method="kmeans", n_bits=6, group_size=16, num_kmeans_workers=1, kmeans_solver="coremltools")
    original = tiny_model()
    reference = palettize.palettize(tiny_model(), cfg)
    exact = palettize.palettize(tiny_model(), dataclasses.replace(cfg, kmeans_solver="exact_dp"))
    for name in ("embed", "dense"):
        weight = getattr(original, name).weight.detach()
        reference_weight, exact_weight = getattr(reference, name).weight.detach(), getattr(exact, name).weight.detach()
        error_reference = float(((reference_weight - weight) ** 2).sum())
        error_exact = float(((exact_weight - weight) ** 2).sum())
        assert error_exact <= error_reference * (1 + 1e-9), name


@pytest.mark.parametrize("override, message", [
    ({"method": "uniform"}, "method=kmeans or sensitive_kmeans"),
    ({"cluster_dim": 2, "method": "kmeans"}, "cluster_dim=1 only"),
    ({"kmeans_solver": "fast"}, "auto, coremltools, exact_dp"),
])
def test_exact_dp_refuses_what_it_does_not_compute(override, message):
    import yaml

    from coreml_pipeline.config.compose import compose_text

    params = yaml.safe_load(compose_text(["palettize.kmeans_solver=exact_dp"]))
    params["palettize"].update(override)
    with pytest.raises(ConfigError, match="palettize.kmeans_solver") as error:
        validate(params)
    assert message in str(error.value)


def test_auto_runs_exact_dp_wherever_it_applies():
    """kmeans_solver=auto (the default): exact_dp for k-means tables it computes, coremltools for vector
    entries, quantized tables, per-channel scales and methods that are not k-means; a named solver is kept."""
    import yaml

    from coreml_pipeline.config.compose import compose_text
    from coreml_pipeline.techniques import registry

    params = validate(yaml.safe_load(compose_text([])))
    default = params["palettize"]
    assert default.kmeans_solver == "auto"
    assert registry.get("palettize", default.method).solver(default) == "exact_dp"
    kmeans = registry.get("palettize", "kmeans")
    assert kmeans.solver(PalettizeConfig(method="kmeans")) == "exact_dp"
    per_tensor = {"granularity": "per_tensor", "group_size": None}
    assert kmeans.solver(PalettizeConfig(method="kmeans", cluster_dim=2, **per_tensor)) == "coremltools"
    assert kmeans.solver(PalettizeConfig(method="kmeans", lut_dtype="int8")) == "exact_dp"
    assert kmeans.solver(PalettizeConfig(method="kmeans", enable_per_channel_scale=True, **per_tensor)) == "exact_dp"
    assert registry.get("palettize", "uniform").solver(PalettizeConfig(method="uniform")) == "coremltools"
    assert kmeans.solver(PalettizeConfig(method="kmeans", kmeans_solver="coremltools")) == "coremltools"


def test_auto_gives_exact_dps_weights():
    cfg = PalettizeConfig(method="kmeans", n_bits=3, group_size=16, num_kmeans_workers=1)
    auto = palettize.palettize(tiny_model(), cfg).state_dict()
    exact = palettize.palettize(tiny_model(), dataclasses.replace(cfg, kmeans_solver="exact_dp")).state_dict()
    assert sorted(auto) == sorted(exact) and all(torch.equal(auto[k], exact[k]) for k in auto)


def test_sensitivities_read_layer_by_layer_give_the_same_weights(tmp_path):
    """The palettize stage reads the calibrate stage's file layer by layer (model.LazyTensors) instead of
    holding it whole: the same tensors as load_file, so the same palettized weights."""
    from safetensors.torch import load_file

    from coreml_pipeline.model import LazyTensors, save_tensors

    generator = torch.Generator().manual_seed(0)
    sensitivity = {f"{name}.weight": torch.rand(m.weight.shape, generator=generator) + 0.01
                   for name, m in tiny_model().named_children()}
    save_tensors(sensitivity, tmp_path / "s.safetensors")
    lazy = LazyTensors(tmp_path / "s.safetensors")
    assert sorted(lazy) == sorted(load_file(tmp_path / "s.safetensors")) and len(lazy) == len(sensitivity)
    assert all(torch.equal(lazy[k], v) for k, v in sensitivity.items())
    with pytest.raises(KeyError):
        lazy["missing.weight"]
    cfg = PalettizeConfig(method="sensitive_kmeans", n_bits=3, group_size=8, num_kmeans_workers=1)
    whole = palettize.palettize(tiny_model(), cfg, sensitivity).state_dict()
    layered = palettize.palettize(tiny_model(), cfg, lazy).state_dict()
    assert sorted(whole) == sorted(layered) and all(torch.equal(whole[k], layered[k]) for k in whole)


def test_tied_weights_are_both_clustered_from_the_weight_before_palettizing():
    """exact_dp takes one layer's weight at a time; a weight two layers share (a language model's head and
    its token embedding) is still clustered, for each, from its value before either was palettized."""
    cfg = PalettizeConfig(method="kmeans", n_bits=2, group_size=8, num_kmeans_workers=1, kmeans_solver="exact_dp",
                          layer_bits={"b": 3})

    def two_layers(tie: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Sequential()
        model.add_module("a", torch.nn.Linear(32, 48))
        model.add_module("b", torch.nn.Linear(32, 48))
        model.b.weight = model.a.weight if tie else torch.nn.Parameter(model.a.weight.detach().clone())
        return model

    tied, separate = palettize.palettize(two_layers(True), cfg), palettize.palettize(two_layers(False), cfg)
    # The shared tensor ends as the last layer's (3-bit) result, computed from the original weight.
    assert torch.equal(tied.b.weight, separate.b.weight) and not torch.equal(separate.a.weight, separate.b.weight)


@pytest.mark.parametrize("method, granularity", [("kmeans", "per_tensor"), ("sensitive_kmeans", "per_tensor"),
                                                 ("sensitive_kmeans", "per_grouped_channel")])
def test_per_channel_scales_same_layout_as_coremltools_and_never_more_weight_error(method, granularity):
    """enable_per_channel_scale: exact_dp scales channels as coremltools does and registers the same
    metadata (the converter's constexpr ops read it), and its tables, weighted by each channel's
    squared scale, never give more (sensitivity-weighted) error on the weights themselves."""
    cfg = PalettizeConfig(method=method, n_bits=3, granularity=granularity,
                          group_size=8 if granularity == "per_grouped_channel" else None,
                          enable_per_channel_scale=True, num_kmeans_workers=1, kmeans_solver="coremltools")
    generator = torch.Generator().manual_seed(1)
    original = tiny_model()
    with torch.no_grad():  # channels of very different magnitudes: where the weighting matters
        for module in original.children():
            module.weight.mul_(torch.logspace(-2, 0, module.weight.shape[0])[:, None])
    sensitivity = ({f"{name}.weight": torch.rand(m.weight.shape, generator=generator) + 0.01
                    for name, m in original.named_children()} if method == "sensitive_kmeans" else None)

    def palettized(solver):
        model = tiny_model()
        model.load_state_dict(original.state_dict())
        return palettize.palettize(model, dataclasses.replace(cfg, kmeans_solver=solver), sensitivity)

    reference, exact = palettized("coremltools"), palettized("exact_dp")
    for name in ("embed", "dense"):
        reference_state = {k: v for k, v in reference.state_dict().items() if k.startswith(f"{name}.")}
        exact_state = {k: v for k, v in exact.state_dict().items() if k.startswith(f"{name}.")}
        assert sorted(exact_state) == sorted(reference_state), name
        scale_key = f"{name}._COREML_/weight/palettization_scale"
        torch.testing.assert_close(exact_state[scale_key], reference_state[scale_key], rtol=0, atol=0)
        weight = getattr(original, name).weight.detach().double()
        importance = sensitivity[f"{name}.weight"].double() if sensitivity else 1.0
        errors = [float((((getattr(model, name).weight.detach().double() - weight) ** 2) * importance).sum())
                  for model in (reference, exact)]
        assert errors[1] <= errors[0] * (1 + 1e-9), (name, errors)
