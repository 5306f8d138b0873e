"""Stage 2, calibrate: per-weight sensitivity for sensitive k-means, computed once.

SKMPalettizer.compute_sensitivity runs one backward pass per calibration pair
of a cosine-similarity loss (the loss all-MiniLM was trained with on STS-like
data) and returns normalised squared gradients. They are cached as an
artifact so that every palettize variant reuses them.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from stages import config, runtime
from stages.data import Pairs, calibration_pairs
from stages.model import compressible_weights, load_tokenizer, load_weights, pool, save_tensors
from stages.schema import ModelConfig


def pair_batches(pairs: Pairs, tokenizer, max_length: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for s1, s2, score in zip(pairs.sentence1, pairs.sentence2, pairs.scores):
        batches.append({
            "a": tokenizer(s1, truncation=True, max_length=max_length, return_tensors="pt"),
            "b": tokenizer(s2, truncation=True, max_length=max_length, return_tensors="pt"),
            "label": torch.tensor(score / 5.0),
        })
    return batches


def cosine_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    def embed(tokens):
        hidden = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        return pool(hidden, tokens["attention_mask"])

    cosine = (embed(batch["a"]) * embed(batch["b"])).sum(-1)
    return ((cosine - batch["label"]) ** 2).sum()


def sensitivity(model: torch.nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Normalised Fisher sensitivity of every Linear and Embedding weight."""
    from coremltools.optimize.torch.palettization import SKMPalettizer, SKMPalettizerConfig

    skm = SKMPalettizer(model, SKMPalettizerConfig.from_dict({"calibration_nsamples": len(batches)}))
    with tempfile.TemporaryDirectory() as tmp:
        values = skm.compute_sensitivity(batches, cosine_loss, sensitivity_path=str(Path(tmp) / "s.pt"))
    wanted = {f"{name}.weight" for name, _ in compressible_weights(model)}
    missing = wanted - set(values)
    if missing:  # SKMPalettizer would crash later on a parameter with no gradient
        raise RuntimeError(f"no sensitivity (no gradient) for {sorted(missing)[:3]}")
    return {name: values[name].contiguous() for name in sorted(wanted)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--weights", required=True, help="pruned weights from the prune stage")
    parser.add_argument("--out", required=True, help="sensitivity (.safetensors)")
    args = parser.parse_args(argv)
    params = config.load(("model", "data", "calibrate"), args.params)
    cfg = params["calibrate"]
    model_cfg: ModelConfig = params["model"]
    log = runtime.setup("calibrate", cfg.seed)

    pairs = calibration_pairs(params["data"], cfg.num_samples, cfg.seed)
    batches = pair_batches(pairs, load_tokenizer(model_cfg), model_cfg.max_length)
    model = load_weights(model_cfg, args.weights)
    with runtime.timed(log, f"sensitivity from {len(batches)} pairs"):
        values = sensitivity(model, batches)
    save_tensors(values, args.out)
    log.info("wrote %s (%d tensors)", args.out, len(values))


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
