"""Stage 1, prune: zero weights of every Linear layer with coremltools.

none: the float weights pass through. magnitude: data-free one-shot
MagnitudePruner. sparse_gpt: LayerwiseCompressor (SparseGPT) with unpadded
calibration sentences from the dev split (or tokens, for a causal LM); for a
network without a block stack (a UNet, a ResNet, a custom module), coremltools'
SparseGPT layer by layer on the family's calibration samples (stages/layerwise.py). Writes safetensors with the
``_COREML_`` pruning metadata the converter reads.
"""

from __future__ import annotations

import argparse

import torch

from stages import config, families, runtime
from stages.families.base import torch_device
from stages.model import BERT_BLOCKS, load_tokenizer, save_weights
from stages.schema import DataConfig, ModelConfig, PruneConfig

# The layers coremltools' MagnitudePruner prunes; embeddings stay dense.
PRUNED_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")


def magnitude_prune(model: torch.nn.Module, cfg: PruneConfig) -> torch.nn.Module:
    from coremltools.optimize.torch.pruning import MagnitudePruner, MagnitudePrunerConfig

    module_cfg = {"target_sparsity": float(cfg.target_sparsity), "block_size": cfg.block_size}
    if cfg.n_m_ratio:
        module_cfg["n_m_ratio"] = tuple(cfg.n_m_ratio)
    pruner = MagnitudePruner(model, MagnitudePrunerConfig.from_dict(
        {"module_type_configs": {kind: module_cfg for kind in PRUNED_TYPES}}))
    pruner.prepare(inplace=True)
    pruner.step()  # one step of the constant scheduler (begin_step 0) applies the full target
    return pruner.finalize(inplace=True)


def calibration_inputs(model_cfg: ModelConfig, data_cfg: DataConfig, num_samples: int, seed: int) -> list[torch.Tensor]:
    """Unpadded [1, L] input_ids: the GPT input cacher calls model(batch) with no
    attention mask, so padding would pollute the layer Hessians."""
    from stages.data import calibration_pairs

    tokenizer = load_tokenizer(model_cfg)
    sentences = calibration_pairs(data_cfg, num_samples, seed).sentences()[:num_samples]
    return [tokenizer(s, truncation=True, max_length=model_cfg.max_length, return_tensors="pt")["input_ids"]
            for s in sentences]


def sparse_gpt_prune(model: torch.nn.Module, cfg: PruneConfig, samples: list[torch.Tensor],
                     blocks: str = BERT_BLOCKS, device: str = "cpu") -> torch.nn.Module:
    from coremltools.optimize.torch.layerwise_compression import LayerwiseCompressor, LayerwiseCompressorConfig

    global_cfg = {"algorithm": "sparse_gpt", **sparse_gpt_options(cfg)}
    compressor = LayerwiseCompressor(model, LayerwiseCompressorConfig.from_dict({
        "global_config": global_cfg,
        "input_cacher": "gpt",  # the default cacher fails on BERT ("not enough values to unpack")
        "layers": [blocks],
        "calibration_nsamples": len(samples),
    }))
    return compressor.compress(samples, device=str(device), inplace=True).cpu()


def sparse_gpt_options(cfg: PruneConfig) -> dict:
    # SparseGPT would also quantize to uint8 by default; this stage only prunes.
    options = {"target_sparsity": float(cfg.target_sparsity), "weight_dtype": "float32"}
    if cfg.n_m_ratio:
        options["n_m_ratio"] = tuple(cfg.n_m_ratio)
    return options


def prune(model: torch.nn.Module, cfg: PruneConfig, samples: list[torch.Tensor] | None = None,
          blocks: str = BERT_BLOCKS, device: str = "cpu") -> torch.nn.Module:
    if cfg.method == "magnitude":
        return magnitude_prune(model, cfg)
    if cfg.method == "sparse_gpt":
        return sparse_gpt_prune(model, cfg, samples or [], blocks, device)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--out", required=True, help="pruned weights (.safetensors)")
    args = parser.parse_args(argv)
    params = config.load(("model", "data", "prune", "runtime"), args.params)
    cfg: PruneConfig = params["prune"]
    log = runtime.setup("prune", numerics=params["runtime"])

    # The first stage that loads the model: a network that cannot be compressed or
    # traced is refused here, before any compression work.
    family = families.get(params["model"], params["data"])
    model = family.load_float()
    family.check_layers(model)
    family.check_traceable(model, seq_len=8)
    device = torch_device(params["model"])
    with runtime.timed(log, f"prune method={cfg.method}"):
        if cfg.method == "sparse_gpt" and not family.block_stack:
            from stages.layerwise import compress_each_layer

            model = compress_each_layer(model, "sparse_gpt", sparse_gpt_options(cfg), family,
                                        family.calibration_samples(cfg.num_samples, 0), device)
        elif cfg.method == "sparse_gpt":
            model = prune(model, cfg, family.layerwise_samples(cfg.num_samples), family.layerwise_blocks(model),
                          device)
        else:
            model = prune(model, cfg)
    save_weights(model, args.out)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
