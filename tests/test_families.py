"""Model families (coreml_pipeline/families/): STRUCTURE TESTS ONLY.

Each family runs every stage of dvc.yaml, conversion included, on a tiny randomly
initialised model (tests/tiny_families.py): a UNet shaped like SDXL's, Llama- and
GPT-2-style LMs, a ResNet, and a user-defined module. Random weights say nothing
about compression quality; these tests check the plumbing (loading, tracing,
calibration, compression metadata, conversion, read-back, scoring) and the errors
for bad model configs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml
from conftest import make_project_copy, run
from tiny_families import REDUCED, ROOT, compose, family_overrides, tiny_sd_pipeline

from coreml_pipeline.tools.inprocess import run_stages

ALL_STAGES = ["inspect", "validate", "prune", "finetune", "calibrate", "palettize", "quantize", "convert", "baseline",
              "coreml_compress", "evaluate", "sign"]

# (family, extra overrides): together they cover pruning, palettization (both k-means solvers),
# GPTQ, the Core ML side, Conv1D layers and a tied LM head.
CASES = {
    # The SDXL recipe of the talk (conf/recipe/sdxl.yaml: SparseGPT 40% with calibration samples, then
    # sensitive 4-bit palettization, group 16) on the tiny UNet.
    "sd_unet-sdxl_recipe": ("sd_unet", ["+recipe=sdxl", "prune.num_samples=4", "palettize.n_bits=4",
                                        "palettize.group_size=16"]),
    "causal_lm-llama-gptq": ("causal_lm", ["palettize=none", "quantize=gptq", "quantize.dtype=uint4",
                                           "quantize.granularity=per_block", "quantize.block_size=16",
                                           "quantize.num_samples=4"]),
    "causal_lm-gpt2-sparse_gpt-palettize": ("gpt2", ["prune=sparse_gpt", "prune.num_samples=4"]),
    "image_classifier-exact_dp": ("image_classifier", ["palettize.kmeans_solver=exact_dp"]),
    # Real weights: EfficientNet-Lite0 from its package (conv, depthwise conv, linear head) on real photographs.
    "efficientnet_lite0-real-sparse_gpt": ("efficientnet_lite0", ["prune=sparse_gpt", "prune.num_samples=2"]),
    # Real weights: SmolLM2-135M from its GGUF package (tied embedding untied, 30 Llama blocks), data-free int8.
    "smollm2-real-int8": ("smollm2", ["palettize=none", "quantize=int8"]),
    "custom-gptq-coreml_side": ("custom", ["palettize=none", "quantize=gptq", "quantize.dtype=uint8",
                                           "quantize.granularity=per_channel", "~quantize.block_size",
                                           "quantize.num_samples=4", "coreml=compare"]),
}


def run_family(case: str, tmp_path: Path, monkeypatch) -> dict:
    family, extra = CASES[case]
    params = tmp_path / "params.yaml"
    compose(family_overrides(family, tmp_path) + REDUCED + extra, params)
    monkeypatch.chdir(tmp_path)
    assert run_stages(params) == ALL_STAGES
    return {name: json.loads((tmp_path / path).read_text()) for name, path in (
        ("metrics", "metrics/evaluate.json"), ("readback", "artifacts/convert/readback.json"),
        ("baseline", "artifacts/baseline/report.json"), ("coreml", "metrics/coreml.json"))}


@pytest.mark.parametrize("case", list(CASES))
def test_structure_every_stage_through_conversion(case, tmp_path, monkeypatch):
    out = run_family(case, tmp_path, monkeypatch)
    metrics, readback = out["metrics"], out["readback"]
    # Every compressed weight is in the package, exactly as torch has it (float16 grid).
    assert readback["max_abs_diff"] <= readback["tolerance"]
    assert readback["weights"], "no weight read back"
    layers = list(csv.DictReader((tmp_path / "metrics/layers.csv").open()))
    assert len(layers) > 2
    compressed_ops = {"constexpr_lut_to_dense", "constexpr_blockwise_shift_scale", "constexpr_sparse_to_dense"}
    assert compressed_ops & set(readback["constexpr_ops"])
    for row in layers:
        assert row["technique"] != "none", f"a layer stayed uncompressed: {row}"
    assert metrics["package_bytes"] == readback["package_bytes"] > 0
    assert metrics["size_ratio"] == round(readback["package_bytes"] / out["baseline"]["package_bytes"], 4)
    assert isinstance(metrics["meets_target"], bool) and math.isfinite(metrics["quality"])
    family = CASES[case][0]
    if family in ("sd_unet", "custom"):
        assert metrics["quality"] == metrics["psnr_db"] >= metrics["min_psnr_db"] > 0
        assert 0 < metrics["mean_cosine"] <= 1
    if family in ("causal_lm", "gpt2"):
        assert metrics["perplexity"] > 0 and metrics["float_perplexity"] == round(out["baseline"]["perplexity"], 4)
        assert 0 <= metrics["next_token_agreement"] <= 1 and metrics["tokens_per_window"] == 16
    if family == "image_classifier":
        # The image folders are named after the tiny model's classes, so accuracy is computed.
        assert 0 <= metrics["top1_agreement"] <= 1 and 0 <= metrics["accuracy"] <= 1
        assert metrics["float_accuracy"] == round(out["baseline"]["accuracy"], 6) and metrics["num_images"] == 9
    if family == "efficientnet_lite0":
        assert metrics["num_images"] == 4 and metrics["samples_used"] == {"calibrate.num_samples": 4,
                                                                           "prune.num_samples": 2}
        assert 0 <= metrics["top1_agreement"] <= metrics["top5_agreement"] <= 1 and metrics["kl_divergence"] >= 0
        assert "not computed" in metrics["accuracy"]  # the photographs carry no labels
        kinds = {r["layer"].rsplit(".", 1)[-1]: r["technique"] for r in layers}
        assert kinds["_conv_stem"] == kinds["_project_conv"] == kinds["_fc"] == "pruning+palettization"
        # coremltools' SparseGPT cannot update a grouped convolution: the depthwise ones are palettized only
        assert kinds["_depthwise_conv"] == "palettization"
    if family == "smollm2":
        assert metrics["tokens_per_window"] == 16 and metrics["num_windows"] == 2 and metrics["num_generations"] == 1
        assert 1 < metrics["float_perplexity"] < metrics["perplexity"] * 1.5 and 0.5 < metrics["next_token_agreement"]
        assert 0 <= metrics["generations_identical"] <= metrics["generation_agreement"] <= 1
        kinds = {r["layer"]: r["technique"] for r in layers}
        assert kinds["lm_head"] == kinds["model.embed_tokens"] == kinds["model.layers.29.mlp.down_proj"] == "quantization"
        # Provenance hashes the GGUF file itself, not the converted folder it was loaded from.
        from coreml_pipeline.coreml import provenance

        record = provenance.read(provenance.open_package(tmp_path / "artifacts/convert/model.mlpackage"))
        assert list(json.loads(record["source_model_sha256"])) == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    if case.startswith("sd_unet"):
        # SparseGPT at 40% of every conv and linear weight (the norms and biases stay dense).
        assert 0.37 < metrics["sparsity"] < 0.41
        assert readback["constexpr_ops"].get("constexpr_lut_to_sparse", 0) > 0
        assert out["baseline"]["text_embeddings"].startswith("seeded Gaussian")
        assert all(r["technique"].endswith("palettization") and r["bits"] == "4" for r in layers)
    if case in ("causal_lm-llama-gptq", "custom-gptq-coreml_side"):
        assert readback["constexpr_ops"].get("constexpr_blockwise_shift_scale", 0) > 0
        assert all(r["technique"] == "quantization" for r in layers)
    if case == "custom-gptq-coreml_side":
        # The same recipe on the Core ML side: GPTQ runs as data-free linear quantization, every weight decoded.
        assert out["coreml"]["enabled"] and out["coreml"]["steps"] == ["quantize"]
        assert "quantize.method=gptq runs as data-free linear" in out["coreml"]["data_free_substitutes"]
        # every parameter found in the package (weights, biases, norms) is decoded into the float module
        assert out["coreml"]["weights_decoded"] >= len(layers) and math.isfinite(out["coreml"]["psnr_db"])
    if case.startswith("causal_lm-gpt2"):
        rows = [r for r in layers if r["layer"].endswith(".attn.c_attn")]  # transformers Conv1D, now nn.Linear
        assert rows and all(r["technique"] == "pruning+palettization" for r in rows)
        assert any(r["layer"] == "lm_head" for r in layers)  # the tied head, compressed on its own


def test_sd_pipeline_text_encoder_embeds_the_prompts(tmp_path):
    """A pipeline folder as model.source: the UNet comes from its unet/ folder and each
    calibration prompt is embedded by the pipeline's own text encoder (encode_prompt)."""
    import torch
    from transformers import AutoTokenizer, CLIPTextModel

    from coreml_pipeline.config.schema import DataConfig
    from coreml_pipeline.families.sd_unet import SDUNet, SDUNetConfig

    source = tiny_sd_pipeline(tmp_path / "pipeline")
    family = SDUNet(SDUNetConfig(source=str(source)),
                    DataConfig(format="prompts", dir=str(ROOT / "data/prompts"), calibration_file="calibration.txt",
                               eval_file="eval.txt", train_file="calibration.txt"))
    samples = family.calibration_samples(2, seed=0)
    prompts = (ROOT / "data/prompts/calibration.txt").read_text().splitlines()[:2]
    tokenizer = AutoTokenizer.from_pretrained(source / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(source / "text_encoder").eval()
    for sample, prompt in zip(samples, prompts):
        ids = tokenizer(prompt, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = encoder(ids).last_hidden_state
        torch.testing.assert_close(sample["encoder_hidden_states"], expected)
    assert not torch.equal(samples[0]["encoder_hidden_states"], samples[1]["encoder_hidden_states"])
    assert family.text_source() == "pipeline text encoder"
    assert family.load_float().config.cross_attention_dim == 32  # the unet/ folder of the pipeline


def test_family_config_selects_its_data(tmp_path):
    """A model family config picks its data format through the Hydra defaults list; a
    command-line data= still wins."""
    assert compose(["model=causal_lm"], tmp_path / "a.yaml")["data"]["format"] == "text"
    assert compose(["model=sdxl"], tmp_path / "b.yaml")["data"]["format"] == "prompts"
    assert compose(["model=image_classifier"], tmp_path / "c.yaml")["data"]["format"] == "imagefolder"
    assert compose(["model=custom", "data=text"], tmp_path / "d.yaml")["data"]["format"] == "text"
    assert compose([], tmp_path / "e.yaml")["model"]["family"] == "sentence_embedding"


def _params(tmp_path, overrides):
    return compose(overrides, tmp_path / "params.yaml")


def test_missing_model_path_names_the_key(tmp_path):
    from coreml_pipeline.config.schema import ConfigError
    from coreml_pipeline.validation import validate

    params = _params(tmp_path, ["model=causal_lm", f"model.source={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match=r"model\.source=.*nope.*must exist"):
        validate(params)


@pytest.mark.parametrize("override, message", [
    ("model.module._target_=tiny_families.NoSuchNet", r"model\.module\._target_=.*has no attribute NoSuchNet"),
    ("model.module._target_=no_such_package.Net", r"model\.module\._target_=.*cannot be imported"),
])
def test_bad_custom_import_path_names_the_key(tmp_path, override, message):
    from coreml_pipeline.config.schema import ConfigError
    from coreml_pipeline.validation import validate

    with pytest.raises(ConfigError, match=message):
        validate(_params(tmp_path, ["model=custom", override]))


@pytest.mark.parametrize("target, message", [
    ("tiny_families.UntraceableNet", r"model\.module=.*forward cannot be traced"),
    ("tiny_families.RecurrentNet", r"model\.module=.*lstm\.weight_ih_l0 \(LSTM\).*allowed: weights of Linear"),
])
def test_bad_custom_module_fails_in_the_first_stage(tmp_path, monkeypatch, target, message):
    """Before any compression work: the prune stage (the first to load the model) refuses it,
    and exits 2 with one line naming model.module."""
    from coreml_pipeline.config.schema import ConfigError
    from coreml_pipeline.runtime import run_cli
    from stages import prune

    params = tmp_path / "params.yaml"
    compose(["model=custom", f"data.dir={ROOT / 'data/stsb'}", f"model.module._target_={target}", "~model.module.channels",
             "model.example_inputs._target_=tiny_families.vector_inputs", "~model.example_inputs.size"], params)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=message):
        prune.main(["--params", str(params), "--out", "artifacts/prune/weights.safetensors"])
    assert run_cli(prune.main, ["--params", str(params), "--out", "x.safetensors"]) == 2
    assert not (tmp_path / "artifacts/prune/weights.safetensors").exists()


def test_family_data_mismatch_names_the_key(tmp_path):
    from coreml_pipeline.config.schema import ConfigError
    from coreml_pipeline.validation import validate

    (tmp_path / "lm").mkdir()
    (tmp_path / "lm" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"data\.format='stsb' is not allowed; allowed with model\.family=causal_lm: text"):
        validate(_params(tmp_path, ["model=causal_lm", f"model.source={tmp_path / 'lm'}", "data=stsb"]))


@pytest.mark.parametrize("overrides, message", [
    (["model=custom", "finetune=qat", "palettize=none", "quantize=int8"],
     r"finetune\.method='qat' is not allowed; allowed with model\.family=custom: none"),
])
def test_family_refusals_name_the_key(tmp_path, overrides, message):
    from coreml_pipeline.config.schema import ConfigError
    from coreml_pipeline.validation import validate

    with pytest.raises(ConfigError, match=message):
        validate(_params(tmp_path, overrides))


def test_device_defaults_to_what_is_available(tmp_path):
    import torch

    from coreml_pipeline.config.schema import ConfigError
    from coreml_pipeline.families.base import torch_device
    from coreml_pipeline.validation import validate

    model = validate(_params(tmp_path, []))["model"]
    assert model.device == "auto"
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert torch_device(model).type == expected
    if not torch.cuda.is_available():
        model.device = "cuda"
        with pytest.raises(ConfigError, match=r"model\.device='cuda' is not allowed; torch sees no cuda"):
            torch_device(model)


def test_custom_family_through_dvc_repro(tmp_path):
    """The DVC wiring for a non-default family: `dvc repro` runs every stage, a second
    one runs nothing, and the package's provenance names the module."""
    project = make_project_copy(tmp_path / "project", ["model=custom", "data.eval_max_pairs=4", *REDUCED])
    run(["dvc", "repro"], project)
    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    assert math.isfinite(metrics["psnr_db"]) and metrics["package_bytes"] > 0
    # Bytecode beside the coreml_pipeline/families directory dependency (an interpreter without
    # PYTHONDONTWRITEBYTECODE writes it) changes nothing: .dvcignore leaves it out.
    (project / "coreml_pipeline/families/__pycache__").mkdir(exist_ok=True)
    (project / "coreml_pipeline/families/__pycache__/base.cpython-311.pyc").write_bytes(b"\0")
    assert "stage=" not in run(["dvc", "repro"], project).stderr
    audit = run([__import__("sys").executable, "-m", "coreml_pipeline.tools.audit", "artifacts/convert/model.mlpackage", "--json"],
                project, check=False)
    assert "module:examples.tiny_models.ConvEncoder" in audit.stdout + audit.stderr


def test_mixed_bit_generator_refusals_name_the_flag(tmp_path, monkeypatch):
    """Goals a family cannot measure get one line naming the flag, before any model loads."""
    from coreml_pipeline.config import compose as config
    from coreml_pipeline.config.schema import ConfigError
    from coreml_pipeline.tools import mixed_bit

    params = tmp_path / "params.yaml"
    compose(family_overrides("efficientnet_lite0", tmp_path), params)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "CONF_DIR", tmp_path / "conf")
    for goal, message in ((["--technique", "quantize", "--meet-target"], r"palettize\.method='sensitive_kmeans'; allowed "
                           r"with --technique quantize: none"),
                          (["--technique", "quantize", "--bits", "4", "8", "--meet-target"],
                           r"--bits is not allowed with --technique quantize; allowed: --dtypes"),
                          (["--min-cosine", "0.97"], r"--min-cosine is not allowed with model\.family='image_classifier'"
                           r" .*allowed: --meet-target, --min-quality or --size-mb"),
                          (["--min-quality", "95"], r"--min-quality=95\.0; allowed for model\.family='image_classifier':"
                           r" its top1_agreement in \[0\.0, 1\.0\]")):
        with pytest.raises(ConfigError, match=message) as error:
            mixed_bit.main(["--params", str(params), "--name", "x", *goal])
        assert "\n" not in str(error.value)
    assert not (tmp_path / "conf").exists() and not (tmp_path / "artifacts").exists()


def test_mixed_bit_recipe_for_real_efficientnet_is_what_evaluate_measures(tmp_path, monkeypatch):
    """The generator on EfficientNet-Lite0's real weights and photographs (64 px): with the palettize stage's
    own tables as candidates, its measurement of the recipe it writes is what the pipeline's stages then
    measure on the same dev photographs; the package holds each layer at its width."""
    from coreml_pipeline.config import compose as config
    from coreml_pipeline.tools import mixed_bit

    params = tmp_path / "params.yaml"
    # calibrate.num_samples above the 6 dev photographs: none held out, so the generator measures on all 6.
    compose(family_overrides("efficientnet_lite0", tmp_path) + ["calibrate.num_samples=8", "palettize.group_size=16",
                                                                 "palettize.num_kmeans_workers=1"], params)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "CONF_DIR", tmp_path / "conf")
    assert run_stages(params, only=("prune", "finetune", "calibrate")) == ["prune", "finetune", "calibrate"]
    mixed_bit.main(["--params", str(params), "--name", "mixed_test", "--min-quality", "0.5", "--bits", "4", "6",
                    "--samples", "3"])
    recipe = yaml.safe_load((tmp_path / "conf/palettize/mixed_test.yaml").read_text())
    report = json.loads((tmp_path / "reports/mixed_bit/mixed_test.json").read_text())
    assert report["candidates"] == "palettize stage (exact_dp)" and report["dev_overlaps_calibration"]
    assert report["family"] == "image_classifier" and report["top1_agreement"] >= 0.5
    assert len(recipe["layer_bits"]) == 50 and set(recipe["layer_bits"].values()) <= {4, 6}
    # The recipe through the stages, evaluated on the dev split the generator measured on.
    composed = yaml.safe_load(params.read_text())
    composed["palettize"] = recipe
    composed["data"].update(eval_file=composed["data"]["calibration_file"], eval_max_pairs=None)
    params.write_text(yaml.safe_dump(composed, sort_keys=False))
    run_stages(params, only=("palettize", "quantize", "convert", "baseline", "evaluate"))
    metrics = json.loads((tmp_path / "metrics/evaluate.json").read_text())
    assert metrics["num_images"] == 6
    for key in ("top1_agreement", "top5_agreement", "kl_divergence"):
        assert metrics[key] == pytest.approx(report[key], abs=2e-6), key
    layers = {row["layer"]: row["bits"] for row in csv.DictReader((tmp_path / "metrics/layers.csv").open())}
    assert {name: int(layers[name]) for name in recipe["layer_bits"]} == recipe["layer_bits"]


def test_mixed_bit_generator_on_a_causal_lm(tmp_path, monkeypatch):
    """The generator scores a causal LM by the KL of its next-token distributions per layer and whole recipes by
    evaluate's own figures (next-token agreement, perplexity, greedy generation) on held-out dev windows."""
    from coreml_pipeline.config import compose as config
    from coreml_pipeline.tools import mixed_bit

    params = tmp_path / "params.yaml"
    compose(family_overrides("causal_lm", tmp_path) + REDUCED, params)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(config, "CONF_DIR", tmp_path / "conf")
    run_stages(params, only=("prune", "finetune", "calibrate"))
    mixed_bit.main(["--params", str(params), "--name", "mixed_lm", "--min-quality", "0.5", "--bits", "2", "8"])
    report = json.loads((tmp_path / "reports/mixed_bit/mixed_lm.json").read_text())
    assert not report["dev_overlaps_calibration"] and report["next_token_agreement"] >= 0.5
    assert {"perplexity", "generation_agreement", "quality"} <= set(report) and report["meets_target"] in (True, False)
    assert all(cost >= 0 for cost in report["cost"].values())
    recipe = yaml.safe_load((tmp_path / "conf/palettize/mixed_lm.yaml").read_text())
    assert set(recipe["layer_bits"].values()) <= {2, 8} and "lm_head" in recipe["layer_bits"]
    assert "held-out dev samples: 8 for the per-layer costs" in (tmp_path / "conf/palettize/mixed_lm.yaml").read_text()
    # --technique quantize: quantize.layer_dtypes from the quantize stage's own int4 and int8 outputs.
    quantize_params = tmp_path / "quantize.yaml"
    compose(family_overrides("causal_lm", tmp_path) + REDUCED + ["palettize=none", "quantize=int8"], quantize_params)
    mixed_bit.main(["--params", str(quantize_params), "--technique", "quantize", "--name", "mixed_q", "--min-quality",
                    "0.5", "quantize.granularity=per_block", "quantize.block_size=16"])
    report = json.loads((tmp_path / "reports/mixed_bit/mixed_q.json").read_text())
    assert report["technique"] == "quantize" and report["candidates"] == "quantize stage"
    assert report["next_token_agreement"] >= 0.5 and report["bits"] == ["int4", "int8"]
    recipe = yaml.safe_load((tmp_path / "conf/quantize/mixed_q.yaml").read_text())
    assert recipe["method"] == "linear" and recipe["granularity"] == "per_block" and recipe["block_size"] == 16
    assert set(recipe["layer_dtypes"].values()) <= {"int4", "int8"} and "model.embed_tokens" in recipe["layer_dtypes"]
