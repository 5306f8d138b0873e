"""Stage 0, validate: every section of params.yaml, before any compression work.

Every section's options and the joint compressions refused, then (with --layers,
the inspect stage's table) every option that depends on the model's shapes:
palettize.group_size, cluster_dim and layer_bits patterns, quantize.block_size.

DVC runs this stage whenever any parameter changes, and every other stage
depends on its marker file. The marker's content never changes, so a valid
change does not by itself rerun anything downstream; an invalid one stops
`dvc repro` here, before DVC removes any other stage's outputs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from coreml_pipeline import numerics, validation
from coreml_pipeline.config import compose as config
from coreml_pipeline.config.schema import ConfigError
from coreml_pipeline.runtime import existing_input, run_cli

MARKER_TEXT = "params.yaml passed validation\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--layers", type=existing_input,
                        help="the inspect stage's layer table: check the shape-dependent options")
    parser.add_argument("--out", required=True, help="marker file, constant content")
    args = parser.parse_args(argv)
    checked = validation.validate(config.read_params(args.params))
    if args.layers:
        validation.check_shapes(checked, json.loads(Path(args.layers).read_text(encoding="utf-8"))["layers"])
    numerics.check_host(checked["runtime"].numerics)
    if checked["sign"].enabled:  # the key (from the environment) now, not after every other stage ran
        from coreml_pipeline import signing

        try:
            signing.check_signer(signing.signer_from_config(checked["sign"].signer))
        except signing.SigningError as exc:
            raise ConfigError(f"config error: sign.signer={checked['sign'].signer}: {exc}") from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(MARKER_TEXT, encoding="utf-8")
    print(f"{args.params}: every section is valid")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
