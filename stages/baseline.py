"""The float reference, computed once per model: the uncompressed float16
.mlpackage (the size baseline) and the float32 embeddings and STS-B score
that evaluate compares every compressed model against."""

from __future__ import annotations

import argparse
from pathlib import Path

from stages import config, runtime
from stages import provenance as provenance_lib
from stages.convert import convert_and_check
from stages.data import eval_pairs
from stages.evaluate import sts_spearman
from stages.model import encode, load_float_model, load_tokenizer, resolve_source, save_tensors


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--package", required=True, help="float16 .mlpackage to write")
    parser.add_argument("--embeddings", required=True, help="float embeddings of the evaluation sentences")
    parser.add_argument("--report", required=True, help="baseline report (.json)")
    args = parser.parse_args(argv)
    params = config.load(("model", "data", "convert", "evaluate"), args.params)
    model_cfg = params["model"]
    log = runtime.setup("baseline")

    bert = load_float_model(model_cfg)
    pairs = eval_pairs(params["data"])
    with runtime.timed(log, f"float embeddings of {len(pairs)} pairs"):
        embeddings = encode(bert, load_tokenizer(model_cfg), pairs.sentences(), model_cfg, params["evaluate"].batch_size)
    spearman = sts_spearman(embeddings, pairs)
    log.info("float STS-B Spearman x100: %.2f", spearman)
    provenance = provenance_lib.collect({"model": model_cfg, "convert": params["convert"]}, [],
                                        resolve_source(model_cfg.source))
    report = convert_and_check(bert, model_cfg, params["convert"], Path(args.package), log, provenance)
    save_tensors({"embeddings": embeddings.contiguous()}, args.embeddings)
    runtime.write_json({"spearman": spearman, "package_bytes": report["package_bytes"],
                "num_pairs": len(pairs), "readback_max_abs_diff": report["max_abs_diff"]}, args.report)


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
