"""Stage 4, quantize: linear quantization of the weights (int8/uint8, int4/uint4).

It comes after palettize and reads its output, so that switching between
palettization and quantization (or tuning either) reruns only what is
downstream: with palettize=none it quantizes the (possibly pruned) weights,
which gives sparse quantization after pruning; with palettize on it is off
(the schema refuses both at once) and a quantized look-up table is
palettize.lut_dtype. linear: data-free PostTrainingQuantizer. gptq:
LayerwiseCompressor (GPTQ) with calibration sentences. The embedding tables,
which coremltools' torch quantizers skip, are quantized with coremltools'
Core ML-side block-wise quantizer and given the same metadata.
"""

from __future__ import annotations

import argparse

from coreml_pipeline import runtime
from coreml_pipeline.config import compose as config
from coreml_pipeline.config.schema import QuantizeConfig
from coreml_pipeline.techniques import registry
from coreml_pipeline.techniques.methods import quantize as _registers_quantize_methods  # noqa: F401


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--weights", type=runtime.existing_input, required=True, help="weights from the palettize stage")
    parser.add_argument("--out", required=True, help="quantized weights (.safetensors)")
    args = parser.parse_args(argv)
    # Its own section first, without the model's check (which imports torch, about 1.1 s): a pass-through
    # (the default) costs nothing more; the validate stage upstream has checked the model section.
    cfg: QuantizeConfig = config.load(("quantize",), args.params, whole=False)["quantize"]
    log = runtime.setup("quantize", compute=False)  # a pass-through needs no torch
    registry.method("quantize", cfg)  # its own checks, before the weights load

    if cfg.method == "none":
        runtime.pass_through(args.weights, args.out)
        log.info("quantize.method is none: %s passes through", args.weights)
        return
    params = config.load(("model", "data", "runtime"), args.params)
    # Imported here: a pass-through (the default) costs no torch or transformers import (about 3 s).
    runtime.prepare_compute(0, params["runtime"])
    from coreml_pipeline import families
    from coreml_pipeline.families.base import torch_device
    from coreml_pipeline.model import load_weights, save_weights
    from coreml_pipeline.techniques.quantize import run

    model = load_weights(params["model"], args.weights)
    device = torch_device(params["model"])
    family = families.get(params["model"], params["data"])
    with runtime.timed(log, f"quantize method={cfg.method} {cfg.dtype} {cfg.scheme} {cfg.granularity}"):
        model = run(model, cfg, log=log, device=device, family=family)
    save_weights(model, args.out)
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
