"""Stage 0, inspect: the model's compressible layers and their shapes, for validate.

It loads the float model once and writes each Linear, Conv and Embedding layer's
name, kind and weight shape. It reads only the model section, so DVC reruns it
only when the model (or the code that loads it) changes; validate then checks
every option that depends on shapes (palettize.group_size, cluster_dim and
layer_bits patterns, quantize.block_size) against this table on every run,
without loading weights: a group size that divides no channel count stops
`dvc repro` in seconds, not after prune and calibrate.
"""

from __future__ import annotations

import argparse

from coreml_pipeline import families, runtime
from coreml_pipeline.config import compose as config
from coreml_pipeline.model import layer_shapes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--out", required=True, help="the layer table (.json)")
    args = parser.parse_args(argv)
    params = config.load(("model",), args.params)
    log = runtime.setup("inspect", compute=False)  # loads weights, computes nothing
    model = families.get(params["model"]).load_float()
    layers = layer_shapes(model)
    runtime.write_json({"family": params["model"].family, "layers": layers}, args.out)
    log.info("wrote %s (%d compressible layers)", args.out, len(layers))


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
