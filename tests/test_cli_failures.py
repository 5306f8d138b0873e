"""Every user-facing command walked with bad input (issue 20.5): wrong arguments, the artifacts of a
run that never happened, names that do not exist. Each failure is one line naming what is wrong and
what to do, a non-zero exit, no traceback, and nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_project_copy, project_env

from coreml_pipeline.config import compose

ROOT = compose.ROOT


def command(args: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=project_env(cwd), capture_output=True,
                          text=True, timeout=600)


def last_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    return (result.stderr.strip() or result.stdout.strip()).splitlines()[-1]


# Each stage run by hand before `dvc repro` made its inputs: the missing input is named before any
# model loads, with the command that makes it.
STAGE_INPUTS = {
    "calibrate": ["--weights"],
    "palettize": ["--weights", "--sensitivity"],
    "finetune": ["--weights"],
    "quantize": ["--weights"],
    "convert": ["--weights"],
    "evaluate": ["--weights", "--package", "--readback", "--float-embeddings", "--float-report"],
    "coreml_compress": ["--float-package", "--float-embeddings", "--float-report"],
    "validate": ["--layers"],
}
STAGE_OUTPUTS = {
    "calibrate": ["--out"], "palettize": ["--out"], "finetune": ["--out"], "quantize": ["--out"],
    "convert": ["--out", "--report"], "validate": ["--out"], "coreml_compress": ["--out", "--metrics"],
    "evaluate": ["--metrics", "--layers", "--similarities", "--tradeoff"],
}


@pytest.mark.parametrize("stage", sorted(STAGE_INPUTS))
def test_a_stage_run_before_its_inputs_exist_names_the_missing_input(stage, tmp_path):
    args = ["stages." + stage]
    for flag in STAGE_INPUTS[stage]:
        args += [flag, str(tmp_path / "missing" / flag.strip("-"))]
    for flag in STAGE_OUTPUTS[stage]:
        args += [flag, str(tmp_path / "out" / flag.strip("-"))]
    result = command(args)
    assert result.returncode == 2
    first = STAGE_INPUTS[stage][0]
    assert last_line(result).endswith(f"argument {first}: {tmp_path / 'missing' / first.strip('-')} does not exist; "
                                      "`dvc repro` makes it (or pass the path of one that does)")
    assert not (tmp_path / "out").exists()


def test_report_names_an_experiment_that_does_not_exist():
    result = command(["coreml_pipeline.tools.report", "--out", "/nonexistent/reports", "--names", "no-such-exp"])
    assert result.returncode == 1
    line = last_line(result)
    assert line.startswith("report: --names no-such-exp: no such experiment with metrics; known: ")
    assert "main" in line


def test_bench_solvers_refuses_an_unknown_recipe():
    result = command(["bench.solvers", "no-such-recipe"])
    assert result.returncode == 2
    assert "error: unknown recipe no-such-recipe; allowed: kmeans-4bit-g16-linear, " in last_line(result)


def test_a_grid_sweep_with_one_bad_point_stops_before_any_experiment(tmp_path):
    """palettize.n_bits=4,9: the 9 is refused before the 4 runs (minutes), with the point named;
    no experiment, no sweep folder."""
    project = make_project_copy(tmp_path / "project", [])
    result = command(["coreml_pipeline.tools.sweep", "-m", "palettize.n_bits=4,9", "palettize.group_size=16"], project)
    assert result.returncode == 2, result.stdout + result.stderr
    assert last_line(result) == ("sweep: point 2 of 2 (palettize.n_bits=9 palettize.group_size=16): config error: "
                                 "palettize.n_bits=9 is not allowed; allowed: 1, 2, 3, 4, 6, 8; no experiment was run")
    assert not (project / "sweeps").exists()
    shown = subprocess.run(["dvc", "exp", "list", "--all-commits", "--name-only"], cwd=project, env=project_env(project),
                           capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == ""
