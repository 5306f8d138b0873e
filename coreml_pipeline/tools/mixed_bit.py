"""Mixed-bit palettization recipes: each layer gets the fewest bits the model can afford.

    python -m coreml_pipeline.tools.mixed_bit --meet-target --name mixed_target palettize.group_size=16
    python -m coreml_pipeline.tools.mixed_bit --min-cosine 0.97 --max-spearman-drop 0.5 --name mixed_cos
    python -m coreml_pipeline.tools.mixed_bit --size-mb 11.6 --name mixed_11mb palettize.group_size=16
    python -m coreml_pipeline.tools.mixed_bit --technique quantize --meet-target --name mixed_q quantize.block_size=32
    dvc exp run -S palettize=mixed_target

In the spirit of Apple's mixed-bit palettization pre-analysis for Stable
Diffusion (ml-stable-diffusion): measure what each layer costs at each bit
width on its own, then walk from 8 bits everywhere towards 1 bit, each step
lowering the layer whose next width down costs least per byte saved. Every
model family is measured with its own evaluate figures.

1. Candidates: every palettized layer at 1, 2, 4, 6 and 8 bits with the base
   config's granularity and group size, weighted with the calibrate stage's
   cached sensitivity (what sensitive k-means minimises). With exact_dp (what
   kmeans_solver=auto runs for plain k-means) they are the palettize stage's
   own output, so the recipe measured here is the one the stage writes; with
   kmeans_solver=coremltools, an estimate (``grouped_kmeans``).
2. Cost: how far the outputs move with only that layer palettized, on held-out
   dev data (the calibration split's samples after the calibration ones). The
   sentence embedder: the drop in mean cosine between the float model's
   embeddings and the candidate's on dev pairs; other families: the family's
   divergence of each output from the float one (``Family.divergence``: KL of
   logits, or the relative squared error). Apple's recipes measure output PSNR
   the same way. The cached sensitivity is normalised per tensor by
   coremltools, so it ranks weights within a layer but cannot compare layers;
   this measurement can.
3. Pick: along a path from every layer at 8 bits to every layer at 1 bit
   (each step lowers the layer whose next width costs least per byte saved),
   the smallest recipe that, measured whole on more held-out dev data
   (``--check-pairs``), meets the goal: ``--meet-target`` (the evaluate
   section's target for the family), ``--min-quality`` (the family's headline
   figure), ``--min-cosine`` with ``--max-spearman-drop`` (sentence embedder);
   or the best recipe whose estimated package is at most ``--size-mb``. A
   refill then spends what a big step down saved (see ``refill``).
4. Write conf/palettize/<name>.yaml: the base section plus ``layer_bits``,
   with a header recording the inputs, the estimate and the measurement.

``--technique quantize`` does the same for data-free linear quantization: int4 or int8
(uint4/uint8 with scheme affine) per layer, candidates the quantize stage's own output,
written as ``quantize.layer_dtypes`` to conf/quantize/<name>.yaml.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file

from coreml_pipeline import families, numerics, runtime, validation
from coreml_pipeline.config import compose as config
from coreml_pipeline.config.schema import (
    PALETTE_BITS,
    QUANTIZE_DTYPES,
    ConfigError,
    PalettizeConfig,
    QuantizeConfig,
    dtype_bits,
)
from coreml_pipeline.families.base import torch_device
from coreml_pipeline.families.sentence_embedding import encode, sts_spearman
from coreml_pipeline.families.stsb import Pairs, load_pairs
from coreml_pipeline.model import (
    PALETTIZATION,
    QUANTIZATION,
    compressible_weights,
    compression_types,
    load_tokenizer,
    load_weights,
)
from coreml_pipeline.techniques import registry
from coreml_pipeline.techniques.palettize import grouping_axis, layer_n_bits, palettized_layers
from coreml_pipeline.techniques.palettize import run as palettize_stage

BITS = (1, 2, 4, 6, 8)
WEIGHTS = Path("artifacts/finetune/weights.safetensors")  # what the palettize stage reads
SENSITIVITY = Path("artifacts/calibrate/sensitivity.safetensors")
COST_CACHE = Path(".cache/mixed_bit")  # git-ignored


@dataclass
class Layer:
    name: str
    numel: int
    groups: int  # palettize: look-up tables; quantize: scales
    embedding: bool
    channels: int = 0  # along the grouping axis
    zero_points: bool = False  # quantize: one per scale (affine)
    shape: tuple = ()


def _assign(points: np.ndarray, centroids: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """Flat cluster label (group * k + entry) of every point, all groups in one searchsorted:
    each group's values and boundaries are shifted into an interval of their own."""
    groups, k = centroids.shape
    bounds = ((centroids[:, 1:] + centroids[:, :-1]) / 2 + shift).ravel()
    per_group = points.shape[1]
    local = np.searchsorted(bounds, (points + shift).ravel()) - np.repeat(np.arange(groups) * (k - 1), per_group)
    return local + np.repeat(np.arange(groups) * k, per_group)


def _bin(values: np.ndarray, mass: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, tuple]:
    """Each group as ``bins`` equal-width bins: the weighted mean and total mass per bin,
    and (low, width) of the groups' ranges. Big groups (the embedding tables) then cost
    ``bins`` per Lloyd step instead of their size."""
    groups = values.shape[0]
    low, high = values.min(axis=1, keepdims=True), values.max(axis=1, keepdims=True)
    width = np.maximum(high - low, 1e-30)
    index = np.clip(((values - low) / width * bins).astype(np.int64), 0, bins - 1)
    flat = (index + np.arange(groups)[:, None] * bins).ravel()
    bin_mass = np.bincount(flat, weights=mass.ravel(), minlength=groups * bins).reshape(groups, bins)
    bin_sum = np.bincount(flat, weights=(mass * values).ravel(), minlength=groups * bins).reshape(groups, bins)
    centres = low + width * (np.arange(bins) + 0.5) / bins
    means = np.where(bin_mass > 0, bin_sum / np.maximum(bin_mass, 1e-300), centres)
    return means, bin_mass, (low, width)


