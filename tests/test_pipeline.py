"""End to end: `dvc repro` of every stage on a reduced config in a temporary
copy of the project, with the real coremltools conversion."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REDUCED_OVERRIDES, copy_of_reduced_run, make_project_copy, project_env, run

from coreml_pipeline.coreml import provenance
from coreml_pipeline.coreml.convert import load_program
from coreml_pipeline.tools import experiments, report
from coreml_pipeline.tools.audit import open_package

STAGES = ("inspect", "validate", "prune", "finetune", "calibrate", "palettize", "quantize", "convert", "baseline",
          "coreml_compress", "evaluate", "sign")


def stages_run(output: str) -> set[str]:
    return set(experiments.stages_run(output))


def set_param(project, key: str, value) -> None:
    path = project / "params.yaml"
    params = yaml.safe_load(path.read_text())
    *parents, last = key.split(".")
    node = params
    for part in parents:
        node = node[part]
    node[last] = value
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def reproduced(reduced_run, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The reduced project after one cold `dvc repro`: its run-cache holds every stage."""
    return copy_of_reduced_run(reduced_run, tmp_path_factory.mktemp("reproduced") / "project"), reduced_run[1]


def test_mixed_bit_recipe_from_the_cached_sensitivity(reproduced, tmp_path):
    """The generator on the real model's cached weights and sensitivity (structure:
    two widths, one table per tensor, a few held-out pairs): a palettize config
    every layer is named in."""
    project, _ = reproduced
    out = run([sys.executable, "-m", "coreml_pipeline.tools.mixed_bit", "--size-mb", "8", "--bits", "2", "4", "--pairs", "4",
               "--check-pairs", "8", "--name", "mixed_test", "palettize.granularity=per_tensor",
               "palettize.group_size=null"], project)
    assert "Run it: dvc exp run -S palettize=mixed_test" in out.stdout
    recipe = yaml.safe_load((project / "conf/palettize/mixed_test.yaml").read_text())
    assert len(recipe["layer_bits"]) == 3 + 6 * 6 and set(recipe["layer_bits"].values()) == {2, 4}
    report = json.loads((project / "reports/mixed_bit/mixed_test.json").read_text())
    assert report["estimated_package_mb"] <= 8 and 2 < report["mean_bits"] < 4 and 0 < report["cosine"] <= 1
    composed = tmp_path / "params.yaml"
    upstream = [o for o in REDUCED_OVERRIDES if not o.startswith("palettize.")]
    run([sys.executable, "-m", "coreml_pipeline.tools.params", "--params", str(composed), *upstream, "palettize=mixed_test"], project)
    assert yaml.safe_load(composed.read_text())["palettize"]["layer_bits"] == recipe["layer_bits"]
    assert json.loads(run(["dvc", "status", "--json"], project).stdout) == {}


def test_dvc_repro_end_to_end_then_downstream_only_rerun_then_bad_config(reproduced):
    project, first = reproduced
    assert stages_run(first.stdout + first.stderr) == set(STAGES)
    assert "pruned zeros kept: " in first.stderr and "(100.0%)" in first.stderr
    assert "surviving weights that took the zero entry" in first.stderr

    metrics = json.loads((project / "metrics/evaluate.json").read_text())
    assert metrics["num_pairs"] == 48
    # the calibration counts as used, in the metrics and in the package's provenance
    assert metrics["samples_used"] == {"calibrate.num_samples": 4, "prune.num_samples": 8}
    package_record = provenance.read(open_package(project / "artifacts/convert/model.mlpackage"))
    assert package_record["samples_used"] == metrics["samples_used"]
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
    assert any(line.startswith("encoder.layer.4.output.dense,384x1536,pruning+palettization,"
                               "constexpr_lut_to_sparse+constexpr_sparse_to_dense,2,12,0.4") for line in layers)
    # palettize.layer_bits: this one layer has an 8-entry table; readback proves the package holds its weights
    assert any(line.startswith("encoder.layer.5.output.dense,384x1536,pruning+palettization,"
                               "constexpr_lut_to_sparse+constexpr_sparse_to_dense,3,12,0.4") for line in layers)
    # 40% of the 10.6 M Linear weights and the survivors nearer zero than to any entry of exact_dp's sparse
    # tables (zero is one of them: 2-bit tables, about 45% in all); the 11.9 M embedding weights stay dense
    assert 0.18 < metrics["sparsity"] < 0.25

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
    # sign (off) reruns on the new package: it only writes status.json
    assert stages_run(second.stdout + second.stderr) == {"validate", "palettize", "quantize", "convert", "evaluate",
                                                         "sign"}
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

    # A group size that fits no layer: validate knows from the inspect stage's layer table, before prune runs.
    set_param(project, "palettize.n_bits", 2)
    set_param(project, "palettize.group_size", 7)
    bad = run(["dvc", "repro"], project, check=False)
    assert "config error: palettize.group_size=7 is not allowed; divides no channel count of" in bad.stdout + bad.stderr
    assert stages_run(bad.stdout + bad.stderr) == {"validate"}
    assert {p: p.read_bytes() for p in (project / "artifacts").rglob("*.safetensors")} == before


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


