"""params.yaml against conf/, and every kind of bad value failing early and clearly."""

from __future__ import annotations

import copy
import sys

import pytest
import yaml
from conftest import ROOT, run
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from coreml_pipeline.config import compose as config
from coreml_pipeline.config.schema import ConfigError
from coreml_pipeline.validation import validate


def test_params_yaml_is_the_composition_of_conf():
    # If this fails: run `python -m coreml_pipeline.tools.params` and commit params.yaml.
    assert config.PARAMS.read_text(encoding="utf-8") == config.compose_text()


@pytest.mark.parametrize("overrides", [
    [], ["prune=magnitude"], ["prune=sparse_gpt", "palettize=kmeans"],
    ["palettize.granularity=per_tensor", "palettize.group_size=null"], ["palettize.embeddings.enabled=false"],
    ["palettize=uniform"], ["palettize=none", "quantize=int8"], ["palettize=none", "quantize=int4_block"],
    ["palettize=none", "quantize=gptq"], ["prune=magnitude", "palettize=none", "quantize=int8"],
    ["palettize.lut_dtype=int8"], ["palettize=kmeans", "palettize.cluster_dim=2"], ["coreml=compare"],
    ["finetune=dkm", "palettize=kmeans"], ["finetune=qat", "palettize=none", "quantize=int8"],
    ["finetune=gradual_prune", "palettize=kmeans"], ["runtime=native"], ["sign=key"], ["sign=sigstore"],
    ["data=pairs"],
])
def test_every_config_group_composes_into_a_valid_config(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=overrides)
    sections = validate(OmegaConf.to_container(cfg, resolve=True))
    assert set(sections) == {"model", "data", "prune", "finetune", "calibrate", "palettize", "quantize", "coreml",
                             "convert", "evaluate", "runtime", "sign"}


BAD_VALUES = [
    ("runtime.numerics", "fast", "runtime.numerics='fast' is not allowed; allowed: portable, native"),
    ("runtime.threads", 0, "runtime.threads=0 is not allowed; allowed: a positive integer"),
    ("palettize.n_bits", 5, "palettize.n_bits=5 is not allowed; allowed: 1, 2, 3, 4, 6, 8"),
    ("palettize.n_bits", "four", "palettize.n_bits='four' has the wrong type"),
    ("palettize.embeddings.n_bits", 7, "palettize.embeddings.n_bits=7 is not allowed; allowed: 1, 2, 3, 4, 6, 8"),
    ("palettize.group_size", 0, "palettize.group_size=0 is not allowed; allowed: a positive integer"),
    ("palettize.group_size", -16, "palettize.group_size=-16 is not allowed; allowed: a positive integer"),
    ("palettize.group_size", 2.5, "palettize.group_size=2.5 has the wrong type"),
    ("palettize.granularity", "per_block", "palettize.granularity='per_block' is not allowed; allowed: per_tensor, per_grouped_channel"),
    ("palettize.method", "gptq", "palettize.method='gptq' is not allowed; allowed: none, kmeans, sensitive_kmeans, uniform"),
    ("palettize.cluster_dim", 0, "palettize.cluster_dim=0 is not allowed; allowed: a positive integer"),
    ("quantize.dtype", "int2", "quantize.dtype='int2' is not allowed; allowed: int8, uint8, int4, uint4"),
    ("quantize.granularity", "per_grouped_channel", "quantize.granularity='per_grouped_channel' is not allowed; allowed: per_tensor, per_channel, per_block"),
    ("quantize.scheme", "asymmetric", "quantize.scheme='asymmetric' is not allowed; allowed: symmetric, affine"),
    ("quantize.method", "awq", "quantize.method='awq' is not allowed; allowed: none, linear, gptq"),
    ("quantize.block_size", 32, "quantize.block_size=32 is not allowed; allowed: null unless granularity=per_block"),
    ("palettize.lut_dtype", "int4", "palettize.lut_dtype='int4' is not allowed"),
    ("prune.target_sparsity", 1.0, "prune.target_sparsity=1.0 is not allowed; allowed: a number in [0, 1)"),
    ("prune.target_sparsity", -0.1, "prune.target_sparsity=-0.1 is not allowed; allowed: a number in [0, 1)"),
    ("prune.method", "random", "prune.method='random' is not allowed; allowed: none, magnitude, sparse_gpt"),
    ("prune.n_m_ratio", [4, 2], "prune.n_m_ratio=[4, 2] is not allowed"),
    ("calibrate.num_samples", 0, "calibrate.num_samples=0 is not allowed; allowed: a positive integer"),
    ("calibrate.batch_size", 8, "calibrate.batch_size is not a known key; allowed keys: num_samples, seed"),
    ("data.dir", "data/missing", "data.dir='data/missing' is not allowed; allowed: an existing directory"),
    ("data.eval_file", "sts-nope.csv", "data.eval_file='sts-nope.csv' is not allowed; allowed: a file that exists"),
    ("model.source", "./no/such/model", "model.source='./no/such/model' is not allowed"),
    ("model.source", "package:not_a_real_package", "model.source='package:not_a_real_package' is not allowed"),
    ("model.max_length", 1024, "model.max_length=1024 is not allowed"),
    ("convert.minimum_deployment_target", "iOS15", "convert.minimum_deployment_target='iOS15' is not allowed; allowed: iOS18"),
]


