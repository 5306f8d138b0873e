"""Palettization of torch weights: coremltools' k-means, sensitive k-means and uniform tables,
the exact k-means solver, mixed bits per layer, and zero-keeping sparse palettization."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from coreml_pipeline import runtime
from coreml_pipeline.config.schema import PalettizeConfig, TensorPaletteConfig, first_match
from coreml_pipeline.model import (
    PALETTIZATION,
    PRUNING,
    WEIGHT_LAYER_TYPES,
    compressible_weights,
    compression_metadata,
    compression_types,
)
from coreml_pipeline.techniques.methods.palettize import grouping_axis  # importing it also registers the methods
from coreml_pipeline.techniques.precision import round_like_package, warn_lost_rows
from coreml_pipeline.techniques.registry import get


def module_config(cfg: TensorPaletteConfig, n_bits: int | None = None, channel_axis: int = 0) -> dict:
    grouped = cfg.granularity == "per_grouped_channel"
    return {
        "n_bits": n_bits or cfg.n_bits,
        "granularity": cfg.granularity,
        "group_size": cfg.group_size if grouped else None,
        "channel_axis": channel_axis,
        "enable_per_channel_scale": cfg.enable_per_channel_scale,
        "lut_dtype": cfg.lut_dtype,
        "cluster_dim": cfg.cluster_dim if cfg.cluster_dim > 1 else None,
    }


def layer_n_bits(cfg: PalettizeConfig, name: str, embedding: bool) -> int:
    """Bits of one layer: the first palettize.layer_bits pattern that fully matches
    its name (coremltools' module_name_configs rule), else the section's default."""
    return first_match(cfg.layer_bits, name, (cfg.embeddings.n_bits or cfg.n_bits) if embedding else cfg.n_bits)


def palettized_layers(model: torch.nn.Module, cfg: PalettizeConfig) -> list[tuple[str, torch.nn.Module]]:
    """The layers this section palettizes; fails on a layer_bits pattern that matches none of them."""
    layers = [(name, module) for name, module in compressible_weights(model)
              if cfg.embeddings.enabled or not isinstance(module, torch.nn.Embedding)]
    for pattern in cfg.layer_bits:
        if not any(re.fullmatch(pattern, name) for name, _ in layers):
            examples = ", ".join(name for name, _ in layers[:3])
            raise ValueError(f"config error: palettize.layer_bits key {pattern!r} matches no palettized layer; "
                             f"allowed: a regex over layer names such as {examples}")
    return layers


def palettizer_config(cfg: PalettizeConfig, model: torch.nn.Module) -> dict:
    embeddings = cfg.embeddings
    options = {
        "global_config": module_config(cfg),
        "module_type_configs": {
            **{kind: module_config(cfg) for kind in WEIGHT_LAYER_TYPES},
            "Embedding": module_config(cfg, embeddings.n_bits, embeddings.channel_axis) if embeddings.enabled else None,
        },
    }
    layers = palettized_layers(model, cfg)
    # One exact entry per layer rather than the user's patterns: an embedding needs its own channel_axis,
    # and so does a layer grouped along its input channels (channel_axis).
    named = {
        re.escape(name): module_config(cfg, layer_n_bits(cfg, name, isinstance(module, torch.nn.Embedding)),
                                       channel_axis(module, cfg))
        for name, module in layers
        if cfg.layer_bits or (channel_axis(module, cfg) != 0 and not isinstance(module, torch.nn.Embedding))
    }
    if named:
        options["module_name_configs"] = named
    return options


def channel_axis(module: torch.nn.Module, cfg: PalettizeConfig) -> int:
    """The axis a layer's channels are grouped along (methods/palettize.py grouping_axis)."""
    return grouping_axis(isinstance(module, torch.nn.Embedding), tuple(module.weight.shape), cfg, cfg.group_size)


def palettize(model: torch.nn.Module, cfg: PalettizeConfig, sensitivity: Mapping[str, torch.Tensor] | None = None):
    """``model`` palettized by the method palettize.method names (sensitivity: sensitive_kmeans's)."""
    return get("palettize", cfg.method).apply(model, cfg, sensitivity=sensitivity)


def coremltools_kmeans(model: torch.nn.Module, cfg: PalettizeConfig, sensitivity: Mapping[str, torch.Tensor] | None):
    """coremltools' PostTrainingPalettizer (no sensitivity) or SKMPalettizer (sensitivity given)."""
    from coremltools.optimize.torch.palettization import (
        PostTrainingPalettizer,
        PostTrainingPalettizerConfig,
        SKMPalettizer,
        SKMPalettizerConfig,
    )

    options = palettizer_config(cfg, model)
    if sensitivity is None:
        palettizer = PostTrainingPalettizer(model, PostTrainingPalettizerConfig.from_dict(options))
        return palettizer.compress(num_kmeans_workers=cfg.num_kmeans_workers, inplace=True)
    palettizer = SKMPalettizer(model, SKMPalettizerConfig.from_dict(options))
    with tempfile.TemporaryDirectory() as tmp:
        # SKMPalettizer reads sensitivities only from a torch.save file.
        path = Path(tmp) / "sensitivity.pt"
        torch.save(dict(sensitivity), path)  # a dict, also when given a LazyTensors
        return palettizer.compress(sensitivity_path=str(path), num_kmeans_workers=cfg.num_kmeans_workers, inplace=True)


def _grouped(weight: np.ndarray, axis: int, group: int) -> np.ndarray:
    """(groups, values) with each group's channels along ``axis`` contiguous, as coremltools groups them."""
    moved = np.moveaxis(weight, axis, 0)
    return np.ascontiguousarray(moved).reshape(moved.shape[0] // group, -1)


def _palettized_layers_with_grouping(model: torch.nn.Module, cfg: PalettizeConfig) -> list[tuple]:
    """Per palettized layer: (name, module, channel axis, n_bits, channels per group); a layer whose
    channels do not divide by the group size is left uncompressed, as coremltools does
    (check_all_palettized names it)."""
    layers = []
    for name, module in palettized_layers(model, cfg):
        embedding = isinstance(module, torch.nn.Embedding)
        axis = channel_axis(module, cfg)
        channels = module.weight.shape[axis]
        group = cfg.group_size if cfg.granularity == "per_grouped_channel" else channels
        if channels % group == 0:
            layers.append((name, module, axis, layer_n_bits(cfg, name, embedding), group))
    return layers


def _tied_originals(modules: list[torch.nn.Module]) -> dict[int, torch.Tensor]:
    """A copy of every weight that more than one of ``modules`` holds, keyed by its data pointer."""
    pointers = [module.weight.data_ptr() for module in modules]
    return {module.weight.data_ptr(): module.weight.detach().clone() for module in modules
            if pointers.count(module.weight.data_ptr()) > 1}


def _weight_groups(model: torch.nn.Module, cfg: PalettizeConfig):
    """Per palettized layer: (name, module, axis, n_bits, group), ``group`` being the
    weight as (groups, values) (_grouped)."""
    for name, module, axis, n_bits, group in _palettized_layers_with_grouping(model, cfg):
        yield name, module, axis, n_bits, _grouped(module.weight.detach().numpy().astype(np.float32), axis, group)


def per_channel_scale(weight: torch.Tensor) -> torch.Tensor:
    """coremltools' per-channel scale (its k-means module's _scale_by_per_channel_scale): each output
    channel's largest magnitude, 1 for an all-zero channel; shape (channels, 1)."""
    scale = torch.max(torch.abs(weight.flatten(1)), dim=1, keepdim=True).values
    scale[scale == 0] = 1
    return scale


def _quantized_tables(tables: np.ndarray, lut_dtype: str) -> tuple[np.ndarray, dict[str, torch.Tensor]]:
    """palettize.lut_dtype: each group's table quantized as coremltools' palettizers quantize theirs
    (symmetric linear, one scale per table), and the metadata they register: quantization_n_bits,
    quantization_scale (groups, 1) and, for uint8, the zero points."""
    from coreml_pipeline.coreml.private import quantize_lut

    dtype = getattr(torch, lut_dtype)
    rows, scales, zero_points = [], [], []
    for table in tables:
        entries, scale, zero_point = quantize_lut(dtype, torch.from_numpy(table))
        rows.append(entries.numpy())
        scales.append(scale)
        if zero_point is not None:
            zero_points.append(zero_point)
    fields = {"quantization_n_bits": torch.iinfo(dtype).bits, "quantization_scale": torch.stack(scales)}
    if zero_points:
        fields["zero_point"] = torch.stack(zero_points)
    return np.stack(rows), fields


def _nearest_entries(values: np.ndarray, tables: np.ndarray) -> np.ndarray:
    """Each value's nearest entry of its group's table (groups x n values, groups x k ascending entries)."""
    labels = np.empty(values.shape, dtype=np.int64)
    for group, (row, table) in enumerate(zip(values, tables)):
        labels[group] = np.searchsorted((table[1:] + table[:-1]) / 2, row)
    return labels


def _store_palettized(module: torch.nn.Module, axis: int, values: np.ndarray, tables: np.ndarray,
                      scale: torch.Tensor | None = None, lut_fields: dict | None = None) -> None:
    """Write back a layer's palettized weight (laid out as _weight_groups gave it, times ``scale``
    per output channel when given) and register its look-up tables (groups, 2**n) as coremltools'
    palettizers do, in the layout of the weight's axes: (groups, 1, 2**n, 1) or (1, groups, 2**n, 1)
    for a matrix, (groups, 1, 1, 1, 2**n, 1) for a 2-D convolution; and the scales, (channels, 1, ...)."""
    from coreml_pipeline.coreml.private import register_compression

    moved_shape = np.moveaxis(module.weight.detach().numpy(), axis, 0).shape
    palettized = torch.from_numpy(np.ascontiguousarray(np.moveaxis(values.reshape(moved_shape), 0, axis)))
    fields = {}
    if scale is not None:  # as coremltools' _unscale_by_per_channel_scale
        palettized = (palettized.flatten(1) * scale).reshape(palettized.shape)
        fields["palettization_scale"] = scale.reshape(-1, *([1] * (module.weight.dim() - 1)))
    with torch.no_grad():
        module.weight.copy_(palettized)
    table = torch.from_numpy(np.ascontiguousarray(tables))
    layout = [1] * module.weight.ndim
    layout[axis] = table.shape[0]
    table = table.reshape(*layout, table.shape[1], 1)
    for key, value in (lut_fields or {}).items():  # a quantized table: its scales in the table's layout
        fields[key] = value if key == "quantization_n_bits" else value.reshape(*layout, 1, 1)
    kinds = ["palettization", "quantization"] if lut_fields else ["palettization"]
    register_compression(module, lut=table, compression_type=kinds, **fields)


def exact_palettize(model: torch.nn.Module, cfg: PalettizeConfig,
                    sensitivity: Mapping[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """k-means palettization with palettize.kmeans_solver=exact_dp.

    The same grouping, weighting and table layout as PostTrainingPalettizer /
    SKMPalettizer, but every group's table is the optimal weighted 1-D k-means
    from coreml_pipeline.kmeans (all groups of a layer at once, on
    num_kmeans_workers threads). coremltools has no hook for its torch-side
    k-means, so the metadata its palettizers register (look-up table,
    compression type, metadata version) is registered here, and ct.convert
    reads it unchanged."""
    from coreml_pipeline.coreml.private import register_metadata_version
    from coreml_pipeline.kmeans import cluster_groups

    # One layer's grouped copy at a time (taking every layer's up front held a second float32 copy of the
    # model through the whole k-means: the stage's peak on the 200 M stack, scaling benchmark). Tied weights
    # (a language model's head and its token embedding) are taken before either is palettized, as then.
    layers = _palettized_layers_with_grouping(model, cfg)
    tied = _tied_originals([module for _, module, _, _, _ in layers])
    for name, module, axis, n_bits, group in runtime.progress(layers, "k-means (exact_dp)", unit="layer"):
        weight = tied.get(module.weight.data_ptr(), module.weight.detach())
        scale = per_channel_scale(weight) if cfg.enable_per_channel_scale else None
        if scale is not None:  # the tables are shared by channels scaled to [-1, 1], as coremltools does
            weight = (weight.flatten(1) / scale).reshape(weight.shape)
        groups = _grouped(weight.numpy().astype(np.float32), axis, group)
        importance = None
        if sensitivity is not None:
            importance = _grouped(sensitivity[f"{name}.weight"].numpy().astype(np.float32), axis, group)
        if scale is not None:
            # The package stores entry x channel scale, so a scaled value's error counts its scale squared:
            # weighted so, the tables are optimal for the weights themselves (coremltools weighs the scaled
            # values alike, which lets its tables favour the channels with the smallest weights).
            squared = (scale.double() ** 2).numpy().reshape(-1, *([1] * (weight.dim() - 1)))
            by_channel = _grouped(np.ascontiguousarray(np.broadcast_to(squared, weight.shape)), axis, group)
            importance = by_channel if importance is None else importance * by_channel
        centroids, labels = cluster_groups(groups, 2 ** n_bits, importance, threads=cfg.num_kmeans_workers)
        lut_fields = None
        if cfg.lut_dtype:  # the optimal tables quantized as coremltools quantizes its own (float64 as its are)
            centroids, lut_fields = _quantized_tables(centroids, cfg.lut_dtype)
            # coremltools keeps each value's cluster; its entry has moved, so the nearest entry now can be
            # another one: taking it lowers every value's (weighted) error, none raises it.
            labels = _nearest_entries(groups, centroids)
        lut = centroids.astype(np.float32)  # coremltools also casts its float64 centroids to the weight's dtype
        _store_palettized(module, axis, np.take_along_axis(lut, labels, axis=1), lut, scale, lut_fields)
    register_metadata_version(model)
    return model


def uniform_palettize(model: torch.nn.Module, cfg: PalettizeConfig) -> torch.nn.Module:
    """Evenly spaced look-up tables. coremltools offers uniform mode only on the
    Core ML side (OpPalettizerConfig), so its own table function is applied
    here to each group of the torch weights, and the metadata the converter
    reads is registered as the torch palettizers do."""
    from coreml_pipeline.coreml.private import uniform_lut

    for _, module, axis, n_bits, groups in _weight_groups(model, cfg):
        values, tables = np.empty_like(groups), []
        for index, block in enumerate(groups):
            lut, indices = uniform_lut(block, n_bits)
            values[index] = lut[indices.astype(np.int64)].reshape(block.shape)
            tables.append(lut)
        _store_palettized(module, axis, values, np.stack(tables))
    return model


def _zero_and_kmeans(values: np.ndarray, n_bits: int, importance: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Zero is one look-up entry; exact 1-D k-means spreads the other 2**n - 1
    over the surviving (non-zero) weights. Returns (new values, look-up table)."""
    from coreml_pipeline.coreml.private import kmeans1d  # the exact 1-D k-means coremltools itself uses

    lut = np.zeros(2 ** n_bits, dtype=np.float32)
    out = np.zeros_like(values)
    alive = values != 0
    if alive.any():
        weights = None if importance is None else importance[alive].tolist()
        found, clusters = kmeans1d(values[alive].tolist(), 2 ** n_bits - 1, weights=weights)
        centroids = np.asarray(found, dtype=np.float32)
        out[alive] = centroids[np.asarray(clusters)]
        lut[1:1 + centroids.size] = centroids
    return out, lut


def keep_pruned_zeros(model: torch.nn.Module, cfg: PalettizeConfig, pruned: dict[str, torch.Tensor],
                      sensitivity: Mapping[str, torch.Tensor] | None) -> int:
    """Sparse palettization that keeps every pruned zero.

    coremltools clusters zeros together with the small surviving weights: after
    magnitude pruning zero becomes its own centroid, but after SparseGPT about
    40% of the pruned positions turn non-zero again. coremltools offers no
    masked k-means with zero as a fixed entry (its masked mode needs 2**n + 1
    entries), so pruned Linear weights are re-palettized here with the same
    grouping and their look-up tables replaced. With kmeans_solver=exact_dp (and
    auto) the tables are optimal with zero as a fixed entry: a surviving weight
    nearer zero than to any entry takes it too (coreml_pipeline/kmeans.py); with
    coremltools, entry 0 is zero and coremltools' exact 1-D k-means spreads the
    others over the surviving weights. Returns how many weights were re-palettized.
    """
    from coreml_pipeline.coreml.private import register_compression
    from coreml_pipeline.kmeans import cluster_groups

    method = get("palettize", cfg.method)
    if not method.kmeans or cfg.enable_per_channel_scale or cfg.lut_dtype:
        return 0  # scaled or quantized tables: keep coremltools' result (zeros_kept reports it)
    exact = method.solver(cfg) == "exact_dp"
    done = 0
    for name, module in compressible_weights(model):
        if (not isinstance(module, torch.nn.Linear) or compression_types(module) != [PRUNING, PALETTIZATION]
                or channel_axis(module, cfg) != 0):  # grouped along input channels: coremltools' tables stay
            continue
        weight = pruned[f"{name}.weight"].numpy().astype(np.float32)
        importance = sensitivity[f"{name}.weight"].numpy() if sensitivity is not None else None
        group = cfg.group_size if cfg.granularity == "per_grouped_channel" else weight.shape[0]
        n_bits = layer_n_bits(cfg, name, False)
        if exact:  # Linear groups run along output channels: each group is `group` consecutive rows
            grouped = weight.reshape(weight.shape[0] // group, -1)
            tables, labels = cluster_groups(grouped, 2 ** n_bits, None if importance is None else
                                            importance.reshape(grouped.shape), threads=cfg.num_kmeans_workers,
                                            keep_zero=True)
            tables = tables.astype(np.float32)  # as coremltools casts its float64 centroids to the weight's dtype
            new_weight = np.take_along_axis(tables, labels, axis=1).reshape(weight.shape)
        else:
            new_weight = np.zeros_like(weight)
            tables = []
            for start in range(0, weight.shape[0], group):
                rows = slice(start, start + group)
                values, lut = _zero_and_kmeans(weight[rows].ravel(), n_bits,
                                               None if importance is None else importance[rows].ravel())
                new_weight[rows] = values.reshape(weight[rows].shape)
                tables.append(lut)
            tables = np.stack(tables)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(new_weight))
        lut = torch.from_numpy(tables)[:, None, :, None]  # (groups, 1, 2**n, 1) as coremltools lays it out
        register_compression(module, lut=lut)
        done += 1
    return done


def check_all_palettized(model: torch.nn.Module, cfg: PalettizeConfig) -> None:
    """coremltools silently skips a weight it cannot group; fail loudly instead."""
    skipped = []
    if cfg.method == "none":
        return
    for name, module in compressible_weights(model):
        if isinstance(module, torch.nn.Embedding) and not cfg.embeddings.enabled:
            continue
        if compression_metadata(module, "lut") is None:
            skipped.append(f"{name} {tuple(module.weight.shape)}")
    if skipped:
        raise ValueError(
            f"palettize.group_size={cfg.group_size}: coremltools left {len(skipped)} weight(s) uncompressed "
            f"(channels not divisible by the group): {', '.join(skipped[:4])}")


def _zero_after(before: dict[str, torch.Tensor], model: torch.nn.Module, was_zero: bool) -> tuple[int, int]:
    """(those now zero, all) of the weights that were zero (``was_zero``) or not before palettizing,
    over every pruned weight."""
    now_zero = total = 0
    for name, module in compressible_weights(model):
        if PRUNING in compression_types(module):
            chosen = (before[f"{name}.weight"] == 0) == was_zero
            total += int(chosen.sum())
            now_zero += int((module.weight.detach()[chosen] == 0).sum())
    return now_zero, total


def zeros_kept(before: dict[str, torch.Tensor], model: torch.nn.Module) -> tuple[int, int]:
    """(pruned zeros still zero, pruned zeros) over every pruned weight."""
    return _zero_after(before, model, was_zero=True)


def survivors_zeroed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> tuple[int, int]:
    """(surviving weights that took the zero entry, surviving weights) over every pruned weight."""
    return _zero_after(before, model, was_zero=False)


def run(model: torch.nn.Module, cfg: PalettizeConfig, sensitivity: Mapping[str, torch.Tensor] | None = None,
        log=None) -> torch.nn.Module:
    """The whole stage on a model in memory: palettize, check, keep pruned zeros,
    and round to what the package stores."""
    log = log or runtime.log
    # The weights before palettizing: exact for pruned layers (re-palettized around their zeros), bfloat16 for
    # the rest, which only the lost-row warning compares against (a 0.4% reference error beside its 50%
    # threshold), so the copy costs half the weights' float32 size instead of all of it (scaling benchmark).
    before = {f"{name}.weight": module.weight.detach().clone() if PRUNING in compression_types(module)
              else module.weight.detach().to(torch.bfloat16) for name, module in compressible_weights(model)}
    model = palettize(model, cfg, sensitivity)  # resolves layer_bits (palettized_layers) before any k-means
    check_all_palettized(model, cfg)
    repalettized = keep_pruned_zeros(model, cfg, before, sensitivity)
    if repalettized:
        log.info("re-palettized %d pruned weights with zero as a fixed look-up entry", repalettized)
    round_like_package(model, log)
    warn_lost_rows(before, model, log)
    kept, total = zeros_kept(before, model)
    if total:
        log.info("pruned zeros kept: %d of %d (%.1f%%)", kept, total, 100.0 * kept / total)
        zeroed, alive = survivors_zeroed(before, model)
        log.info("surviving weights that took the zero entry (nearer zero than to any other): %d of %d (%.1f%%)",
                 zeroed, alive, 100.0 * zeroed / max(alive, 1))
    return model
