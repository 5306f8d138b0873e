"""params.yaml: read it, validate it, and regenerate it from conf/.

``python -m coreml_pipeline.config.compose`` rewrites params.yaml from the Hydra composition of
conf/ (plus optional overrides), through the same DVC function that
``dvc exp run`` uses, so the committed file is byte-identical to what DVC
writes. ``--check`` only compares and exits 1 when they differ.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from coreml_pipeline.config.schema import ConfigError, validate

__all__ = ["compose_text", "load", "read_params", "validate"]

# The project root: this library is installed editable (pip install -e .) from the project it runs.
ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
PARAMS = ROOT / "params.yaml"


def compose_text(overrides: list[str] | None = None, config_dir: Path = CONF_DIR) -> str:
    """The params.yaml text that `dvc exp run` would write for these overrides."""
    from dvc.utils.hydra import compose_and_dump

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        compose_and_dump(out, str(config_dir.resolve()), None, "config", "", overrides or [])
        return out.read_text(encoding="utf-8")


def read_params(path: str | Path = PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config error: {path} does not exist; run `python -m coreml_pipeline.config.compose` to create it")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def load(sections: tuple[str, ...], path: str | Path = PARAMS) -> dict[str, Any]:
    """Validate the whole file, then return the sections a stage reads.

    Everything is validated (not just the stage's own sections) so that a bad
    value anywhere stops the first stage that runs, before any model loads.
    """
    checked = validate(read_params(path))
    return {name: checked[name] for name in sections}


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
            print(f"{target} differs from conf/: run `python -m coreml_pipeline.config.compose`", file=sys.stderr)
            raise SystemExit(1)
        print(f"{target} matches conf/")
        return
    target.write_text(text, encoding="utf-8")
    print(f"wrote {target}")


if __name__ == "__main__":
    from coreml_pipeline.runtime import run_cli

    raise SystemExit(run_cli(main))
