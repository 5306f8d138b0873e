"""Write params.yaml from the Hydra composition of conf/ (plus optional overrides), through the
same DVC function that ``dvc exp run`` uses, so the committed file is byte-identical to what DVC
writes; every rule is checked first (coreml_pipeline/validation.py). ``--check`` only compares and
exits 1 when they differ.

    python -m coreml_pipeline.tools.params [overrides...] [--check]   (or: coreml-params)
"""

from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

import yaml

from coreml_pipeline.config.compose import PARAMS, compose_text
from coreml_pipeline.validation import validate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. palettize.n_bits=6 prune=magnitude")
    parser.add_argument("--check", action="store_true", help="exit 1 when params.yaml differs from conf/")
    parser.add_argument("--params", default=str(PARAMS))
    args = parser.parse_args(argv)

    text = compose_text(args.overrides)
    validate(yaml.safe_load(text))
    target = Path(args.params)
    current = target.read_text(encoding="utf-8") if target.is_file() else ""
    if args.check:
        if current != text:
            sys.stdout.writelines(difflib.unified_diff(
                current.splitlines(True), text.splitlines(True), str(target), "conf/ composed"))
            print(f"{target} differs from conf/: run `python -m coreml_pipeline.tools.params`", file=sys.stderr)
            raise SystemExit(1)
        print(f"{target} matches conf/")
        return
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}")


if __name__ == "__main__":
    from coreml_pipeline.runtime import run_cli

    raise SystemExit(run_cli(main))
