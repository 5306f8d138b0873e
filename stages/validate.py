"""Stage 0, validate: every section of params.yaml, before any model is loaded.

DVC runs this stage whenever any parameter changes, and every other stage
depends on its marker file. The marker's content never changes, so a valid
change does not by itself rerun anything downstream; an invalid one stops
`dvc repro` here, before DVC removes any other stage's outputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from coreml_pipeline import numerics, validation
from coreml_pipeline.config import compose as config
from coreml_pipeline.runtime import run_cli

MARKER_TEXT = "params.yaml passed validation\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--out", required=True, help="marker file, constant content")
    args = parser.parse_args(argv)
    checked = validation.validate(config.read_params(args.params))
    numerics.check_host(checked["runtime"].numerics)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(MARKER_TEXT, encoding="utf-8")
    print(f"{args.params}: every section is valid")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