def _cube_root_starts(bin_mass: np.ndarray, low: np.ndarray, width: np.ndarray, k: int) -> np.ndarray:
    """Starting tables at the quantiles of the cube root of each group's weighted
    density, where an optimal quantizer puts many levels (high-resolution theory);
    equal-count starts leave Lloyd stuck at several times the optimal error."""
    groups, bins = bin_mass.shape
    cdf = np.concatenate([np.zeros((groups, 1)), np.cumsum(np.cbrt(bin_mass), axis=1)], axis=1)
    cdf /= np.maximum(cdf[:, -1:], 1e-300)
    edges = low + width * np.arange(bins + 1) / bins
    targets = (np.arange(k) + 0.5) / k
    return np.stack([np.interp(targets, cdf[g], edges[g]) for g in range(groups)])


def _lloyd(points: np.ndarray, mass: np.ndarray, centroids: np.ndarray, shift: np.ndarray,
           iterations: int) -> np.ndarray:
    groups, k = centroids.shape
    for _ in range(iterations):
        labels = _assign(points, centroids, shift)
        total = np.bincount(labels, weights=(mass * points).ravel(), minlength=groups * k)
        weight_sum = np.bincount(labels, weights=mass.ravel(), minlength=groups * k)
        updated = np.where(weight_sum > 0, total / np.maximum(weight_sum, 1e-300), centroids.ravel())
        updated = np.sort(updated.reshape(groups, k), axis=1)
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    return centroids


