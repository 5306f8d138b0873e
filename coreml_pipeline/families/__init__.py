"""Model families: what differs between a sentence embedder, a diffusion UNet, a
causal LM, an image classifier and a user's own module.

Each family says how to load the float network (the module whose state dict
every stage reads and writes), how to wrap it into the one-tensor function
that is traced and converted, which inputs calibrate and evaluate it, the loss
its sensitivities come from, and how its outputs are scored against the float
model. The stages do the rest the same way for every family.
"""

from __future__ import annotations

import importlib

from coreml_pipeline.config.schema import DataConfig, ModelConfig

_MODULES = {
    "sentence_embedding": ("coreml_pipeline.families.embedding", "SentenceEmbedding"),
    "sd_unet": ("coreml_pipeline.families.sd_unet", "SDUNet"),
    "causal_lm": ("coreml_pipeline.families.causal_lm", "CausalLM"),
    "image_classifier": ("coreml_pipeline.families.image_classifier", "ImageClassifier"),
    "custom": ("coreml_pipeline.families.custom", "Custom"),
}


def get(model: ModelConfig, data: DataConfig | None = None):
    """The family object of ``model.family`` (its heavy libraries are imported only when used)."""
    module_name, class_name = _MODULES[model.family]
    return getattr(importlib.import_module(module_name), class_name)(model, data)
