"""A whole params.yaml checked, before any work: every section's shared options
(config/schema.py), then each chosen compression method's own rules and the
joint compressions it refuses (the method classes registered in
techniques/registry.py). The validate stage, sweeps and the mixed-bit tool run
this; a technique stage checks its own method again (registry.method) before
it loads weights, so running one stage by hand is refused the same way."""

from __future__ import annotations

from typing import Any

from coreml_pipeline.config import schema
from coreml_pipeline.techniques import registry

# Importing the method modules registers every method (light: no torch, no coremltools).
from coreml_pipeline.techniques.methods import finetune, palettize, prune, quantize  # noqa: F401,E402


def validate(params: dict, sections: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The named sections (all when None) as dataclasses, every rule passed; one ConfigError line otherwise."""
    checked = schema.validate(params, sections)
    registry.check(checked)
    return checked


def check_combination(sections: dict[str, Any]) -> None:
    """Every rule across the given sections (built dataclasses), the methods' included."""
    schema.check_combination(sections)
    registry.check(sections)
