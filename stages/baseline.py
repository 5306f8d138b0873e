"""The float reference, computed once per model: the uncompressed float16
.mlpackage (the size baseline) and the float32 outputs (the sentence
embeddings; for other families what their scoring keeps of each output) and
float quality (STS-B score, perplexity, accuracy) that evaluate compares every
compressed model against."""

from __future__ import annotations

import argparse
from pathlib import Path

from coreml_pipeline import families, numerics, runtime
from coreml_pipeline.config import compose as config
from coreml_pipeline.coreml import provenance
from coreml_pipeline.coreml.convert import convert_and_check
from coreml_pipeline.families.base import torch_device
from coreml_pipeline.model import save_tensors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--package", required=True, help="float16 .mlpackage to write")
    parser.add_argument("--embeddings", required=True,
                        help="float embeddings of the evaluation sentences (other families: float outputs)")
    parser.add_argument("--report", required=True, help="baseline report (.json)")
    args = parser.parse_args(argv)
    params = config.load(("model", "data", "convert", "evaluate", "runtime"), args.params)
    log = runtime.setup("baseline", numerics=params["runtime"])

    family = families.get(params["model"], params["data"])
    network = family.load_float()
    device = torch_device(params["model"])
    reference, quality, counts = family.float_reference(network, params["evaluate"], device, log)
    runtime.warn_if_capped(log, "data.eval_max_pairs", params["data"].eval_max_pairs, next(iter(counts.values())),
                           "the evaluation split")
    # What made the float package: the model, conversion and numerics, on this platform.
    platform = numerics.fingerprint(params["runtime"].numerics, device)
    record = provenance.collect({name: params[name] for name in ("model", "convert", "runtime")}, [],
                                family.weights_location(), platform)
    report = convert_and_check(network, family, params["convert"], Path(args.package), log, record)
    save_tensors(reference, args.embeddings)
    runtime.write_json({**quality, "package_bytes": report["package_bytes"], **counts,
                        "readback_max_abs_diff": report["max_abs_diff"]}, args.report)


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
