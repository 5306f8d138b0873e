"""The sweep app (Hydra multirun over DVC experiments) and the report: the
parts that need no experiment run. The end-to-end sweep through DVC, every
launcher and the Optuna sweeper runs in tests/test_pipeline.py."""

from __future__ import annotations

import json

import pytest
from conftest import ROOT
from hydra import compose, initialize_config_dir

from coreml_pipeline.config.schema import SECTIONS, ConfigError
from coreml_pipeline.tools import report, sweep
from coreml_pipeline.validation import validate


def metrics(mb: float, sts: float, cosine: float, meets: bool) -> dict:
    return {"package_bytes": int(mb * 1e6), "size_ratio": mb / 45.0, "sts_spearman": sts, "mean_cosine": cosine,
            "meets_target": meets, "float_sts_spearman": 82.03, "float16_package_bytes": 45_000_000}


def test_sweep_config_composes_the_pipeline_config_plus_the_app_settings():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sweep", overrides=["palettize=kmeans", "palettize.n_bits=6", "sweep.objective=package_mb"])
        plain = compose("config", overrides=["palettize=kmeans", "palettize.n_bits=6"])
    assert cfg.sweep.objective == "package_mb"
    assert {k: cfg[k] for k in SECTIONS} == {k: plain[k] for k in SECTIONS}
    sections = validate({k: dict(cfg[k]) for k in SECTIONS})
    assert sections["palettize"].method == "kmeans" and sections["palettize"].n_bits == 6


def test_only_pipeline_overrides_reach_dvc_and_names_are_stable():
    overrides = ["palettize.n_bits=4", "sweep.timeout=60", "prune=magnitude", "+sweep.extra=1"]
    assert sweep.pipeline_overrides(overrides) == ["palettize.n_bits=4", "prune=magnitude"]
    name = sweep.experiment_name("sweep", ["a=1", "b=2"])
    assert name == sweep.experiment_name("sweep", ["b=2", "a=1"]) and name.startswith("sweep-")
    assert name != sweep.experiment_name("sweep", ["a=1", "b=3"])


def test_objectives_rank_failures_last_and_reject_unknown_names():
    small_miss, large_meet = metrics(5, 70, 0.8, False), metrics(11, 82, 0.97, True)
    assert sweep.objective("size_meeting_target", large_meet) == pytest.approx(11.0)
    assert sweep.objective("size_meeting_target", small_miss) > sweep.objective("size_meeting_target", large_meet)
    assert sweep.objective("size_meeting_target", None) > sweep.objective("size_meeting_target", small_miss)
    assert sweep.objective("sts_spearman", None) < sweep.objective("sts_spearman", small_miss)
    assert sweep.objective("size_and_spearman", large_meet) == [pytest.approx(11.0), 82]
    collapsed = {**small_miss, "mean_cosine": float("nan"), "sts_spearman": float("nan")}
    assert sweep.objective("mean_cosine", collapsed) == -sweep.PENALTY
    assert sweep.objective("size_and_spearman", collapsed) == [sweep.PENALTY, -sweep.PENALTY]
    with pytest.raises(ConfigError, match="sweep.objective='size' is not allowed; allowed: size_meeting_target"):
        sweep.objective("size", large_meet)


def test_invalid_job_is_recorded_and_ranked_last_without_running(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep.experiments, "run_experiment", lambda *a, **k: pytest.fail("must not run"))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("sweep", overrides=["palettize.n_bits=5"])
    result = sweep.run_job(cfg, ["palettize.n_bits=5"], tmp_path / "0")
    assert result["error"] == "config error: palettize.n_bits=5 is not allowed; allowed: 1, 2, 3, 4, 6, 8"
    assert result["objective"] == sweep.PENALTY
    assert json.loads((tmp_path / "0" / "result.json").read_text())["error"] == result["error"]


def test_summary_names_the_smallest_package_meeting_the_target(tmp_path, capsys):
    rows = [{"name": "sweep-a", "overrides": ["palettize.n_bits=2"], "metrics": metrics(6, 76, 0.48, False),
             "stages_run": ["palettize"], "seconds": 10},
            {"name": "sweep-b", "overrides": ["palettize.n_bits=4"], "metrics": metrics(11.6, 82.3, 0.972, True),
             "stages_run": [], "seconds": 5},
            {"name": "sweep-c", "overrides": ["palettize.n_bits=6"], "metrics": metrics(17, 82.1, 0.99, True),
             "stages_run": ["palettize"], "seconds": 9},
            {"name": "sweep-d", "overrides": ["palettize.n_bits=5"], "error": "config error: palettize.n_bits=5"}]
    for i, row in enumerate(rows):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "result.json").write_text(json.dumps(row))
    from omegaconf import OmegaConf
    sweep.SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    printed = capsys.readouterr().out
    assert "Smallest package meeting the target: sweep-b (palettize.n_bits=4): 11.60 MB" in printed
    assert "dvc exp apply sweep-b" in printed
    summary = (tmp_path / "summary.md").read_text()
    assert summary.count("\n| sweep-") == 4 and "failed: config error" in summary