def _with(params: dict, key: str, value) -> dict:
    changed = copy.deepcopy(params)
    *parents, last = key.split(".")
    node = changed
    for part in parents:
        node = node[part]
    node[last] = value
    return changed


@pytest.mark.parametrize("key,value,message", BAD_VALUES)
def test_bad_value_is_one_clear_line(key, value, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    params = yaml.safe_load(config.PARAMS.read_text())
    with pytest.raises(ConfigError) as caught:
        validate(_with(params, key, value))
    text = str(caught.value)
    assert message in text
    assert "\n" not in text


def test_magnitude_pruning_needs_a_sparsity():
    params = yaml.safe_load(config.PARAMS.read_text())
    params["prune"]["method"] = "magnitude"
    with pytest.raises(ConfigError, match=r"prune.target_sparsity=0.0 is not allowed; allowed: \(0, 1\) when method=magnitude"):
        validate(params)


@pytest.mark.parametrize("stage", ["inspect", "validate", "prune", "finetune", "calibrate", "palettize", "quantize", "convert",
                                   "baseline", "coreml_compress", "evaluate", "sign"])
def test_stage_cli_rejects_bad_config_before_touching_outputs(stage, tmp_path):
    params = yaml.safe_load(config.PARAMS.read_text())
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_with(params, "palettize.n_bits", 5)))
    out = tmp_path / "existing-output"
    out.write_text("cached result")
    # Every stage validates the file first (sign, coreml_compress, finetune and quantize: every section but the
    # model's, so that off they never import torch); the output arguments are never reached.
    inp = str(out)  # an input that exists: a missing one is refused first, by argparse
    args = {"inspect": ["--out", str(out)], "validate": ["--out", str(out)], "prune": ["--out", str(out)],
            "calibrate": ["--weights", inp, "--out", str(out)],
            "palettize": ["--weights", inp, "--sensitivity", inp, "--out", str(out)],
            "quantize": ["--weights", inp, "--out", str(out)],
            "finetune": ["--weights", inp, "--out", str(out)],
            "coreml_compress": ["--float-package", inp, "--float-embeddings", inp, "--float-report", inp,
                                "--out", str(out), "--metrics", str(out)],
            "convert": ["--weights", inp, "--out", str(out), "--report", str(out)],
            "baseline": ["--package", str(out), "--embeddings", str(out), "--report", str(out)],
            "evaluate": ["--weights", inp, "--package", inp, "--readback", inp, "--float-embeddings", inp,
                         "--float-report", inp, "--metrics", str(out), "--layers", str(out), "--similarities", str(out),
                         "--tradeoff", str(out)],
            "sign": ["--package", inp, "--metrics", inp, "--layers", inp, "--out", str(out)]}
    result = run([sys.executable, "-m", f"stages.{stage}", "--params", str(bad), *args[stage]], ROOT, check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == "config error: palettize.n_bits=5 is not allowed; allowed: 1, 2, 3, 4, 6, 8"
    assert out.read_text() == "cached result"


def test_config_cli_check_detects_drift(tmp_path):
    drifted = tmp_path / "params.yaml"
    drifted.write_text(config.PARAMS.read_text().replace("n_bits: 4", "n_bits: 6", 1))
    result = run([sys.executable, "-m", "coreml_pipeline.tools.params", "--check", "--params", str(drifted)], ROOT, check=False)
    assert result.returncode == 1
    assert "differs from conf/" in result.stderr
    run([sys.executable, "-m", "coreml_pipeline.tools.params", "--params", str(drifted)], ROOT)
    assert drifted.read_text() == config.PARAMS.read_text()


# Combinations coremltools cannot build: refused at validation, naming both keys.
BAD_COMBINATIONS = [
    ({"quantize.method": "linear"}, "quantize.method='linear' is not allowed; palettize.method=sensitive_kmeans already"),
    ({"palettize.method": "none", "quantize.method": "gptq", "quantize.dtype": "int4"},
     "quantize.dtype='int4' is not allowed; allowed with method=gptq: uint8, uint4"),
    ({"palettize.method": "none", "quantize.method": "gptq", "quantize.dtype": "uint8", "quantize.granularity": "per_tensor"},
     "quantize.granularity='per_tensor' is not allowed; allowed with method=gptq: per_channel, per_block"),
    ({"palettize.method": "none", "quantize.method": "linear", "quantize.granularity": "per_block"},
     "quantize.block_size=None is not allowed; allowed: a positive integer"),
    ({"prune.method": "magnitude", "prune.target_sparsity": 0.4, "palettize.method": "none", "quantize.method": "gptq",
      "quantize.dtype": "uint8"}, "quantize.method='gptq' is not allowed; with prune.method=magnitude: GPTQ"),
    ({"prune.method": "magnitude", "prune.target_sparsity": 0.4, "palettize.method": "uniform"},
     "palettize.method='uniform' is not allowed; with prune.method=magnitude"),
    ({"prune.method": "magnitude", "prune.target_sparsity": 0.4, "palettize.method": "kmeans", "palettize.cluster_dim": 2},
     "palettize.cluster_dim=2 is not allowed; allowed: 1 with prune.method=magnitude"),
    ({"prune.method": "sparse_gpt", "prune.target_sparsity": 0.4, "palettize.lut_dtype": "int8"},
     "palettize.lut_dtype='int8' is not allowed; allowed: null with prune.method=sparse_gpt"),
    ({"palettize.method": "kmeans", "palettize.cluster_dim": 2, "palettize.enable_per_channel_scale": True},
     "palettize.cluster_dim=2 is not allowed; allowed: 1 with enable_per_channel_scale"),
    ({"palettize.cluster_dim": 2}, "palettize.cluster_dim=2 is not allowed; allowed: 1 with method=sensitive_kmeans"),
    ({"palettize.method": "uniform", "palettize.lut_dtype": "int8"}, "palettize.method='uniform' is not allowed; uniform"),
    ({"finetune.method": "dkm"}, "finetune.method='dkm' is not allowed; needs palettize.method=kmeans"),
    ({"finetune.method": "qat"}, "finetune.method='qat' is not allowed; needs quantize.method=linear"),
    ({"finetune.method": "gradual_prune", "prune.method": "magnitude", "prune.target_sparsity": 0.3},
     "finetune.method='gradual_prune' is not allowed; prunes while training; set prune.method=none"),
    ({"finetune.method": "gradual_prune", "palettize.method": "uniform"},
     "palettize.method='uniform' is not allowed; with finetune.method=gradual_prune"),
    ({"finetune.steps": 0}, "finetune.steps=0 is not allowed; allowed: a positive integer"),
    ({"finetune.method": "dkm", "palettize.method": "kmeans", "finetune.palettize": None},
     "finetune.palettize='(differs)' is not allowed; finetune.method=dkm trains against the palettize section"),
    ({"finetune.learning_rate": 3.0}, "finetune.learning_rate=3.0 is not allowed; allowed: a number in (0, 1)"),
    ({"coreml.weight_threshold": -1}, "coreml.weight_threshold=-1 is not allowed"),
    ({"coreml.enabled": True}, "coreml.enabled=True is not allowed; needs coreml.prune, coreml.palettize"),
    ({"data.train_file": "nope.csv"}, "data.train_file='nope.csv' is not allowed; allowed: a file that exists"),
]


@pytest.mark.parametrize("changes,message", BAD_COMBINATIONS)
def test_unsupported_combination_fails_at_validation(changes, message, monkeypatch):
    monkeypatch.chdir(ROOT)
    params = yaml.safe_load(config.PARAMS.read_text())
    for key, value in changes.items():
        params = _with(params, key, value)
    with pytest.raises(ConfigError) as caught:
        validate(params)
    assert message in str(caught.value) and "\n" not in str(caught.value)
