"""Stage 1, prune: zero weights of every Linear layer with coremltools.

none: the float weights pass through. magnitude: data-free one-shot
MagnitudePruner. sparse_gpt: LayerwiseCompressor (SparseGPT) with unpadded
calibration sentences from the dev split. Writes safetensors with the
``_COREML_`` pruning metadata the converter reads.
"""

from __future__ import annotations

import argparse

import torch

from stages import config, runtime
from stages.model import load_float_model, load_tokenizer, save_weights
from stages.schema import DataConfig, ModelConfig, PruneConfig


def magnitude_prune(model: torch.nn.Module, cfg: PruneConfig) -> torch.nn.Module:
    from coremltools.optimize.torch.pruning import MagnitudePruner, MagnitudePrunerConfig

    module_cfg = {"target_sparsity": float(cfg.target_sparsity), "block_size": cfg.block_size}
    if cfg.n_m_ratio:
        module_cfg["n_m_ratio"] = tuple(cfg.n_m_ratio)
    # MagnitudePruner supports Linear and Conv only; embeddings stay dense.
    pruner = MagnitudePruner(model, MagnitudePrunerConfig.from_dict({"module_type_configs": {"Linear": module_cfg}}))
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


def sparse_gpt_prune(model: torch.nn.Module, cfg: PruneConfig, samples: list[torch.Tensor]) -> torch.nn.Module:
    from coremltools.optimize.torch.layerwise_compression import LayerwiseCompressor, LayerwiseCompressorConfig

    global_cfg = {"algorithm": "sparse_gpt", "target_sparsity": float(cfg.target_sparsity),
                  # SparseGPT would also quantize to uint8 by default; this stage only prunes.
                  "weight_dtype": "float32"}
    if cfg.n_m_ratio:
        global_cfg["n_m_ratio"] = tuple(cfg.n_m_ratio)
    compressor = LayerwiseCompressor(model, LayerwiseCompressorConfig.from_dict({
        "global_config": global_cfg,
        "input_cacher": "gpt",  # the default cacher fails on BERT ("not enough values to unpack")
        "layers": [r"encoder\.layer\.\d+"],
        "calibration_nsamples": len(samples),
    }))
    return compressor.compress(samples, device="cpu", inplace=True)


def prune(model: torch.nn.Module, cfg: PruneConfig, samples: list[torch.Tensor] | None = None) -> torch.nn.Module:
    if cfg.method == "magnitude":
        return magnitude_prune(model, cfg)
    if cfg.method == "sparse_gpt":
        return sparse_gpt_prune(model, cfg, samples or [])
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--out", required=True, help="pruned weights (.safetensors)")
    args = parser.parse_args(argv)
    params = config.load(("model", "data", "prune"), args.params)
    cfg: PruneConfig = params["prune"]
    log = runtime.setup("prune")

    model = load_float_model(params["model"])
    samples = None
    if cfg.method == "sparse_gpt":
        samples = calibration_inputs(params["model"], params["data"], cfg.num_samples, seed=0)
    with runtime.timed(log, f"prune method={cfg.method}"):
        model = prune(model, cfg, samples)
    save_weights(model, args.out)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