def test_pareto_front_and_labels():
    points = [(5, 70), (11, 82), (12, 81), (17, 82), (20, 83)]
    assert report.pareto_front(points) == [True, True, False, False, True]
    reference = {"palettize.n_bits": 4, "palettize.group_size": 4, "data.eval_max_pairs": None}
    params = {"palettize.n_bits": 2, "palettize.group_size": 4, "data.eval_max_pairs": 48,
              "coreml.palettize.n_bits": 2}
    assert report.recipe_label(params, reference) == "palettize.n_bits=2"
    assert report.recipe_label(reference, reference) == "(the commit's config)"


def test_report_writes_a_table_and_a_chart(tmp_path, monkeypatch):
    reference = {"palettize.n_bits": 4}
    rows = [{"name": "abc1234", "rev": "r0", "kind": "baseline", "params": reference,
             "metrics": metrics(11.6, 82.3, 0.972, True)},
            {"name": "sweep-a", "rev": "r1", "kind": "experiment", "params": {"palettize.n_bits": 2},
             "metrics": metrics(6, 76.7, 0.48, False)},
            {"name": "sweep-c", "rev": "r2", "kind": "experiment", "params": {"palettize.n_bits": 6},
             "metrics": metrics(17, 82.1, 0.99, True)},
            {"name": "sweep-x", "rev": "r3", "kind": "experiment", "params": {"palettize.n_bits": 3},
             "metrics": metrics(18, 80.0, 0.90, False)},
            {"name": "sweep-same", "rev": "r4", "kind": "experiment", "params": reference,
             "metrics": metrics(11.6, 82.3, 0.972, True)}]  # the commit's own config again: listed once
    monkeypatch.setattr(report.experiments, "experiments", lambda cwd=None, all_commits=False: rows)
    report.report(tmp_path)
    table = (tmp_path / "experiments.md").read_text().splitlines()
    assert [line.split(" | ")[:2] for line in table[2:]] == [["| 1", "sweep-a"], ["| 2", "abc1234"],
                                                              ["| 3", "sweep-c"], ["| 4", "sweep-x"]]
    assert table[2].endswith("| no | * | * |") and table[-1].endswith("| no |  |  |")
    assert "palettize.n_bits=2" in table[2]
    png = (tmp_path / "pareto.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


def test_dvc_output_reaches_the_progress_callback_line_by_line(caplog):
    from coreml_pipeline.tools import experiments

    seen = []
    result = experiments.dvc("--version", on_line=seen.append)
    assert seen and seen[0] == result.stdout.splitlines()[0] and seen[0][0].isdigit()
    caplog.set_level("INFO", logger="pipeline.sweep")
    show = sweep.progress("sweep-x")
    show("12:00:00 pipeline.palettize stage=palettize start")
    show("some unrelated line")
    assert [r.getMessage() for r in caplog.records] == ["[sweep-x] 12:00:00 pipeline.palettize stage=palettize start"]
    assert experiments.stages_run("a stage=palettize start\nRunning stage 'validate':") == ["palettize", "validate"]


def test_a_failed_experiment_is_summarised_by_its_exception_line():
    from coreml_pipeline.tools.sweep import headline

    output = ('  File "converter.py", line 1113, in _construct_palettization_op\n'
              "ValueError: Invalid parameter 'indices'; ... should be uint6, but got uint8.\n"
              "ERROR: failed to reproduce 'convert': failed to run: python -m stages.convert, exited with 1\n")
    assert headline(output) == "ValueError: Invalid parameter 'indices'; ... should be uint6, but got uint8."
    assert headline("config error: palettize.n_bits=5 is not allowed") == "config error: palettize.n_bits=5 is not allowed"
    assert headline("something else\n") == "something else"


def test_report_labels_a_mixed_bit_recipe_by_its_widths():
    from coreml_pipeline.tools.report import recipe_label

    reference = {"palettize.n_bits": 4, "palettize.group_size": 4, "palettize.layer_bits": None}
    mixed = {"palettize.n_bits": 4, "palettize.group_size": 16, "palettize.layer_bits.encoder.layer.0.output.dense": 6,
             "palettize.layer_bits.embeddings.word_embeddings": 2, "palettize.layer_bits.encoder.layer.1.output.dense": 6}
    assert recipe_label(mixed, reference) == ("palettize.group_size=16 "
                                              "palettize.layer_bits=(3 layers: 2-bit 1, 6-bit 2)")
    dtypes = {"quantize.layer_dtypes.lm_head": "int8", "quantize.layer_dtypes.model.layers.0.mlp.up_proj": "int4",
              "quantize.layer_dtypes.model.embed_tokens": "int8"}
    assert recipe_label(dtypes, {}) == "quantize.layer_dtypes=(3 layers: int4 1, int8 2)"


def test_other_families_are_ranked_and_charted_by_their_own_quality(tmp_path, monkeypatch):
    """A causal LM sweep: the objective and the report use next-token agreement (evaluate's
    "quality"); there is no cosine axis for it."""
    def lm(mb, agreement, meets):
        return {"package_bytes": int(mb * 1e6), "size_ratio": mb / 40, "quality": agreement,
                "next_token_agreement": agreement, "perplexity": 12.0, "meets_target": meets}

    assert sweep.objective("quality", lm(5, 0.93, True)) == pytest.approx(0.93)
    assert sweep.objective("size_and_quality", lm(5, 0.93, True)) == [pytest.approx(5.0), pytest.approx(0.93)]
    assert sweep.objective("quality", None) == -sweep.PENALTY
    rows = [{"name": f"lm-{i}", "rev": f"r{i}", "kind": "experiment",
             "params": {"model.family": "causal_lm", "palettize.n_bits": bits}, "metrics": lm(mb, agreement, agreement >= 0.9)}
            for i, (bits, mb, agreement) in enumerate([(4, 10, 0.95), (2, 5, 0.7), (3, 8, 0.6)])]
    rows.append({"name": "workspace", "rev": "workspace", "kind": "workspace",
                 "params": {"model.family": "causal_lm", "palettize.n_bits": 4}, "metrics": None})
    monkeypatch.setattr(report.experiments, "experiments", lambda cwd=None, all_commits=False: rows)
    report.report(tmp_path)
    table = (tmp_path / "experiments.md").read_text().splitlines()
    assert "next-token agreement with float" in table[0] and "cosine" not in table[0]
    assert [line.split(" | ")[1] for line in table[2:]] == ["lm-1", "lm-2", "lm-0"]
    assert table[2].endswith("| no | * |") and table[3].endswith("| no |  |") and table[4].endswith("| yes | * |")
    assert (tmp_path / "pareto.png").read_bytes().startswith(b"\x89PNG")


def test_the_report_takes_one_model_family_at_a_time(tmp_path, monkeypatch, capsys):
    """A sweep of the sentence embedder and one experiment of another family (`dvc exp run -S model=custom`):
    the report charts the workspace's family and names the one left out, `--family` picks the other,
    `--family all` writes one chart and table per family, and an unknown family is one line."""
    custom = {"package_bytes": 3_000_000, "size_ratio": 0.5, "quality": 41.0, "psnr_db": 41.0, "meets_target": True}
    rows = [{"name": "workspace", "rev": "workspace", "kind": "workspace", "params": {"palettize.n_bits": 4},
             "metrics": metrics(11.6, 82.3, 0.972, True)},
            {"name": "sweep-a", "rev": "r1", "kind": "experiment", "params": {"palettize.group_size": 8},
             "metrics": metrics(11.5, 82.2, 0.969, False)},
            {"name": "sweep-b", "rev": "r2", "kind": "experiment", "params": {"palettize.group_size": 32},
             "metrics": metrics(11.4, 82.1, 0.960, False)},
            {"name": "exp-custom", "rev": "r3", "kind": "experiment",
             "params": {"model.family": "custom", "palettize.n_bits": 4}, "metrics": custom}]
    monkeypatch.setattr(report.experiments, "experiments", lambda cwd=None, all_commits=False: rows)

    report.main(["--out", str(tmp_path / "default")])
    printed = capsys.readouterr().out
    table = (tmp_path / "default/experiments.md").read_text()
    assert "sweep-a" in table and "sweep-b" in table and "exp-custom" not in table and "STS-B" in table
    assert "left out 1 experiment(s) of other model families (custom): --family custom or --family all" in printed

    report.main(["--out", str(tmp_path / "custom"), "--family", "custom"])
    table = (tmp_path / "custom/experiments.md").read_text()
    assert "exp-custom" in table and "output PSNR (dB) against float" in table and "sweep-a" not in table
    assert "left out 2 experiment(s) of other model families (sentence_embedding)" in capsys.readouterr().out

    report.main(["--out", str(tmp_path / "all"), "--family", "all"])
    assert "left out" not in capsys.readouterr().out
    for family, name in (("sentence_embedding", "sweep-a"), ("custom", "exp-custom")):
        assert name in (tmp_path / "all" / family / "experiments.md").read_text()
        assert (tmp_path / "all" / family / "pareto.png").read_bytes().startswith(b"\x89PNG")

    with pytest.raises(SystemExit) as stop:
        report.main(["--out", str(tmp_path / "none"), "--family", "causal_lm"])
    assert str(stop.value) == ("report: no experiment of model family 'causal_lm'; experiments by family: custom (1), "
                               "sentence_embedding (2); choose one with --family NAME, or --family all")
