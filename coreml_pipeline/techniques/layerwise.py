"""SparseGPT and GPTQ for networks that are not a stack of repeated blocks
(a UNet, a ResNet, a user's module).

coremltools' LayerwiseCompressor walks a sequence of blocks, feeding each
block the previous block's compressed outputs; a UNet's skip connections and
a ResNet's stem do not fit that walk. Here coremltools' own per-layer
algorithms (algorithms.SparseGPT / algorithms.GPTQ, the ones LayerwiseCompressor
runs) get each layer's inputs from forward hooks on the whole network instead,
one group of layers at a time in network order, so that a group's inputs
already come from the compressed layers before it (as in the block walk) and
the Hessians held at once stay under a memory budget."""

from __future__ import annotations

import logging

import torch

from coreml_pipeline.config.schema import first_match
from coreml_pipeline.runtime import progress, warn_if_capped

log = logging.getLogger("pipeline.layerwise")
# The count each algorithm's samples come from, named in the warning when the data holds fewer.
NUM_SAMPLES_KEY = {"sparse_gpt": "prune.num_samples", "gptq": "quantize.num_samples"}
# Linear and Conv2d: the layers coremltools' OBS algorithms handle.
LAYER_TYPES = (torch.nn.Linear, torch.nn.Conv2d)
# Hessians (columns^2 float32 each) held at once: one group of layers per forward pass over the samples.
HESSIAN_BUDGET_BYTES = 2 << 30


def _columns(layer: torch.nn.Module) -> int:
    return int(layer.weight[0].numel())


def layer_groups(model: torch.nn.Module, budget: int = HESSIAN_BUDGET_BYTES) -> list[list[tuple[str, torch.nn.Module]]]:
    """The network's Linear/Conv2d layers in order, cut into groups whose Hessians fit ``budget``."""
    groups, current, used = [], [], 0
    skipped = []
    for name, layer in model.named_modules():
        if not isinstance(layer, LAYER_TYPES):
            continue
        if getattr(layer, "groups", 1) > 1:
            # coremltools' SparseGPT/GPTQ build one Hessian over a layer's whole input; a grouped
            # (depthwise) convolution's weight sees only its group's channels, and the update fails.
            skipped.append(name)
            continue
        size = 4 * _columns(layer) ** 2
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append((name, layer))
        used += size
    if skipped:
        log.info("%d grouped (depthwise) convolution(s) left to the next technique, e.g. %s", len(skipped), skipped[0])
    return groups + ([current] if current else [])


@torch.no_grad()
def compress_each_layer(model: torch.nn.Module, algorithm: str, options: dict, family, samples: list[dict],
                        device, budget: int = HESSIAN_BUDGET_BYTES, name_options: dict | None = None
                        ) -> torch.nn.Module:
    """Run coremltools' ``algorithm`` ("sparse_gpt" or "gptq", with its module ``options``, or those of
    the first ``name_options`` pattern that fully matches a layer's name) on every Linear/Conv2d layer
    of ``model``, fed the family's calibration ``samples`` on ``device``; the model comes back on the CPU."""
    from coremltools.optimize.torch.layerwise_compression.algorithms import (
        LayerwiseCompressionAlgorithm,
        LayerwiseCompressionAlgorithmConfig,
    )

    from coreml_pipeline.coreml.private import register_metadata_version

    def config(name: str):
        chosen = first_match(name_options or {}, name, options)
        return LayerwiseCompressionAlgorithmConfig.get_class(algorithm).from_dict({"algorithm": algorithm, **chosen})

    algorithm_class = LayerwiseCompressionAlgorithm.get_class(algorithm)
    wrapped = family.wrap(model).eval().to(device)
    groups = layer_groups(model, budget)
    for index, group in enumerate(progress(groups, algorithm, unit="layer group")):
        workers = {name: algorithm_class(layer, config(name)) for name, layer in group}
        hooks = [layer.register_forward_hook(
                     lambda _, inputs, output, worker=workers[name]: worker.add_batch(inputs[0].data, output.data))
                 for name, layer in group]
        try:
            for sample in samples:  # outputs are not kept: the hooks take what they need
                family.call(wrapped, sample, device)
        finally:
            for hook in hooks:
                hook.remove()
        for worker in workers.values():
            worker.compress()
            worker.cleanup()
        log.info("%s: layer group %d of %d done (%d layers)", algorithm, index + 1, len(groups), len(group))
    register_metadata_version(model)
    return model.cpu()


def compress_blocks(model: torch.nn.Module, algorithm: str, options: dict, samples: list, blocks: str,
                    device="cpu", name_options: dict | None = None) -> torch.nn.Module:
    """coremltools' LayerwiseCompressor running ``algorithm`` with its ``options`` (those of the first
    ``name_options`` pattern that fully matches a layer's name: its module_name_configs rule) over the
    stack of repeated ``blocks`` (a module-name regex), fed ``samples``; the model comes back on the CPU."""
    from coremltools.optimize.torch.layerwise_compression import LayerwiseCompressor, LayerwiseCompressorConfig

    config = {
        "global_config": {"algorithm": algorithm, **options},
        "input_cacher": "gpt",  # the default cacher fails on BERT ("not enough values to unpack")
        "layers": [blocks],
        "calibration_nsamples": len(samples),
    }
    if name_options:
        config["module_name_configs"] = {pattern: {"algorithm": algorithm, **o} for pattern, o in name_options.items()}
    compressor = LayerwiseCompressor(model, LayerwiseCompressorConfig.from_dict(config))
    return compressor.compress(samples, device=str(device), inplace=True).cpu()


def family_samples(family, num_samples: int) -> list:
    """The samples ``family`` feeds SparseGPT/GPTQ: its layer-wise samples over its block stack, or
    its calibration samples when it compresses layer by layer."""
    if family.block_stack:
        return family.layerwise_samples(num_samples)
    return family.calibration_samples(num_samples, 0)


def compress(model: torch.nn.Module, algorithm: str, options: dict, num_samples: int, device="cpu", family=None,
             samples: list | None = None, blocks: str | None = None, name_options: dict | None = None
             ) -> torch.nn.Module:
    """``algorithm`` on calibration data, with ``options`` (or, per layer, those of the first
    ``name_options`` pattern that fully matches its name). ``family`` given: over its block stack on
    its layer-wise samples, or layer by layer (compress_each_layer) on its calibration samples when it
    has none; without a family, over ``blocks`` on ``samples``."""
    if family is not None:
        samples = family_samples(family, num_samples)
        warn_if_capped(log, NUM_SAMPLES_KEY[algorithm], num_samples, len(samples), "the calibration split")
        if not family.block_stack:
            return compress_each_layer(model, algorithm, options, family, samples, device, name_options=name_options)
        blocks = family.layerwise_blocks(model)
    return compress_blocks(model, algorithm, options, samples or [], blocks, device, name_options)
