"""The compression methods, one class each, registered under their params.yaml section.

A method is a subclass of PruneMethod, PalettizeMethod, QuantizeMethod or
FinetuneMethod in techniques/methods/<section>.py, decorated with @register: its name (the value of `<section>.method`), the rules on its
section's options it governs (check), the joint compressions it refuses
(check_with), and what it does (apply). The section's dataclass in
config/schema.py checks only what every method shares (types, ranges). Adding
a method is one class: the schema, the validate stage and the stage that
applies it find it here.

Registration happens when a methods module is imported; this module imports
none of them, so a stage's code dependencies stay its own technique
(coreml_pipeline/validation.py imports all four to check a whole params.yaml).
"""

from __future__ import annotations

from typing import Any, ClassVar

from coreml_pipeline.config.schema import fail

SECTIONS = ("prune", "finetune", "palettize", "quantize")
_METHODS: dict[str, dict[str, type[Method]]] = {section: {} for section in SECTIONS}


class Method:
    """One value of ``<section>.method``."""

    section: ClassVar[str] = ""
    name: ClassVar[str] = ""

    def check(self, cfg: Any, prefix: str) -> None:
        """Rules on the section's own options that hold for this method (one line each, via fail)."""

    def check_with(self, sections: dict[str, Any]) -> None:
        """Rules across sections this method governs: joint compressions coremltools cannot build."""

    def apply(self, model, cfg: Any, **inputs):
        """Compress ``model`` in place and return it."""
        raise NotImplementedError

    def samples_used(self, sections: dict[str, Any], family) -> dict[str, int]:
        """The calibration counts this method consumed, as used: ``{"<section>.num_samples": n}``,
        n smaller than asked where the split holds fewer (recorded in the package's provenance)."""
        return {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` the method ``<cls.section>.method=<cls.name>``."""
    if cls.section not in _METHODS:
        raise ValueError(f"{cls.__name__}.section={cls.section!r}; allowed: {', '.join(SECTIONS)}")
    _METHODS[cls.section][cls.name] = cls
    return cls


def names(section: str) -> tuple[str, ...]:
    """The registered methods of ``section``, in registration order."""
    return tuple(_METHODS[section])


def get(section: str, name: str, prefix: str | None = None) -> Method:
    """The registered method ``name`` of ``section`` (no checks: for configs already validated)."""
    known = _METHODS[section]
    if not known:
        raise RuntimeError(f"no {section} method is registered: import coreml_pipeline.techniques.methods.{section} first")
    if name not in known:
        fail(f"{prefix or section}.method", name, f"allowed: {', '.join(known)}")
    return known[name]()


def method(section: str, cfg: Any, prefix: str | None = None) -> Method:
    """The method ``cfg.method`` names, its own checks passed; a ConfigError (one line) otherwise."""
    chosen = get(section, cfg.method, prefix)
    chosen.check(cfg, prefix or section)
    return chosen


def samples_used(sections: dict[str, Any], family) -> dict[str, int]:
    """Every count of calibration data that shaped the weights, as used, over the methods
    ``sections`` name (their methods modules imported)."""
    counts: dict[str, int] = {}
    for section in SECTIONS:
        if section in sections:
            counts.update(get(section, sections[section].method).samples_used(sections, family))
    return dict(sorted(counts.items()))


def pruning_source(sections: dict[str, Any]) -> str | None:
    """What prunes the weights before palettization or quantization ("prune.method=..." or
    "finetune.method=gradual_prune"), or None."""
    prune, finetune = sections.get("prune"), sections.get("finetune")
    if prune is not None and prune.method != "none":
        return f"prune.method={prune.method}"
    if finetune is not None and finetune.method == "gradual_prune":
        return "finetune.method=gradual_prune"
    return None


def check(sections: dict[str, Any]) -> None:
    """Every chosen method's checks, on the top-level sections and the copies finetune and coreml
    carry, then every top-level method's cross-section rules (finetune first: it names what
    the later sections must be)."""
    chosen = {}
    for section in SECTIONS:
        cfg = sections.get(section)
        if cfg is not None:
            chosen[section] = method(section, cfg)
    for owner in ("finetune", "coreml"):
        holder = sections.get(owner)
        for section in ("prune", "palettize", "quantize"):
            copy = getattr(holder, section, None) if holder is not None else None
            if copy is not None:
                method(section, copy, f"{owner}.{section}")
    for section in SECTIONS:
        if section in chosen:
            chosen[section].check_with(sections)
