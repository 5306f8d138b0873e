"""Compression methods as registered classes (coreml_pipeline/techniques/registry.py): adding one is
one class, which validation, the schema's allowed values and the stage's dispatch all find."""

from __future__ import annotations

import pytest
import torch

from coreml_pipeline.config.schema import ConfigError, PalettizeConfig, PruneConfig, fail
from coreml_pipeline.techniques import palettize, registry
from coreml_pipeline.techniques.methods.palettize import PalettizeMethod
from coreml_pipeline.validation import validate


def test_every_section_lists_its_methods_in_order():
    assert registry.names("prune") == ("none", "magnitude", "sparse_gpt")
    assert registry.names("palettize") == ("none", "kmeans", "sensitive_kmeans", "uniform")
    assert registry.names("quantize") == ("none", "linear", "gptq")
    assert registry.names("finetune") == ("none", "dkm", "qat", "gradual_prune")
    with pytest.raises(ConfigError, match=r"^config error: prune\.method='pruney' is not allowed; "
                                          r"allowed: none, magnitude, sparse_gpt$"):
        registry.method("prune", PruneConfig(method="pruney"))


def test_a_new_method_is_one_class(monkeypatch):
    monkeypatch.setitem(registry._METHODS, "palettize", dict(registry._METHODS["palettize"]))

    @registry.register
    class SignOnly(PalettizeMethod):
        """A toy: every weight becomes its sign (a 1-bit table), to show what a method consists of."""

        name = "sign"

        def check(self, cfg, prefix):
            if cfg.n_bits != 1:
                fail(f"{prefix}.n_bits", cfg.n_bits, "allowed with method=sign: 1")

        def apply(self, model, cfg, **inputs):
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.copy_(parameter.sign())
            return model

    section = {"method": "sign", "n_bits": 1, "granularity": "per_tensor", "group_size": None}
    assert validate({"palettize": section}, ("palettize",))["palettize"].method == "sign"
    with pytest.raises(ConfigError, match=r"palettize\.n_bits=2 is not allowed; allowed with method=sign: 1"):
        validate({"palettize": {**section, "n_bits": 2}}, ("palettize",))
    layer = torch.nn.Linear(3, 2)
    palettize.palettize(layer, PalettizeConfig(method="sign", n_bits=1, granularity="per_tensor", group_size=None))
    assert set(layer.weight.detach().abs().flatten().tolist()) <= {0.0, 1.0}
