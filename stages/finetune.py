"""Stage 2, finetune (optional): compression while fine-tuning, the third workflow.

Fine-tunes on the family's training split with its training loss (the sentence
embedder: STS-B train pairs, the cosine-similarity loss all-MiniLM was trained
with), while compressing:

- dkm: coremltools' DKMPalettizer (differentiable k-means) learns look-up
  tables with the palettize section's n_bits, granularity and group size
  (finetune.palettize, a copy Hydra makes). The
  palettize stage (method kmeans) then stores them; every group already holds
  at most 2**n_bits values, so its exact 1-D k-means finds those tables again.
- qat: quantization-aware training of the weights against the quantize
  section's dtype, scheme and granularity (finetune.quantize, a copy); the quantize stage stores the result.
  coremltools' LinearQuantizer needs torch.fx, which cannot trace transformers'
  BertModel ("slice indices must be integers"), so the weights are fake-quantized
  here with a straight-through estimator instead (torch parametrization).
- gradual_prune: coremltools' MagnitudePruner, sparsity raised from 0 to
  target_sparsity along its polynomial-decay schedule over the training steps.

With method none the pruned weights pass through unchanged (the same bytes,
so DVC's cache serves everything downstream).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from coreml_pipeline import runtime
from coreml_pipeline.config import compose as config
from coreml_pipeline.config.schema import FinetuneConfig
from coreml_pipeline.techniques import registry
from coreml_pipeline.techniques.methods import finetune as _registers_finetune_methods  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--weights", type=runtime.existing_input, required=True, help="pruned weights from the prune stage")
    parser.add_argument("--out", required=True, help="fine-tuned weights (.safetensors)")
    args = parser.parse_args(argv)
    # Its own section first, without the model's check (which imports torch, about 1.1 s): a pass-through
    # (the default) costs nothing more; the validate stage upstream has checked the model section.
    cfg: FinetuneConfig = config.load(("finetune",), args.params, whole=False)["finetune"]
    log = runtime.setup("finetune", compute=False)  # a pass-through needs no torch

    out = Path(args.out)
    registry.method("finetune", cfg)  # its own checks, before any data or weights load
    if cfg.method == "none":
        runtime.pass_through(args.weights, out)
        log.info("finetune.method is none: %s passes through", args.weights)
        return
    params = config.load(("model", "data", "runtime"), args.params)
    # Imported here: a pass-through (the default) costs no torch or transformers import (about 3 s).
    runtime.prepare_compute(cfg.seed, params["runtime"])
    from coreml_pipeline import families
    from coreml_pipeline.families.base import to_device, torch_device
    from coreml_pipeline.model import load_weights, save_weights
    from coreml_pipeline.techniques.finetune import train

    model_cfg = params["model"]
    family = families.get(model_cfg, params["data"])
    data = family.train_batches(cfg.batch_size, cfg.steps, cfg.seed)
    device = torch_device(model_cfg)
    model = load_weights(model_cfg, args.weights).to(device)
    with runtime.timed(log, f"finetune method={cfg.method} {cfg.steps} steps of {cfg.batch_size} on {device}"):
        model = train(model, cfg, (to_device(batch, device) for batch in data), family.train_loss, log)
    save_weights(model.cpu(), out)
    log.info("wrote %s", out)


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
