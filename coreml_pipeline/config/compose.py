"""params.yaml: read it, validate what every stage shares, and compose it from conf/ through
the same DVC function that ``dvc exp run`` uses (the command: coreml_pipeline/tools/params.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import yaml

from coreml_pipeline.config.schema import SECTIONS, ConfigError, validate

__all__ = ["compose_text", "load", "read_params"]

# The project root: this library is installed editable (pip install -e .) from the project it runs.
ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"
PARAMS = ROOT / "params.yaml"


def compose_text(overrides: list[str] | None = None, config_dir: Path = CONF_DIR) -> str:
    """The params.yaml text that `dvc exp run` would write for these overrides."""
    from dvc.utils.hydra import compose_and_dump
    from hydra.errors import HydraException

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "params.yaml"
        try:
            compose_and_dump(out, str(config_dir.resolve()), None, "config", "", overrides or [])
        except HydraException as exc:  # an override Hydra cannot apply: one line, not its traceback
            message = " ".join(str(exc).split("Config search path")[0].split())
            raise ConfigError(f"config error: overrides {' '.join(overrides or [])!r} do not compose: {message}") from None
        return out.read_text(encoding="utf-8")


def read_params(path: str | Path = PARAMS) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config error: {path} does not exist; run `python -m coreml_pipeline.tools.params` to create it")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def load(sections: tuple[str, ...], path: str | Path = PARAMS, whole: bool = True) -> dict[str, Any]:
    """Validate the whole file, then return the sections a stage reads.

    Every section's shared options are validated (not just the stage's own) so that a bad
    value anywhere stops the first stage that runs, before any model loads. A compression
    method's own rules are checked by the validate stage (coreml_pipeline/validation.py) and
    again by the stage that applies it; checking them here would make every stage's code
    depend on every technique.

    ``whole=False`` validates every section but the model's (unless the stage reads it): for a
    stage that may do nothing (sign, coreml_compress when disabled). The model section's check
    imports its family's module, and torch with it (about 1.2 s of a 1.3 s stage); the validate
    stage, upstream of both, has checked it.
    """
    params = read_params(path)
    if whole:
        checked = validate(params)
    else:
        checked = validate(params, tuple(name for name in SECTIONS if name != "model" or name in sections))
    return {name: checked[name] for name in sections}
