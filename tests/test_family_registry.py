"""Model families as registered modules (coreml_pipeline/families/__init__.py): each family's
options live beside it and are checked by family, and adding a family is one module plus
one config, which validation and every stage then find."""

from __future__ import annotations

import csv
import json
import math
import shutil
import sys

import pytest
import yaml
from conftest import run
from tiny_families import REDUCED, ROOT

from coreml_pipeline import families
from coreml_pipeline.config.compose import compose_text
from coreml_pipeline.config.schema import ConfigError
from coreml_pipeline.tools.inprocess import run_stages
from coreml_pipeline.validation import validate

STAGES = ["inspect", "validate", "prune", "finetune", "calibrate", "palettize", "quantize", "convert", "baseline",
          "coreml_compress", "evaluate", "sign"]


def test_each_family_is_the_module_of_its_name_with_its_own_options():
    assert families.names() == ["causal_lm", "custom", "image_classifier", "sd_unet", "sentence_embedding"]
    for name in families.names():
        family = families.family_class(name)
        assert family.__module__ == f"coreml_pipeline.families.{name}"
        assert family.config().family == name  # its options default to itself
    assert not hasattr(families.family_class("sentence_embedding").config(), "image_size")


def test_a_key_of_another_family_is_unknown_and_lists_the_familys_keys():
    with pytest.raises(ConfigError, match=r"^config error: model\.image_size is not a known key; allowed keys: "
                                          r"family, source, device, max_length, pooling, normalize$"):
        validate({"model": {"family": "sentence_embedding", "image_size": 224}}, ("model",))
    with pytest.raises(ConfigError, match=r"^config error: model\.family='speech' is not allowed; allowed: "
                                          r"causal_lm, custom, image_classifier, sd_unet, sentence_embedding$"):
        validate({"model": {"family": "speech"}}, ("model",))


TOY_FAMILY = '''"""toy_mlp: a family added as one module (tests/test_family_registry.py writes it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from coreml_pipeline.config.schema import ModelConfig, check_positive_int
from coreml_pipeline.families import register
from coreml_pipeline.families.base import Family, probe_loss


@dataclass
class ToyMLPConfig(ModelConfig):
    family: str = "toy_mlp"
    source: Optional[str] = None
    width: int = 32

    def check(self, prefix: str = "model") -> None:
        super().check(prefix)
        check_positive_int(f"{prefix}.width", self.width)

    def check_source(self, prefix: str) -> None:
        """None to check: the network is built here."""


class Wrapped(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.model = module

    def forward(self, x):
        return self.model(x)


@register
class ToyMLP(Family):
    name = "toy_mlp"
    config = ToyMLPConfig
    data_formats = ("stsb",)

    def load_float(self):
        torch.manual_seed(0)
        width = self.cfg.width
        return torch.nn.Sequential(torch.nn.Linear(16, width), torch.nn.ReLU(), torch.nn.Linear(width, width)).eval()

    def weights_location(self):
        return "toy_mlp:seeded"

    def wrap(self, module):
        return Wrapped(module)

    def example_inputs(self, seq_len):
        return {"x": torch.zeros(1, 16)}

    def _sample(self, seed):
        return {"x": torch.randn(1, 16, generator=torch.Generator().manual_seed(seed)), "probe_seed": torch.tensor(seed)}

    def calibration_samples(self, num_samples, seed):
        return [self._sample(1000 * (seed + 1) + index) for index in range(num_samples)]

    def eval_samples(self):
        return [self._sample(index) for index in range(4)]

    def loss(self, module, sample):
        return probe_loss(self.call(self.wrap(module), sample), int(sample["probe_seed"]))
'''

TOY_CONFIG = """# A toy family (tests/test_family_registry.py).
family: toy_mlp
width: 32
device: auto
"""


def test_a_new_family_is_one_module_and_one_config(tmp_path, monkeypatch):
    package = tmp_path / "package"
    package.mkdir()
    (package / "toy_mlp.py").write_text(TOY_FAMILY, encoding="utf-8")
    conf = tmp_path / "conf"
    shutil.copytree(ROOT / "conf", conf)
    (conf / "model" / "toy_mlp.yaml").write_text(TOY_CONFIG, encoding="utf-8")
    # The module sits in a scratch folder searched as part of the families package, as if it were
    # coreml_pipeline/families/toy_mlp.py; nothing else is registered by hand.
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(package)])
    monkeypatch.setattr(families, "_REGISTRY", dict(families._REGISTRY))
    try:
        assert "toy_mlp" in families.names()
        params = tmp_path / "work" / "params.yaml"
        params.parent.mkdir()
        overrides = ["model=toy_mlp", f"data.dir={ROOT / 'data/stsb'}", "data.eval_max_pairs=4", *REDUCED]
        params.write_text(compose_text(overrides, conf), encoding="utf-8")
        checked = validate(yaml.safe_load(params.read_text()))
        assert type(checked["model"]).__name__ == "ToyMLPConfig" and checked["model"].width == 32
        with pytest.raises(ConfigError, match=r"^config error: model\.width=0 is not allowed; allowed: a positive"):
            validate(yaml.safe_load(compose_text([*overrides, "model.width=0"], conf)), ("model",))
        with pytest.raises(ConfigError, match=r"finetune\.method='qat' is not allowed; allowed with "
                                              r"model\.family=toy_mlp: none"):
            validate(yaml.safe_load(compose_text([*overrides, "finetune=qat", "palettize=none", "quantize=int8"],
                                                 conf)))

        monkeypatch.chdir(params.parent)
        assert run_stages(params) == STAGES
        work = params.parent
        readback = json.loads((work / "artifacts/convert/readback.json").read_text())
        metrics = json.loads((work / "metrics/evaluate.json").read_text())
        assert readback["max_abs_diff"] <= readback["tolerance"]
        assert readback["constexpr_ops"].get("constexpr_lut_to_dense", 0) > 0
        layers = list(csv.DictReader((work / "metrics/layers.csv").open()))
        assert {row["layer"] for row in layers} == {"0", "2"}
        assert all(row["technique"] == "palettization" and row["bits"] == "2" for row in layers)
        assert metrics["quality"] == metrics["psnr_db"] and math.isfinite(metrics["psnr_db"])
    finally:
        sys.modules.pop("coreml_pipeline.families.toy_mlp", None)


def test_an_override_hydra_cannot_apply_is_one_line(tmp_path):
    """A key the family's config file lacks needs Hydra's +key=...; without it Hydra refuses, in one line."""
    with pytest.raises(ConfigError, match=r"^config error: overrides 'model.image_size=224' do not compose: Could "
                                          r"not override 'model.image_size'. To append to your config use "
                                          r"\+model.image_size=224$"):
        compose_text(["model.image_size=224"])
    out = run([sys.executable, "-m", "coreml_pipeline.tools.params", "--params", str(tmp_path / "p.yaml"), "model=nope"],
              ROOT, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "config error: overrides 'model=nope' do not compose: In 'config': Could not find 'model/nope' Available "
        "options in 'model': causal_lm custom efficientnet_lite0 image_classifier minilm sd_unet sdxl smollm2"]