def sweep_results(sweep_dir: Path) -> dict[str, dict]:
    """result.json of every job of a Hydra multirun, by palettize.group_size."""
    results = {}
    for path in sweep_dir.glob("*/result.json"):
        result = json.loads(path.read_text())
        size = next(o.split("=")[1] for o in result["overrides"] if o.startswith("palettize.group_size="))
        results[size] = result
    return results


def test_sweeps_through_dvc_experiments_reuse_upstream_stages(reproduced):
    """Hydra multirun (joblib, submitit, Optuna) and `dvc exp run --queue`: every
    point is a DVC experiment; what an earlier run made is restored, not recomputed."""
    project, _ = reproduced  # its run-cache holds the reduced recipe with palettize.group_size=32
    base = [o for o in REDUCED_OVERRIDES if not o.startswith("palettize.group_size=")]
    downstream = ["evaluate", "palettize", "quantize", "convert", "validate", "sign"]

    # Two jobs at once through joblib; group 16 is new, so only the stages after calibrate run.
    grid = project / "sweeps/grid"
    out = run([sys.executable, "-m", "coreml_pipeline.tools.sweep", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
               f"hydra.sweep.dir={grid}", *base, "palettize.group_size=16,32"], project)
    results = sweep_results(grid)
    assert sorted(results["16"]["stages_run"]) == sorted(downstream)
    assert results["32"]["stages_run"] == []  # every stage restored from the run-cache
    assert results["16"]["metrics"]["num_pairs"] == 48 and results["16"]["objective"] > 0
    assert (grid / "summary.md").read_text().count("\n| sweep-") == 2
    assert "No experiment met the quality target." in out.stdout  # 2-bit on 48 pairs: far from it

    # submitit's local executor: one job in its own process, restored.
    submitit = project / "sweeps/submitit"
    run([sys.executable, "-m", "coreml_pipeline.tools.sweep", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=20",
         f"hydra.sweep.dir={submitit}", "sweep.name_prefix=submitit", *base, "palettize.group_size=32"], project)
    assert sweep_results(submitit)["32"]["stages_run"] == []

    # The Optuna sweeper with the search config, narrowed to what is cached.
    search = project / "sweeps/search"
    out = run([sys.executable, "-m", "coreml_pipeline.tools.sweep", "-cn", "search", "hydra.sweeper.n_trials=2",
               "hydra.sweeper.params=null", f"hydra.sweep.dir={search}", *base, "palettize=sensitive_kmeans",
               "palettize.group_size=choice(16,32)"], project)
    assert all(r["stages_run"] == [] for r in sweep_results(search).values())
    assert "best_value" in (search / "optimization_results.yaml").read_text()

    # DVC's own queue: one experiment per combination, two workers.
    run(["dvc", "exp", "run", "--queue", *[f"-S{o}" for o in base], "-S", "palettize.group_size=16,32"], project)
    # The workers run detached; with their output on a pipe, waiting for `dvc queue start` would also wait
    # for them, and a worker that misses the shutdown (seen once: "shutting down due to empty queue", then
    # idle) would hold the test forever. So no pipe, and the workers are stopped below.
    subprocess.run(["dvc", "queue", "start", "-j", "2"], cwd=project, env=project_env(project), check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline:
        status = run(["dvc", "queue", "status"], project).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    subprocess.run(["dvc", "queue", "stop", "--kill"], cwd=project, env=project_env(project),
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert status.count("Success") == 2, status
    names = re.findall(r"^\S+\s+(\S+)\s.*Success", status, flags=re.M)  # Task, Name, Created, Status
    for name in names:
        assert stages_run(run(["dvc", "queue", "logs", name], project).stdout) == set(), name

    shown = {row["name"]: row for row in experiments.experiments(project)}
    assert {results["16"]["name"], results["32"]["name"], *names} <= set(shown)
    report.report(project / "reports", cwd=project)
    table = (project / "reports/experiments.md").read_text()
    assert "palettize.group_size=16" in table and (project / "reports/pareto.png").stat().st_size > 20_000

    # The summary's advice, `dvc exp apply <name>`, then the audit of the workspace's package: recorded by that
    # experiment, not committed yet (exit 6, not tampered), with or without --search.
    run(["dvc", "exp", "apply", results["16"]["name"]], project)
    package = "artifacts/convert/model.mlpackage"
    group_16 = {results["16"]["name"], names[0], names[1]}  # the queue ran group 16 too: the same package
    # The Optuna search may have made that same package too: the audit names any experiment that records it.
    from coreml_pipeline.tools.audit import dvc_dir_hash, experiment_records

    # (experiments of identical content share one commit, and so one name here)
    recording = {e["experiment"] for e in experiment_records(project, dvc_dir_hash(project / package))} | group_16
    for flags in ([], ["--search"]):
        audited = run([sys.executable, "-m", "coreml_pipeline.tools.audit", package, *flags], project, check=False)
        assert audited.returncode == 6, audited.stdout + audited.stderr
        named = re.search(r"^experiment   (\S+) \(", audited.stdout, flags=re.M)
        assert named and named.group(1) in recording and "not committed yet" in audited.stdout, audited.stdout
        assert "FAIL" not in audited.stdout, audited.stdout
    run(["git", "add", "dvc.lock", "params.yaml", "metrics"], project)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "ship group 16"], project)
    audited = run([sys.executable, "-m", "coreml_pipeline.tools.audit", package], project, check=False)
    assert audited.returncode == 0 and "verdict      identical" in audited.stdout, audited.stdout
