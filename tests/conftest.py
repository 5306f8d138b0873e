"""Shared fixtures: a tiny random BERT for fast unit tests, and a reduced copy
of the whole project for end-to-end `dvc repro` runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# Every stage on few samples and short sequences: the same code paths, minutes not hours.
REDUCED_OVERRIDES = [
    "model.max_length=32",
    "convert.seq_len=32",
    "data.eval_max_pairs=48",
    "calibrate.num_samples=4",
    "prune=sparse_gpt",  # joint sparse palettization through conversion
    "prune.num_samples=8",
    "palettize.n_bits=2",
    "palettize.group_size=32",
    # Mixed bits: one layer's look-up tables differ in size from the rest through conversion.
    "palettize.layer_bits={encoder.layer.5.output.dense:3}",
    "palettize.kmeans_solver=exact_dp",  # the optimal k-means through every stage (tests/test_exact_kmeans.py)
]

PROJECT_FILES = ["dvc.yaml", "stages", "conf", "data", "examples", ".dvc/config", ".dvcignore"]


def project_env(cwd: Path) -> dict[str, str]:
    """The environment a user of this venv has in ``cwd``: dvc and python on PATH."""
    return {**os.environ, "PYTHONPATH": str(cwd), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def run(cmd: list[str], cwd: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=project_env(cwd), capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def make_project_copy(dest: Path, overrides: list[str]) -> Path:
    """A git + DVC repository holding this project, with params.yaml composed
    from conf/ plus ``overrides``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, target)
    (dest / ".gitignore").write_text("/artifacts/\n*.partial.*\n")
    run([sys.executable, "-m", "stages.config", *overrides], dest)
    run(["git", "init", "-q"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A"], dest)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], dest)
    return dest


@pytest.fixture(scope="session")
def reduced_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One cold `dvc repro` of the reduced project, shared: the slowest step of
    the suite, so modules copy its result (``copy_of_reduced_run``) instead."""
    project = make_project_copy(tmp_path_factory.mktemp("reduced_run") / "project", REDUCED_OVERRIDES)
    return project, run(["dvc", "repro"], project)


def copy_of_reduced_run(reduced_run, dest: Path) -> Path:
    """A private copy (git history, DVC cache and run-cache, outputs) that a module may change."""
    shutil.copytree(reduced_run[0], dest, symlinks=True)
    return dest


@pytest.fixture
def project(tmp_path) -> Path:
    return make_project_copy(tmp_path / "project", REDUCED_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_bert():
    """A randomly initialised 2-layer BERT: structure tests only, no quality."""
    import torch
    from transformers import BertConfig, BertModel

    def build():
        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=128, max_position_embeddings=64)
        return BertModel(cfg, add_pooling_layer=False).eval()

    return build
