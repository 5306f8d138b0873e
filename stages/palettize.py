"""Stage 3, palettize: look-up tables for every Linear, Conv and Embedding weight.

kmeans: data-free PostTrainingPalettizer. sensitive_kmeans: SKMPalettizer
weighted by the sensitivity cached by the calibrate stage. uniform: evenly
spaced tables (coremltools' uniform mode). none: the weights pass through.
Vector palettization (cluster_dim), per-channel scales and int8 look-up
tables are coremltools options passed through. The embedding
tables get their own per-type config: under per_grouped_channel coremltools
would skip the word embedding (30522 rows do not divide by the group size),
so they are grouped along the hidden axis instead. Pruned zeros survive as
their own centroid (sparse palettization); the stage reports how many did.
"""

from __future__ import annotations

import argparse

from coreml_pipeline import runtime
from coreml_pipeline.config import compose as config
from coreml_pipeline.config.schema import PalettizeConfig
from coreml_pipeline.model import LazyTensors, load_weights, save_weights
from coreml_pipeline.techniques import registry
from coreml_pipeline.techniques.palettize import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--weights", type=runtime.existing_input, required=True, help="pruned weights from the prune stage")
    parser.add_argument("--sensitivity", type=runtime.existing_input, required=True, help="sensitivity from the calibrate stage")
    parser.add_argument("--out", required=True, help="palettized weights (.safetensors)")
    args = parser.parse_args(argv)
    params = config.load(("model", "palettize", "runtime"), args.params)
    cfg: PalettizeConfig = params["palettize"]
    log = runtime.setup("palettize", numerics=params["runtime"])
    method = registry.method("palettize", cfg)  # its own checks, before the weights load

    model = load_weights(params["model"], args.weights)
    # Read layer by layer as the k-means reaches each (as large as the model: not held whole).
    sensitivity = LazyTensors(args.sensitivity) if method.needs_sensitivity else None
    mixed = f" ({len(cfg.layer_bits)} layer_bits patterns)" if cfg.layer_bits else ""
    solver = f" solver={method.solver(cfg)}" if method.kmeans else ""  # kmeans_solver=auto resolved
    with runtime.timed(log, f"palettize method={cfg.method} n_bits={cfg.n_bits}{mixed} {cfg.granularity}{solver}"):
        model = run(model, cfg, sensitivity, log)
    save_weights(model, args.out)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