def grouped_kmeans(weight: np.ndarray, importance: np.ndarray | None, n_bits: int, axis: int,
                   group: int | None, iterations: int = 60, bins: int = 4096) -> np.ndarray:
    """Weighted 1-D k-means of every group of ``group`` channels along ``axis`` at once.

    Up to 16 entries on groups of at most 4 * ``bins`` values: coremltools'
    exact 1-D k-means, group by group. Otherwise Lloyd's algorithm vectorised
    over the groups, from two starts: coremltools' exact k-means at 64-256
    entries takes minutes on MiniLM, this seconds. Lloyd stops in a local
    optimum; tests/test_mixed_bit.py bounds its error against the exact one.
    Groups larger than 4 * ``bins`` values (the embedding tables) are clustered
    through their bins. Returns the palettized weight, look-up
    entries rounded to float16 as the package stores them.
    """
    moved = np.moveaxis(weight.astype(np.float64), axis, 0)
    channels = moved.shape[0]
    group = group or channels
    values = moved.reshape(channels // group, -1)
    groups, k = values.shape[0], 2 ** n_bits
    mass = np.ones_like(values) if importance is None else np.moveaxis(importance.astype(np.float64), axis, 0)
    mass = mass.reshape(values.shape) + 1e-12
    shift = (np.arange(groups) * 4.0 * (np.ptp(values) + 1.0))[:, None]
    if n_bits <= 4 and values.shape[1] <= 4 * bins:
        # Few entries, small groups: coremltools' exact k-means is fast here, and Lloyd
        # would stop up to 25% above its error (measured at 4 bits on 1536-value groups).
        from coreml_pipeline.coreml.private import kmeans1d

        centroids = np.zeros((groups, k))
        for g in range(groups):
            found = np.sort(np.asarray(kmeans1d(values[g].tolist(), k, weights=mass[g].tolist())[0]))
            centroids[g, :found.size] = found
            centroids[g, found.size:] = found[-1]  # fewer distinct values than entries
        return _lookup(values, centroids, shift, moved.shape, axis)
    points, point_mass = _bin(values, mass, bins)[:2] if values.shape[1] > 4 * bins else (values, mass)
    # Two starts, the better result kept per group: the quantiles of the cube root of a smooth
    # (about 96 values a bin) weighted density, and equal-count quantiles.
    _, start_mass, (low, width) = _bin(values, mass, int(np.clip(values.shape[1] // 96, 32, bins)))
    best, best_error = None, None
    for start in (_cube_root_starts(start_mass, low, width, k),
                  np.quantile(values, (np.arange(k) + 0.5) / k, axis=1).T):
        centroids = _lloyd(points, point_mass, np.sort(start, axis=1), shift, iterations)
        labels = _assign(points, centroids, shift)
        squared = point_mass.ravel() * (points.ravel() - centroids.ravel()[labels]) ** 2
        error = np.bincount(labels // k, weights=squared, minlength=groups)
        if best is None:
            best, best_error = centroids, error
        else:
            better = error < best_error
            best[better], best_error[better] = centroids[better], error[better]
    return _lookup(values, best, shift, moved.shape, axis)


def _lookup(values: np.ndarray, centroids: np.ndarray, shift: np.ndarray, shape: tuple, axis: int) -> np.ndarray:
    """Every value replaced by its nearest entry, entries rounded to float16 as stored."""
    table = centroids.astype(np.float16).astype(np.float64).ravel()
    out = table[_assign(values, centroids, shift)].reshape(shape)
    return np.moveaxis(out, 0, axis).astype(np.float32)


def layer_bytes(layer: Layer, width: int | str) -> int:
    """Palettized at ``width`` bits: packed indices plus one float16 look-up table per group.
    Quantized to dtype ``width``: packed values plus a float16 scale (and a zero point) per group."""
    if isinstance(width, str):
        bits = dtype_bits(width)
        return math.ceil(layer.numel * bits / 8) + layer.groups * 2 + (
            math.ceil(layer.groups * bits / 8) if layer.zero_points else 0)
    return math.ceil(layer.numel * width / 8) + layer.groups * 2 ** width * 2


def width_bits(width: int | str) -> int:
    return dtype_bits(width) if isinstance(width, str) else width


def quantize_scales(shape: tuple, cfg: QuantizeConfig) -> int:
    """How many scales the quantize stage gives a weight of ``shape`` (rows for per_channel)."""
    numel = math.prod(shape)
    if cfg.granularity == "per_block":
        return numel // cfg.block_size
    return shape[0] if cfg.granularity == "per_channel" else 1


def greedy_path(layers: list[Layer], cost: dict[tuple[str, int], float],
                widths: tuple[int, ...] = BITS) -> list[dict[str, int]]:
    """Recipes from every layer at the widest of ``widths`` down to every layer at
    the narrowest, one layer one width down per step, cheapest cost increase per
    byte saved first."""
    bits = {layer.name: widths[-1] for layer in layers}
    path = [dict(bits)]
    while True:
        best, best_rate = None, math.inf
        for layer in layers:
            current = widths.index(bits[layer.name])
            if current == 0:
                continue
            lower = widths[current - 1]
            saved = layer_bytes(layer, bits[layer.name]) - layer_bytes(layer, lower)
            rate = (cost[layer.name, lower] - cost[layer.name, bits[layer.name]]) / saved
            if rate < best_rate:
                best, best_rate = (layer.name, lower), rate
        if best is None:
            return path
        bits[best[0]] = best[1]
        path.append(dict(bits))


def _each_width(model: torch.nn.Module, widths: tuple, compress, kind: int, stage: str, log) -> dict:
    """{(layer, width): weight} of every layer ``compress(copy of model, width)`` compressed (compression
    type ``kind``), as the stage writes it with every layer at each width."""
    quiet = logging.getLogger("pipeline.mixed_bit.stage")  # the stage's per-width notes would drown the log
    quiet.setLevel(logging.ERROR)
    candidates = {}
    for width in widths:
        started = time.perf_counter()
        compressed = compress(copy.deepcopy(model), width, quiet)
        for name, module in compressible_weights(compressed):
            if kind in compression_types(module):
                candidates[name, width] = module.weight.detach().clone()
        label = f"{width} bits" if isinstance(width, int) else width
        log.info("candidates: every layer at %s as the %s stage writes them, %.1f s", label, stage,
                 time.perf_counter() - started)
        del compressed
    return candidates


def stage_candidates(model: torch.nn.Module, cfg: PalettizeConfig, sensitivity: dict | None,
                     widths: tuple[int, ...], log) -> dict[tuple[str, int], torch.Tensor]:
    """Every palettized layer's weight as the palettize stage writes it (techniques.palettize.run)
    with every layer at each width: {(layer, n_bits): weight}."""
    def compress(copy_of_model, n_bits, quiet):
        uniform = replace(cfg, n_bits=n_bits, layer_bits={}, embeddings=replace(cfg.embeddings, n_bits=None))
        return palettize_stage(copy_of_model, uniform, sensitivity, quiet)

    return _each_width(model, widths, compress, PALETTIZATION, "palettize", log)


def quantize_candidates(model: torch.nn.Module, cfg: QuantizeConfig, dtypes: tuple[str, ...], log
                        ) -> dict[tuple[str, str], torch.Tensor]:
    """Every quantized layer's weight as the quantize stage writes it (techniques.quantize.run, data-free
    linear: each layer on its own) with every layer at each dtype: {(layer, dtype): weight}."""
    from coreml_pipeline.techniques.quantize import run as quantize_stage

    def compress(copy_of_model, dtype, quiet):
        return quantize_stage(copy_of_model, replace(cfg, dtype=dtype, layer_dtypes={}), log=quiet)

    return _each_width(model, dtypes, compress, QUANTIZATION, "quantize", log)


class PairScorer:
    """The sentence embedder on held-out dev pairs: cost 1 - mean cosine to the float
    embeddings; whole recipes by mean cosine and STS-B Spearman, as evaluate scores them."""

    unit = "pairs"

    def __init__(self, params: dict, model: torch.nn.Module, pairs: int, check_pairs: int):
        model_cfg = params["model"]
        calibrate = params["calibrate"]
        # Pairs after the calibration ones in the same seeded order: never seen by the sensitivity.
        skip = calibrate.num_samples
        loaded = load_pairs(params["data"], params["data"].calibration_file, skip + max(pairs, check_pairs),
                            calibrate.seed)
        self.check_pairs = Pairs(loaded.sentence1[skip:], loaded.sentence2[skip:], loaded.scores[skip:])
        if len(self.check_pairs) < 2:
            raise ConfigError(f"config error: {params['data'].calibration_file} has too few pairs after the "
                              f"{skip} calibration ones to measure with")
        self.evaluate = params["evaluate"]
        self.sentences = self.check_pairs.sentence1[:pairs] + self.check_pairs.sentence2[:pairs]
        self.tokenizer = load_tokenizer(model_cfg)
        self.model_cfg = model_cfg
        self.reference = self.embed(model, self.sentences)
        self.check_reference = self.embed(model, self.check_pairs.sentences())
        self.float_spearman = sts_spearman(self.check_reference, self.check_pairs)
        self.counts = (len(self.sentences) // 2, len(self.check_pairs))
        self.overlap = False

    def embed(self, model: torch.nn.Module, sentences: list[str]) -> torch.Tensor:
        return encode(model, self.tokenizer, sentences, self.model_cfg)

    def cost(self, model: torch.nn.Module) -> float:
        """1 - mean cosine to the float embeddings of the cost sentences."""
        cosine = torch.nn.functional.cosine_similarity(self.embed(model, self.sentences), self.reference, dim=-1)
        return 1.0 - float(cosine.mean())

    def check(self, model: torch.nn.Module) -> dict:
        """What evaluate measures, on every held-out pair: mean cosine to float, STS-B Spearman and its drop."""
        embeddings = self.embed(model, self.check_pairs.sentences())
        cosine = float(torch.nn.functional.cosine_similarity(embeddings, self.check_reference, dim=-1).mean())
        spearman = sts_spearman(embeddings, self.check_pairs)
        drop = self.float_spearman - spearman
        return {"cosine": cosine, "spearman_drop": drop, "quality": spearman,
                "meets_target": bool(drop <= self.evaluate.max_spearman_drop
                                     and cosine >= self.evaluate.min_mean_cosine)}

    @staticmethod
    def describe(result: dict) -> str:
        return f"mean cosine {result['cosine']:.4f}, STS-B Spearman {result['spearman_drop']:.2f} below float"


class OutputScorer:
    """Any other family on dev samples of its calibration split: cost the family's divergence of
    each output from the float model's (Family.divergence: KL of the logits, else relative squared
    error); whole recipes by the family's own evaluate metrics (Family.compare) and target."""

    unit = "samples"

    def __init__(self, params: dict, model: torch.nn.Module, samples: int, check_samples: int):
        self.family = families.get(params["model"], params["data"])
        self.evaluate = params["evaluate"]
        self.device = torch_device(params["model"])
        calibrate = params["calibrate"]
        # Samples after the calibration ones in the same seeded order, never seen by the sensitivity; a
        # split too small for that (6 photographs, 40 windows of prose) is measured whole, and says so.
        skip, need = calibrate.num_samples, max(samples, check_samples)
        loaded = self.family.calibration_samples(skip + need, calibrate.seed)
        held_out = loaded[skip:]
        self.overlap = len(held_out) < 2
        dev = loaded[:need] if self.overlap else held_out
        if len(dev) < 2:
            raise ConfigError(f"config error: data.calibration_file={params['data'].calibration_file!r} gives "
                              f"{len(dev)} sample(s); allowed: a dev split of 2 or more to measure with")
        self.samples, self.check_samples = dev[:samples], dev[:check_samples]
        self.counts = (len(self.samples), len(self.check_samples))
        self.reference = self.outputs(model)
        self.check_reference = self.family.run(model, self.check_samples, self.device)
        self.float_report = self.family.reference_metrics(self.check_reference, self.check_samples)

    @torch.no_grad()
    def outputs(self, model: torch.nn.Module) -> list[torch.Tensor]:
        wrapped = self.family.wrap(model).eval().to(self.device)
        outputs = [self.family.call(wrapped, sample, self.device).float().cpu() for sample in self.samples]
        model.cpu()
        return outputs

    def cost(self, model: torch.nn.Module) -> float:
        return float(np.mean([self.family.divergence(output, reference)
                              for output, reference in zip(self.outputs(model), self.reference)]))

    def check(self, model: torch.nn.Module) -> dict:
        compressed = self.family.run(model, self.check_samples, self.device)
        metrics, _ = self.family.compare(compressed, self.check_reference, self.check_samples, self.float_report,
                                         self.evaluate)
        return {key: value for key, value in metrics.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool) or key == "meets_target"}

    def describe(self, result: dict) -> str:
        figures = ", ".join(f"{key} {value:.4g}" for key, value in result.items()
                            if key not in ("quality", "meets_target") and not key.startswith("num_"))
        return f"{figures}; meets evaluate's target: {'yes' if result['meets_target'] else 'no'}"


class Analysis:
    """The model, its candidates per layer and bits, and the scorer measuring them on held-out dev data."""

    def __init__(self, params: dict, cfg: PalettizeConfig | QuantizeConfig, weights: Path, sensitivity: Path,
                 samples: int, check_samples: int, widths: tuple, log):
        self.widths = widths
        self.log = log
        self.model = load_weights(params["model"], weights)
        scorer = PairScorer if params["model"].family == "sentence_embedding" else OutputScorer
        self.scorer = scorer(params, self.model, samples, check_samples)
        self.float_weights, self.candidates, self.layers = {}, {}, []
        if isinstance(cfg, QuantizeConfig):
            # Data-free linear quantization treats each layer on its own: the stage's output at each dtype.
            self.exact = True
            self.candidates = quantize_candidates(self.model, cfg, widths, log)
            for name, module in compressible_weights(self.model):
                if (name, widths[0]) in self.candidates:
                    shape = tuple(module.weight.shape)
                    self.float_weights[name] = module.weight.detach().clone()
                    self.layers.append(Layer(name, module.weight.numel(), quantize_scales(shape, cfg),
                                             isinstance(module, torch.nn.Embedding), shape[0],
                                             cfg.scheme == "affine", shape))
            return
        importance = load_file(str(sensitivity)) if cfg.method == "sensitive_kmeans" else {}
        # With exact_dp (kmeans_solver=auto resolves to it for plain k-means) the candidates are the palettize
        # stage's own output at each width: each layer's optimal tables depend only on its weight, sensitivity
        # and width, so the recipe measured here is the one the stage writes. coremltools' k-means at 6 and 8
        # bits takes minutes per width on MiniLM: with it, the estimate below (its exact k-means up to 4 bits).
        self.exact = registry.method("palettize", cfg).solver(cfg) == "exact_dp"
        if self.exact:
            self.candidates = stage_candidates(self.model, cfg, importance or None, widths, log)
        group = cfg.group_size if cfg.granularity == "per_grouped_channel" else None
        for name, module in palettized_layers(self.model, cfg):
            embedding = isinstance(module, torch.nn.Embedding)
            shape = tuple(module.weight.shape)
            # The palettize stage's own rule (an output layer of 1000 classes is grouped along its inputs).
            axis = grouping_axis(embedding, shape, cfg, group)
            if group and shape[axis] % group:
                raise ConfigError(f"config error: palettize.group_size={group} does not divide {name}'s "
                                  f"{shape[axis]} channels along axis {axis}")
            self.float_weights[name] = module.weight.detach().clone()
            self.layers.append(Layer(name, module.weight.numel(), shape[axis] // group if group else 1, embedding,
                                     shape[axis], shape=shape))
            if self.exact:
                continue
            weight = module.weight.detach().numpy().copy()
            scores = importance.get(f"{name}.weight")
            started = time.perf_counter()
            for n_bits in widths:
                self.candidates[name, n_bits] = torch.from_numpy(grouped_kmeans(
                    weight, None if scores is None else scores.numpy(), n_bits, axis, group))
            log.info("candidates %-45s %s bits in %.1f s", name, "/".join(map(str, widths)),
                     time.perf_counter() - started)

    @contextmanager
    def compressed(self, bits: dict):
        """The model with each named layer at its candidate for that width, restored after."""
        modules = dict(self.model.named_modules())
        with torch.no_grad():
            for name, n_bits in bits.items():
                modules[name].weight.copy_(self.candidates[name, n_bits])
            try:
                yield self.model
            finally:
                for name in bits:
                    modules[name].weight.copy_(self.float_weights[name])

    def check(self, bits: dict[str, int]) -> dict:
        """The recipe measured whole on the held-out check data, as evaluate scores the family."""
        with self.compressed(bits) as model:
            return self.scorer.check(model)

    def costs(self) -> dict[tuple[str, int], float]:
        """What compressing each layer alone at each width costs (the scorer's cost; 0 for float)."""
        cost = {}
        for layer in self.layers:
            for n_bits in self.widths:
                with self.compressed({layer.name: n_bits}) as model:
                    cost[layer.name, n_bits] = self.scorer.cost(model)
            self.log.info("cost %-45s %s", layer.name,
                          " ".join(f"{b}b={cost[layer.name, b]:.2e}" for b in self.widths))
        return cost


def refill(start: dict[str, int], layers: list[Layer], cost: dict[tuple[str, int], float],
           widths: tuple[int, ...], budget: float, overhead: float = 0.0) -> list[dict[str, int]]:
    """Recipes from ``start`` upwards, one layer one width up per step, largest cost
    decrease per byte added first, while the package stays within ``budget`` bytes.
    The downward path moves in big steps where one layer is big (the word embedding
    is half of MiniLM); this spends what such a step saved on the layers that need it."""
    bits, sequence = dict(start), []
    size = sum(layer_bytes(layer, bits[layer.name]) for layer in layers) + overhead
    while True:
        best, best_rate = None, 0.0
        for layer in layers:
            current = widths.index(bits[layer.name])
            if current == len(widths) - 1:
                continue
            higher = widths[current + 1]
            added = layer_bytes(layer, higher) - layer_bytes(layer, bits[layer.name])
            rate = (cost[layer.name, bits[layer.name]] - cost[layer.name, higher]) / added
            if size + added <= budget and rate > best_rate:
                best, best_rate, best_added = (layer.name, higher), rate, added
        if best is None:
            return sequence
        bits[best[0]] = best[1]
        size += best_added
        sequence.append(dict(bits))


def choose(path: list[dict[str, int]], measure, size_of, meets, size_mb: float | None,
           upwards=None) -> tuple[dict[str, int], dict, dict]:
    """The recipe to write, its measurements, and every measurement on the way
    (keyed by the recipe as sorted (layer, bits) pairs).

    ``measure(bits)`` gives the measurements of a recipe, ``meets(measurements)``
    whether they meet the target; ``upwards(start, budget)`` the refill sequence
    from a recipe (see refill).
    --size-mb: the first path point within the size, then refilled up to it.
    Else: bisection along the path for the last point meeting the target; then,
    from the point after it, bisection along the refill sequence for the first
    recipe meeting the target while smaller than that last point.
    """
    measured: dict[tuple, dict] = {}

    def result(bits: dict[str, int]) -> dict:
        key = tuple(sorted(bits.items()))
        if key not in measured:
            measured[key] = measure(bits)
        return measured[key]

    def first_meeting(recipes: list[dict[str, int]]) -> int | None:
        """Index of the first recipe meeting the target, assuming they only get better."""
        if not recipes or not meets(result(recipes[-1])):
            return None
        low, high = -1, len(recipes) - 1  # recipes[high] meets the target; recipes[low] is not known to
        while high - low > 1:
            middle = (low + high) // 2
            if meets(result(recipes[middle])):
                high = middle
            else:
                low = middle
        return high

    if size_mb is not None:
        fits = [i for i, bits in enumerate(path) if size_of(bits) <= size_mb * 1e6]
        if not fits:
            raise ConfigError(f"config error: --size-mb {size_mb}: even every layer at {min(path[-1].values())} "
                              f"bits is {size_of(path[-1]) / 1e6:.2f} MB")
        bits = path[fits[0]]
        filled = upwards(bits, size_mb * 1e6) if upwards else []
        bits = filled[-1] if filled else bits
        return bits, result(bits), measured

    if not meets(result(path[0])):
        raise ConfigError(f"config error: every layer at {max(path[0].values())} bits already misses the target: "
                          + ", ".join(f"{k} {v:.4f}" for k, v in result(path[0]).items()))
    last = len(path) - 1 - first_meeting(path[::-1])  # the path gets worse: search it reversed
    bits = path[last]
    if upwards and last + 1 < len(path):
        candidates = upwards(path[last + 1], size_of(path[last]) - 1)
        found = first_meeting(candidates)
        if found is not None:
            bits = candidates[found]
    return bits, result(bits), measured


def file_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def recipe_text(base: PalettizeConfig | QuantizeConfig, bits: dict[str, int | str], header: list[str],
                tables: set[str]) -> str:
    """The palettize (or quantize) section to write; ``tables``: the embedding layers' names."""
    section = {"method": base.method, **asdict(base)}  # method first, as in the other conf/ files
    linear = [b for name, b in bits.items() if name not in tables] or list(bits.values())
    width_key, layers_key = ("dtype", "layer_dtypes") if isinstance(base, QuantizeConfig) else ("n_bits", "layer_bits")
    section[width_key] = max(sorted(set(linear)), key=linear.count)  # the fallback; every layer is named below
    section[layers_key] = dict(bits)
    body = yaml.safe_dump(section, sort_keys=False, width=120)
    return "".join(f"# {line}\n" for line in header) + body


def package_overhead(layers: list[Layer], params: dict, metrics_path: Path, technique: str = "palettize"
                     ) -> float | None:
    """Bytes of the package that are not compressed weights (norms, biases, the program,
    per-op metadata). From the last evaluate run: its package minus this estimate of its
    own compressed weights, when its recipe is plain palettization (plain linear quantization
    for ``technique`` quantize); else the float16 package minus the float16 weights. None when
    there is no evaluate run."""
    if not metrics_path.is_file():
        return None
    metrics = json.loads(metrics_path.read_text())
    palettize: PalettizeConfig = params["palettize"]
    quantize: QuantizeConfig = params["quantize"]
    untrained = params["prune"].method == "none" and params["finetune"].method == "none"
    plain = (palettize.method in ("kmeans", "sensitive_kmeans", "uniform") and palettize.cluster_dim == 1
             and not palettize.lut_dtype and quantize.method == "none" and untrained)
    quantized = palettize.method == "none" and quantize.method == "linear" and untrained
    if technique == "palettize" and plain and "package_bytes" in metrics:
        group = palettize.group_size if palettize.granularity == "per_grouped_channel" else None
        own = sum(layer_bytes(replace(layer, groups=layer.channels // group if group else 1),
                              layer_n_bits(palettize, layer.name, layer.embedding)) for layer in layers)
        return metrics["package_bytes"] - own
    if technique == "quantize" and quantized and "package_bytes" in metrics:
        own = sum(layer_bytes(replace(layer, groups=quantize_scales(layer.shape, quantize),
                                      zero_points=quantize.scheme == "affine"), quantize.layer_dtype(layer.name))
                  for layer in layers)
        return metrics["package_bytes"] - own
    if "float16_package_bytes" in metrics:
        return metrics["float16_package_bytes"] - 2 * sum(layer.numel for layer in layers)
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    goal = parser.add_mutually_exclusive_group(required=True)
    goal.add_argument("--meet-target", action="store_true",
                      help="smallest recipe meeting the evaluate section's own target for the family, on dev data")
    goal.add_argument("--min-quality", type=float,
                      help="smallest recipe whose quality figure (the family's headline metric) is at least this")
    goal.add_argument("--min-cosine", type=float,
                      help="sentence embedder: smallest recipe whose mean cosine to float is at least this")
    goal.add_argument("--size-mb", type=float, help="best recipe whose estimated package is at most this many MB")
    parser.add_argument("--max-spearman-drop", type=float, default=None,
                        help="with --min-cosine: STS-B Spearman may also fall at most this far below float")
    parser.add_argument("--name", required=True, help="writes conf/<technique>/<name>.yaml")
    parser.add_argument("--technique", choices=("palettize", "quantize"), default="palettize",
                        help="per-layer bits of palettization (palettize.layer_bits) or dtypes of data-free linear "
                        "quantization (quantize.layer_dtypes)")
    parser.add_argument("--pairs", "--samples", dest="pairs", type=int, default=None,
                        help="held-out dev pairs (sentence embedder, default 64) or samples (other families, "
                        "default 8) for the per-layer costs")
    parser.add_argument("--check-pairs", "--check-samples", dest="check_pairs", type=int, default=None,
                        help="held-out dev pairs (default 512) or samples (default 64) on which whole recipes "
                        "are measured")
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--sensitivity", default=str(SENSITIVITY))
    parser.add_argument("--bits", type=int, nargs="+", default=None,
                        help=f"palettize: the widths to choose from (default {' '.join(map(str, BITS))})")
    parser.add_argument("--dtypes", nargs="+", default=None,
                        help="quantize: the dtypes to choose from (default int4 int8; uint4 uint8 with scheme affine)")
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--metrics", default="metrics/evaluate.json", help="the last evaluate run, for sizes")
    parser.add_argument("--report", default="reports/mixed_bit", help="folder for <name>.json (costs and path)")
    parser.add_argument("overrides", nargs="*", help="changes to params.yaml's section of the technique as the "
                        "base, e.g. palettize.group_size=16 or quantize.granularity=per_channel")
    args = parser.parse_args(argv)
    log = runtime.setup("mixed_bit")

    if args.min_cosine is not None and not 0 < args.min_cosine <= 1:
        raise ConfigError(f"config error: --min-cosine={args.min_cosine}; allowed: (0, 1]")
    if args.size_mb is not None and args.size_mb <= 0:
        raise ConfigError(f"config error: --size-mb={args.size_mb}; allowed: a number > 0")
    if args.max_spearman_drop is not None and args.min_cosine is None:
        raise ConfigError("config error: --max-spearman-drop; allowed only with --min-cosine")
    for key in ("pairs", "check_pairs"):
        if getattr(args, key) is not None and getattr(args, key) < 2:
            raise ConfigError(f"config error: --{key.replace('_', '-')}={getattr(args, key)}; allowed: 2 or more")
    section = args.technique
    bad = [o for o in args.overrides if not o.lstrip("~").startswith(f"{section}.")]
    if bad:
        raise ConfigError(f"config error: override {bad[0]!r}; allowed: {section}.<key>=<value> only (the cached "
                          "weights and sensitivity belong to params.yaml's other sections)")
    if args.bits is not None and section != "palettize" or args.dtypes is not None and section != "quantize":
        flag = "--bits" if args.bits is not None else "--dtypes"
        raise ConfigError(f"config error: {flag} is not allowed with --technique {section}; allowed: "
                          f"{'--dtypes' if section == 'quantize' else '--bits'}")
    # The base is params.yaml's section (the one the cached artifacts sit beside) plus the overrides.
    raw = config.read_params(args.params)
    current = validation.validate(raw)
    # The same CPU code paths as the stages whose cached outputs it reads (before any torch operation).
    numerics.apply(current["runtime"].numerics, current["runtime"].threads)
    family = families.family_class(current["model"].family)
    pairs = family.name == "sentence_embedding"
    if not pairs and args.min_cosine is not None:
        raise ConfigError(f"config error: --min-cosine is not allowed with model.family={family.name!r} (it "
                          "scores sentence embeddings on STS-B pairs); allowed: --meet-target, --min-quality or "
                          "--size-mb")
    if args.min_quality is not None:
        low, high = family.quality_range
        if not low <= args.min_quality <= high:
            raise ConfigError(f"config error: --min-quality={args.min_quality}; allowed for "
                              f"model.family={family.name!r}: its {family.quality_name} in [{low}, {high}]")
    args.pairs = args.pairs or (64 if pairs else 8)
    args.check_pairs = args.check_pairs or (512 if pairs else 64)
    merged = OmegaConf.merge(OmegaConf.create({section: raw.get(section, {})}),
                             OmegaConf.from_dotlist([o for o in args.overrides if not o.startswith("~")]))
    merged_section = OmegaConf.to_container(merged)[section]
    for removed in (o.lstrip("~").split("=")[0].split(".", 1)[1] for o in args.overrides if o.startswith("~")):
        merged_section[removed] = None
    composed = validation.validate({**raw, section: merged_section})
    base = composed[section]
    if section == "palettize":
        widths = tuple(sorted(set(args.bits or BITS)))
        if len(widths) < 2 or any(b not in PALETTE_BITS for b in widths):
            raise ConfigError(f"config error: --bits {args.bits}; allowed: two or more of {PALETTE_BITS}")
        if base.method not in ("kmeans", "sensitive_kmeans") or base.cluster_dim > 1:
            raise ConfigError(f"config error: palettize.method={base.method}, cluster_dim={base.cluster_dim}; "
                              "allowed as a base: kmeans or sensitive_kmeans with cluster_dim 1")
        needed = (Path(args.weights), Path(args.sensitivity))
    else:
        default = ("uint4", "uint8") if base.scheme == "affine" else ("int4", "int8")
        widths = tuple(sorted(set(args.dtypes or default), key=lambda d: (dtype_bits(d), d)))
        if len(widths) < 2 or any(d not in QUANTIZE_DTYPES for d in widths):
            raise ConfigError(f"config error: --dtypes {args.dtypes}; allowed: two or more of {QUANTIZE_DTYPES}")
        if composed["palettize"].method != "none":
            raise ConfigError(f"config error: palettize.method={composed['palettize'].method!r}; allowed with "
                              "--technique quantize: none (the quantize stage is off when palettization is on)")
        if base.method != "linear":
            raise ConfigError(f"config error: quantize.method={base.method!r}; allowed as a base: linear (data-free, "
                              "each layer on its own; GPTQ's layers depend on the quantized ones before them)")
        needed = (Path(args.weights),)
    for path in needed:
        if not path.is_file():
            raise ConfigError(f"config error: {path} does not exist; run `dvc repro calibrate` first")

    started = time.perf_counter()
    analysis = Analysis(composed, base, Path(args.weights), Path(args.sensitivity), args.pairs, args.check_pairs,
                        widths, log)
    scorer = analysis.scorer
    # The per-layer costs take most of the time (one forward pass per layer and width);
    # a second goal over the same inputs and base reuses them.
    weights_md5 = file_md5(Path(args.weights))
    sensitivity_md5 = file_md5(Path(args.sensitivity)) if section == "palettize" else None
    widths_key = ("n_bits", "layer_bits", "num_kmeans_workers", "kmeans_solver", "dtype", "layer_dtypes")
    key_parts = [weights_md5, sensitivity_md5, widths, args.pairs, "stage" if analysis.exact else "estimate",
                 {name: repr(composed[name]) for name in ("model", "data", "calibrate")},
                 {k: v for k, v in asdict(base).items() if k not in widths_key}]
    if section == "quantize":  # kept as it was for palettize, whose costs earlier runs cached
        key_parts.append(section)
    cache = COST_CACHE / f"{hashlib.md5(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()}.json"
    if cache.is_file():
        cost = {(name, b): c for name, b, c in json.loads(cache.read_text())}
        log.info("per-layer costs from %s", cache)
    else:
        cost = analysis.costs()
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps([[name, b, c] for (name, b), c in cost.items()]))
    path = greedy_path(analysis.layers, cost, widths)
    overhead = package_overhead(analysis.layers, current, Path(args.metrics), section)
    if args.size_mb is not None and overhead is None:
        raise ConfigError(f"config error: --size-mb needs {args.metrics} from a `dvc repro` to estimate package sizes")
    layers = {layer.name: layer for layer in analysis.layers}

    def size_of(bits: dict[str, int]) -> float:
        return sum(layer_bytes(layers[name], b) for name, b in bits.items()) + (overhead or 0.0)

    def upwards(start: dict[str, int], budget: float) -> list[dict[str, int]]:
        return refill(start, analysis.layers, cost, widths, budget, overhead or 0.0)

    def meets(result: dict) -> bool:
        if args.meet_target:
            return result["meets_target"]
        if args.min_quality is not None:
            return result["quality"] >= args.min_quality
        return result["cosine"] >= args.min_cosine and (
            args.max_spearman_drop is None or result["spearman_drop"] <= args.max_spearman_drop)

    bits, result, measured = choose(path, analysis.check, size_of, meets, args.size_mb, upwards)
    weights_mb = sum(layer_bytes(layers[n], b) for n, b in bits.items()) / 1e6
    mean_bits = sum(layers[n].numel * width_bits(b) for n, b in bits.items()) / sum(
        layer.numel for layer in analysis.layers)
    histogram = {b: sum(1 for v in bits.values() if v == b) for b in widths}
    label = (lambda b: f"{b}-bit") if section == "palettize" else str  # noqa: E731
    if args.size_mb is not None:
        goal_text = f"--size-mb {args.size_mb}"
    elif args.meet_target:
        goal_text = "--meet-target"
    elif args.min_quality is not None:
        goal_text = f"--min-quality {args.min_quality}"
    else:
        goal_text = f"--min-cosine {args.min_cosine}" + (
            f" --max-spearman-drop {args.max_spearman_drop}" if args.max_spearman_drop is not None else "")
    cost_count, check_count = scorer.counts
    candidates_text = {"palettize": "the palettize stage's own k-means" if analysis.exact else "its own k-means",
                       "quantize": "the quantize stage's own output"}[section]
    dev = f"held-out dev {scorer.unit}" if not scorer.overlap else (
        f"dev {scorer.unit} (data.calibration_file, too small to hold any out: the calibration ones)")
    header = [
        f"Mixed-bit recipe written by `python -m coreml_pipeline.tools.mixed_bit {goal_text} --name {args.name}"
        + "".join(f" {o}" for o in args.overrides) + "`.",
        f"Inputs: {args.weights} md5 {weights_md5}"
        + (f", {args.sensitivity} md5 {sensitivity_md5}" if sensitivity_md5 else "")
        + f"; {dev}: {cost_count} for the per-layer costs, {check_count} for whole recipes.",
        f"Estimate: {mean_bits:.2f} bits per weight on average, {section}d weights {weights_mb:.2f} MB"
        + (f", package about {size_of(bits) / 1e6:.2f} MB" if overhead is not None else "")
        + f"; layers per width {', '.join(f'{label(b)}: {n}' for b, n in histogram.items() if n)}.",
        f"Measured by the generator ({candidates_text}, dev {scorer.unit}): {scorer.describe(result)}.",
        f"Run it: dvc exp run -S {section}={args.name}",
    ]
    out = config.CONF_DIR / section / f"{args.name}.yaml"
    tables = {layer.name for layer in analysis.layers if layer.embedding}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(recipe_text(base, bits, header, tables), encoding="utf-8")
    report = Path(args.report) / f"{args.name}.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({
        "goal": goal_text, "technique": section, "overrides": args.overrides, "bits": widths, **result,
        "family": family.name, "dev_overlaps_calibration": scorer.overlap,
        "candidates": ("quantize stage" if section == "quantize" else "palettize stage (exact_dp)")
        if analysis.exact else "estimate",
        "estimated_package_mb": size_of(bits) / 1e6 if overhead is not None else None,
        "mean_bits": mean_bits,
        "measured": [{"package_mb": size_of(dict(key)) / 1e6, **value} for key, value in measured.items()],
        "cost": {f"{name}@{b}": c for (name, b), c in cost.items()},
        "path_sizes_mb": [size_of(p) / 1e6 for p in path],
        "layer_bits" if section == "palettize" else "layer_dtypes": bits,
        "seconds": round(time.perf_counter() - started, 1),
    }, indent=1), encoding="utf-8")
    for line in header:
        print(line)
    print(f"wrote {out} and {report}")


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
