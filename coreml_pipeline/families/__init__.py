"""Model families: what differs between a sentence embedder, a diffusion UNet, a
causal LM, an image classifier and a user's own module.

Each family says how to load the float network (the module whose state dict
every stage reads and writes), how to wrap it into the one-tensor function
that is traced and converted, which inputs calibrate and evaluate it, the loss
its sensitivities come from, and how its outputs are scored against the float
model. The stages do the rest the same way for every family.

A family is one module of this package named after it (``sd_unet.py`` holds
``model.family=sd_unet``) with one ``Family`` subclass decorated by
``register``, whose ``config`` holds its model options and their checks; plus
one ``conf/model/<name>.yaml``. Nothing else lists the families: validation
imports the module ``model.family`` names, and lists every module of the
package only to say what is allowed.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from typing import Any

from coreml_pipeline.config.schema import DataConfig, ModelConfig, fail

_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: ``cls`` (a Family subclass) is the family ``cls.name``."""
    if not cls.name:
        raise TypeError(f"{cls.__qualname__} needs a name to be registered as a family")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> list[str]:
    """Every family of this package (each module imported, so each registers itself)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    return sorted(_REGISTRY)


def family_class(name: Any, section: str = "model") -> type:
    """The registered family ``name``, its module imported first; one config error line if there is none."""
    if name not in _REGISTRY and isinstance(name, str) and name.isidentifier():
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            importlib.import_module(f"{__name__}.{name}")
    if name not in _REGISTRY:
        fail(f"{section}.family", name, f"allowed: {', '.join(names())}")
    return _REGISTRY[name]


def get(model: ModelConfig, data: DataConfig | None = None):
    """The family object of ``model.family`` (its heavy libraries are imported only when used)."""
    return family_class(model.family)(model, data)


def check(sections: dict[str, Any]) -> None:
    """The chosen family's rules on the other sections (its data format, fine-tuning)."""
    model = sections.get("model")
    if model is not None:
        family_class(model.family).check_sections(sections)
