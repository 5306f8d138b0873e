"""Stage 5, evaluate: quality, fidelity and size of the compressed model.

Linux cannot run a Core ML model, so evaluation runs the compressed torch
weights, which the convert stage proved equal to the ones inside the
.mlpackage (its read-back report). On macOS the package itself is also run
and scored. Writes DVC metrics, a per-layer table (what each weight became)
and plot data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file

from coreml_pipeline import families, runtime
from coreml_pipeline.config import compose as config
from coreml_pipeline.evaluation import layer_markdown, write_scores
from coreml_pipeline.families.base import torch_device
from coreml_pipeline.model import load_weights


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--weights", type=runtime.existing_input, required=True, help="palettized weights")
    parser.add_argument("--package", type=runtime.existing_input, required=True, help="the compressed .mlpackage")
    parser.add_argument("--readback", type=runtime.existing_input, required=True, help="convert stage's read-back report")
    parser.add_argument("--float-embeddings", type=runtime.existing_input, required=True)
    parser.add_argument("--float-report", type=runtime.existing_input, required=True)
    parser.add_argument("--metrics", required=True, help="DVC metrics (.json)")
    parser.add_argument("--layers", required=True, help="per-layer table (.csv; a .md is written beside it)")
    parser.add_argument("--similarities", required=True, help="plot data: float vs compressed pair cosines (.csv); "
                        "other families: a per-sample float vs compressed statistic")
    parser.add_argument("--tradeoff", required=True,
                        help="plot data: one row of size and quality (.csv), for `dvc plots diff` across experiments")
    args = parser.parse_args(argv)
    params = config.load(("model", "data", "evaluate", "runtime"), args.params)
    model_cfg = params["model"]
    log = runtime.setup("evaluate", numerics=params["runtime"])

    readback = json.loads(Path(args.readback).read_text())
    float_report = json.loads(Path(args.float_report).read_text())
    family = families.get(model_cfg, params["data"])
    model = load_weights(model_cfg, args.weights)
    scores = family.score(model, load_file(args.float_embeddings), float_report, readback, params["evaluate"],
                          torch_device(model_cfg), Path(args.package), log)
    # Calibration counts as used (a split can hold fewer than asked), as the package's provenance records them.
    scores.metrics["samples_used"] = readback.get("samples_used", {})
    write_scores(scores, Path(args.metrics), Path(args.layers), Path(args.similarities), Path(args.tradeoff))
    log.info("per layer:\n%s", layer_markdown(scores.layers))


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
