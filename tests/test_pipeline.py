"""End to end: `dvc repro` of every stage on a reduced config in a temporary
copy of the project, with the real coremltools conversion."""

from __future__ import annotations

import json
import re

import yaml

from conftest import make_project_copy, run
from stages.convert import load_program

STAGES = ("validate", "prune", "finetune", "calibrate", "palettize", "quantize", "convert", "baseline",
          "coreml_compress", "evaluate")


def stages_run(output: str) -> set[str]:
    """Stages whose command really executed (each logs `stage=<name> start`)."""
    ran = set(re.findall(r"stage=(\w+) start", output))
    if "Running stage 'validate'" in output:
        ran.add("validate")
    return ran


def set_param(project, key: str, value) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    *parents, last = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def test_dvc_repro_end_to_end_then_downstream_only_rerun_then_bad_config(project):
    first = run(["dvc", "repro"], project)
    assert stages_run(first.stdout + first.stderr) == set(STAGES)
    assert "pruned zeros kept: " in first.stderr and "(100.0%)" in first.stderr

    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    assert metrics["num_pairs"] == 48
    assert metrics["readback_max_abs_diff"] <= 2 ** -24
    assert 0 < metrics["package_bytes"] < metrics["float16_package_bytes"]
    assert 0.0 < metrics["size_ratio"] < 0.5  # 2-bit weights and embeddings
    assert -1.0 <= metrics["mean_cosine"] <= 1.0 and metrics["min_cosine"] <= metrics["mean_cosine"]
    assert metrics["float_sts_spearman"] > 50
    assert "proven equal" in metrics["evaluated"]
    layers = (project / "metrics/layers.csv").read_text().splitlines()
    assert layers[0] == "layer,shape,technique,package_ops,bits,lut_groups,sparsity,weight_error,params"
    assert len(layers) == 1 + 3 + 6 * 6  # three embedding tables, six Linear layers per block
    assert any(line.startswith("embeddings.word_embeddings,30522x384,palettization,constexpr_lut_to_dense,2,")
               for line in layers)
    assert any(line.startswith("encoder.layer.5.output.dense,384x1536,pruning+palettization,"
                               "constexpr_lut_to_sparse+constexpr_sparse_to_dense,2,12,0.4") for line in layers)
    # 40% of the 10.6 M Linear weights; the 11.9 M embedding weights stay dense
    assert 0.17 < metrics["sparsity"] < 0.21

    program = load_program(project / "artifacts/convert/model.mlpackage")
    op_types = {op.op_type for op in program.functions["main"].operations}
    assert {"constexpr_lut_to_dense", "constexpr_lut_to_sparse", "constexpr_sparse_to_dense"} <= op_types
    readback = json.loads((project / "artifacts/convert/readback.json").read_text())
    assert readback["constexpr_ops"] == {"constexpr_lut_to_dense": 3, "constexpr_lut_to_sparse": 36,
                                         "constexpr_sparse_to_dense": 36}

    status = run(["dvc", "status", "--json"], project)
    assert json.loads(status.stdout) == {}

    # A downstream-only change: prune, finetune, calibrate, the baseline and the (off) Core ML side are skipped.
    set_param(project, "palettize.group_size", 64)
    second = run(["dvc", "repro"], project)
    assert stages_run(second.stdout + second.stderr) == {"validate", "palettize", "quantize", "convert", "evaluate"}
    layers = (project / "metrics/layers.csv").read_text()
    assert "encoder.layer.0.intermediate.dense,1536x384,pruning+palettization" in layers

    # A bad value stops `dvc repro` at validate, and every output stays in place.
    before = {p: p.read_bytes() for p in (project / "artifacts").rglob("*.safetensors")}
    set_param(project, "palettize.n_bits", 5)
    bad = run(["dvc", "repro"], project, check=False)
    assert bad.returncode != 0
    assert "config error: palettize.n_bits=5 is not allowed; allowed: 1, 2, 3, 4, 6, 8" in bad.stdout + bad.stderr
    assert stages_run(bad.stdout + bad.stderr) == {"validate"}
    assert {p: p.read_bytes() for p in (project / "artifacts").rglob("*.safetensors")} == before
    assert (project / "artifacts/convert/model.mlpackage").is_dir()


def test_sweep_override_through_dvc_experiments_composes_params(project):
    """`dvc exp run -S` composes conf/ (Hydra) into params.yaml; a bad value stops at validate."""
    # Only the validate stage: enough to compose and check, nothing heavy runs.
    run(["dvc", "exp", "run", "-S", "palettize.group_size=32", "-S", "prune=magnitude", "validate"], project)
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["prune"]["method"] == "magnitude" and params["prune"]["target_sparsity"] == 0.4
    assert params["palettize"]["group_size"] == 32
    bad = run(["dvc", "exp", "run", "-S", "palettize.n_bits=5"], project, check=False)
    assert bad.returncode != 0
    assert "config error: palettize.n_bits=5 is not allowed" in bad.stdout + bad.stderr
    assert stages_run(bad.stdout + bad.stderr) == {"validate"}


def test_training_time_quantization_and_the_core_ml_side_end_to_end(tmp_path):
    """QAT (finetune) -> int4 per-block quantize -> convert, and the same recipe on the Core ML side."""
    project = make_project_copy(tmp_path / "project", [
        "model.max_length=32", "convert.seq_len=32", "data.eval_max_pairs=48", "calibrate.num_samples=2",
        "finetune=qat", "finetune.steps=3", "finetune.batch_size=4", "finetune.log_every=1",
        "palettize=none", "quantize=int4_block", "coreml=compare"])
    first = run(["dvc", "repro"], project)
    output = first.stdout + first.stderr
    assert stages_run(output) == set(STAGES)
    assert "finetune qat step 3/3 loss" in output

    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    assert metrics["readback_max_abs_diff"] <= 2 ** -24
    assert 0.2 < metrics["size_ratio"] < 0.4  # 4-bit weights plus one float16 scale per 32
    layers = (project / "metrics/layers.csv").read_text()
    assert "encoder.layer.3.attention.self.query,384x384,quantization,constexpr_blockwise_shift_scale,4," in layers
    assert "embeddings.word_embeddings,30522x384,quantization,constexpr_blockwise_shift_scale,4," in layers

    coreml = json.loads((project / "metrics/coreml.json").read_text())
    assert coreml["enabled"] and coreml["steps"] == ["quantize"] and coreml["num_pairs"] == 48
    assert coreml["weights_decoded"] >= 36 + 1 and 0.2 < coreml["size_ratio"] < 0.4
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], project).stdout)
    files = next(iter(shown.values()))["data"]
    assert {"metrics/evaluate.json", "metrics/coreml.json"} <= set(files)
