"""Stage 2, calibrate: per-weight sensitivity for sensitive k-means, computed once.

One backward pass per calibration pair of a cosine-similarity loss (the loss
all-MiniLM was trained with on STS-like data), giving the normalised squared
gradients SKMPalettizer.compute_sensitivity gives, computed in place in
less than half its memory (fisher_sensitivity). They are cached as an artifact so
that every palettize variant reuses them.
"""

from __future__ import annotations

import argparse

from coreml_pipeline import families, runtime
from coreml_pipeline.config import compose as config
from coreml_pipeline.families.base import to_device, torch_device
from coreml_pipeline.model import load_weights, save_tensors
from coreml_pipeline.techniques.calibrate import sensitivity


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--weights", type=runtime.existing_input, required=True, help="pruned weights from the prune stage")
    parser.add_argument("--out", required=True, help="sensitivity (.safetensors)")
    args = parser.parse_args(argv)
    params = config.load(("model", "data", "calibrate", "runtime"), args.params)
    cfg = params["calibrate"]
    log = runtime.setup("calibrate", cfg.seed, params["runtime"])

    family = families.get(params["model"], params["data"])
    device = torch_device(params["model"])
    batches = [to_device(batch, device) for batch in family.calibration_samples(cfg.num_samples, cfg.seed)]
    runtime.warn_if_capped(log, "calibrate.num_samples", cfg.num_samples, len(batches),
                           f"the calibration split (data.calibration_file={params['data'].calibration_file})")
    model = load_weights(params["model"], args.weights).to(device)
    with runtime.timed(log, f"sensitivity from {len(batches)} samples on {device}"):
        values = sensitivity(model, batches, family.loss)
    save_tensors(values, args.out)
    log.info("wrote %s (%d tensors)", args.out, len(values))


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
