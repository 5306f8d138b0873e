"""Counts a split can cap (calibrate.num_samples, prune/quantize.num_samples, data.eval_max_pairs):
never a silent clamp. The stage says in one warning line how many it used, and logs or records that number."""

from __future__ import annotations

import logging

import yaml
from test_compression import token_batches

from coreml_pipeline.config import compose
from coreml_pipeline.config.schema import PruneConfig
from coreml_pipeline.model import BERT_BLOCKS
from coreml_pipeline.techniques import layerwise
from coreml_pipeline.techniques.prune import sparse_gpt_options


def test_calibrate_says_how_many_samples_the_split_held(tmp_path, caplog):
    """calibrate.num_samples=5 over a dev split of 3 pairs: one warning naming the key, the value and the
    number used; the sensitivities come from those 3."""
    from safetensors.torch import load_file

    from coreml_pipeline.families.sentence_embedding import load_bert
    from coreml_pipeline.model import save_weights
    from stages import calibrate

    data = tmp_path / "stsb"
    data.mkdir()
    rows = (compose.ROOT / "data/stsb/sts-dev.csv").read_text(encoding="utf-8").splitlines()
    (data / "sts-dev.csv").write_text("\n".join(rows[:3]) + "\n", encoding="utf-8")
    for name in ("sts-test.csv", "sts-train.csv"):
        (data / name).write_text(rows[3] + "\n", encoding="utf-8")
    params = yaml.safe_load(compose.compose_text(["calibrate.num_samples=5", "model.max_length=16"]))
    params["data"]["dir"] = str(data)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    config = compose.load(("model",), tmp_path / "params.yaml")
    save_weights(load_bert(config["model"]), tmp_path / "weights.safetensors")

    caplog.set_level(logging.INFO, logger="pipeline")
    calibrate.main(["--params", str(tmp_path / "params.yaml"), "--weights", str(tmp_path / "weights.safetensors"),
                    "--out", str(tmp_path / "sensitivity.safetensors")])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["calibrate.num_samples=5: the calibration split (data.calibration_file=sts-dev.csv) "
                        "holds only 3; using 3"]
    assert any(r.getMessage().startswith("sensitivity from 3 samples") for r in caplog.records)
    assert load_file(str(tmp_path / "sensitivity.safetensors"))


def test_layerwise_compression_says_how_many_samples_the_split_held(tiny_bert, caplog):
    class ThreeSamples:  # a family whose calibration split holds three sequences
        block_stack = True

        def layerwise_samples(self, num_samples):
            return token_batches(3)[:num_samples]

        def layerwise_blocks(self, model):
            return BERT_BLOCKS

    caplog.set_level(logging.INFO, logger="pipeline")
    options = sparse_gpt_options(PruneConfig(method="sparse_gpt", target_sparsity=0.4))
    layerwise.compress(tiny_bert(), "sparse_gpt", options, 8, "cpu", ThreeSamples())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["prune.num_samples=8: the calibration split holds only 3; using 3"]
    caplog.clear()
    layerwise.compress(tiny_bert(), "sparse_gpt", options, 2, "cpu", ThreeSamples())
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]  # enough data: nothing to say


def test_the_counts_used_are_what_the_package_records(tmp_path):
    """registry.samples_used (the package's provenance entry and the metrics' samples_used): the number
    each active technique used, capped by the split; techniques that take no data add nothing."""
    from coreml_pipeline import families
    from coreml_pipeline.techniques import registry
    from coreml_pipeline.techniques.methods import finetune, palettize, prune, quantize  # noqa: F401

    sections = ("model", "data", "prune", "finetune", "calibrate", "palettize", "quantize")
    path = tmp_path / "params.yaml"
    path.write_text(compose.compose_text(["calibrate.num_samples=100000", "prune=sparse_gpt", "prune.num_samples=3"]))
    params = compose.load(sections, path)
    dev_pairs = len((compose.ROOT / "data/stsb/sts-dev.csv").read_text(encoding="utf-8").splitlines())
    counts = registry.samples_used(params, families.get(params["model"], params["data"]))
    assert counts == {"calibrate.num_samples": dev_pairs, "prune.num_samples": 3}
    path.write_text(compose.compose_text(["palettize=kmeans"]))
    params = compose.load(sections, path)
    assert registry.samples_used(params, families.get(params["model"], params["data"])) == {}
