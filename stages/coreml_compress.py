"""Optional stage, coreml_compress: the same recipe on the Core ML side.

coremltools.optimize.coreml compresses the float16 .mlpackage of the baseline
stage directly (prune_weights -> palettize_weights -> linear_quantize_weights,
joint where more than one applies), so that users can compare it with the
torch-side result of the same prune/palettize/quantize settings. The Core ML
side is data-free: sensitive k-means, SparseGPT and GPTQ run as their
data-free forms (k-means, magnitude, linear), which the metrics name.

Linux cannot run the package, so its weights are decoded (the read-back the
convert stage uses), loaded into the torch model and scored exactly as
evaluate scores the torch-side model. With coreml.enabled false the stage
only records that it is off.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from coreml_pipeline import runtime
from coreml_pipeline.config import compose as config
from coreml_pipeline.config.schema import CoremlConfig
from coreml_pipeline.coreml.compress import compress, load_decoded, plan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--float-package", type=runtime.existing_input, required=True, help="the baseline float16 .mlpackage")
    parser.add_argument("--float-embeddings", type=runtime.existing_input, required=True)
    parser.add_argument("--float-report", type=runtime.existing_input, required=True)
    parser.add_argument("--out", required=True, help="folder for the Core ML-side .mlpackage")
    parser.add_argument("--metrics", required=True, help="DVC metrics (.json)")
    args = parser.parse_args(argv)
    cfg: CoremlConfig = config.load(("coreml",), args.params, whole=False)["coreml"]  # off: no torch import

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    if not cfg.enabled:
        (out / "README").write_text("coreml.enabled is false: no Core ML-side package\n", encoding="utf-8")
        runtime.write_json({"enabled": False}, args.metrics)
        # The start line sweeps count stages by (runtime.setup would import torch just to log it).
        print("stage=coreml_compress start: coreml.enabled is false; nothing to do", file=sys.stderr)
        return
    # Imported only when enabled: the disabled stage above stays free of torch.
    from safetensors.torch import load_file

    from coreml_pipeline import families
    from coreml_pipeline.coreml.convert import package_bytes, save_package
    from coreml_pipeline.families.base import torch_device

    params = config.load(("model", "data", "evaluate", "runtime"), args.params)
    log = runtime.setup("coreml_compress", numerics=params["runtime"])
    steps, notes = plan(cfg.prune, cfg.palettize, cfg.quantize, cfg)
    if not steps:
        raise ValueError("coreml.enabled: the recipe compresses nothing (prune, palettize and quantize are all none)")
    start = time.perf_counter()
    mlmodel = compress(Path(args.float_package), steps, log)
    seconds = time.perf_counter() - start
    package = out / "model.mlpackage"
    save_package(mlmodel, package)

    family = families.get(params["model"], params["data"])
    network = family.load_float()
    decoded = load_decoded(network, package, family.prefix)
    run = {"enabled": True, "steps": [name for name, _, _ in steps], "data_free_substitutes": notes,
           "compression_seconds": round(seconds, 1)}
    metrics = family.score_package(network, load_file(args.float_embeddings),
                                   json.loads(Path(args.float_report).read_text()), params["evaluate"],
                                   torch_device(params["model"]), package_bytes(package), decoded, run)
    runtime.write_json(metrics, args.metrics)
    log.info("Core ML side: quality %s, %d bytes (%.1f%% of float16)%s", metrics["quality"],
             metrics["package_bytes"], 100 * metrics["size_ratio"], f"; {'; '.join(notes)}" if notes else "")


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
