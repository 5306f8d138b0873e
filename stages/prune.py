"""Stage 1, prune: zero weights of every Linear layer with coremltools.

none: the float weights pass through. magnitude: data-free one-shot
MagnitudePruner. sparse_gpt: LayerwiseCompressor (SparseGPT) with unpadded
calibration sentences from the dev split (or tokens, for a causal LM); for a
network without a block stack (a UNet, a ResNet, a custom module), coremltools'
SparseGPT layer by layer on the family's calibration samples (coreml_pipeline/techniques/layerwise.py). Writes safetensors with the
``_COREML_`` pruning metadata the converter reads.
"""

from __future__ import annotations

import argparse

from coreml_pipeline import families, runtime
from coreml_pipeline.config import compose as config
from coreml_pipeline.config.schema import PruneConfig
from coreml_pipeline.families.base import torch_device
from coreml_pipeline.model import save_weights
from coreml_pipeline.techniques import registry
from coreml_pipeline.techniques.methods import prune as _registers_prune_methods  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--out", required=True, help="pruned weights (.safetensors)")
    args = parser.parse_args(argv)
    params = config.load(("model", "data", "prune", "runtime"), args.params)
    cfg: PruneConfig = params["prune"]
    log = runtime.setup("prune", numerics=params["runtime"])
    method = registry.method("prune", cfg)  # its own checks, before the model loads

    # The first stage that loads the model: a network that cannot be compressed or
    # traced is refused here, before any compression work.
    family = families.get(params["model"], params["data"])
    model = family.load_float()
    family.check_layers(model)
    family.check_traceable(model, seq_len=8)
    device = torch_device(params["model"])
    with runtime.timed(log, f"prune method={cfg.method}"):
        model = method.apply(model, cfg, family=family, device=device)
    save_weights(model, args.out)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
