"""Stage 4, convert: the compressed model as a Core ML .mlpackage, then proof
that the package holds exactly the torch weights.

ct.convert reads the ``_COREML_`` metadata buffers and keeps the compression
as constexpr ops (constexpr_lut_to_dense, constexpr_lut_to_sparse +
constexpr_sparse_to_dense, ...). The saved package is read back on its own
(MIL program, each constexpr op materialised) and every parameter compared
with the torch weight cast to float16.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from coreml_pipeline import families, numerics, runtime
from coreml_pipeline.config import compose as config
from coreml_pipeline.coreml import provenance as provenance_lib
from coreml_pipeline.coreml.convert import convert_and_check
from coreml_pipeline.families.base import torch_device
from coreml_pipeline.model import load_weights
from coreml_pipeline.techniques import registry
from coreml_pipeline.techniques.methods import (  # noqa: F401  (registers every method: samples_used asks each)
    finetune,
    palettize,
    prune,
    quantize,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--weights", type=runtime.existing_input, required=True, help="palettized weights from the palettize stage")
    parser.add_argument("--out", required=True, help="the .mlpackage to write")
    parser.add_argument("--report", required=True, help="read-back report (.json)")
    args = parser.parse_args(argv)
    # Every section that shaped the weights is recorded in the package's provenance.
    params = config.load(("model", "data", "prune", "finetune", "calibrate", "palettize", "quantize", "convert",
                          "runtime"), args.params)
    log = runtime.setup("convert", numerics=params["runtime"])

    data_cfg = params["data"]
    # The data that shaped the weights: calibration samples, and the training pairs when fine-tuned.
    data_files = [Path(data_cfg.dir) / data_cfg.calibration_file]
    if params["finetune"].method != "none":
        data_files.append(Path(data_cfg.dir) / data_cfg.train_file)
    family = families.get(params["model"], data_cfg)
    # The platform of the float passes that made the weights (every stage reads the same runtime section).
    platform = numerics.fingerprint(params["runtime"].numerics, torch_device(params["model"]))
    samples_used = registry.samples_used(params, family)
    provenance = provenance_lib.collect(params, data_files, family.weights_location(), platform, samples_used)
    network = load_weights(params["model"], args.weights)
    report = convert_and_check(network, family, params["convert"], Path(args.out), log, provenance)
    report["samples_used"] = samples_used  # evaluate copies it into the metrics
    runtime.write_json(report, args.report)


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
