"""Shared fixtures: a tiny random BERT for fast unit tests, and a reduced copy
of the whole project for end-to-end `dvc repro` runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The test process computes with the pipeline's default numerics (portable: coreml_pipeline/numerics.py), pinned
# before any test runs a torch operation, so that stages run in this process (coreml_pipeline/tools/inprocess.py) can
# pin them too, and the suite's own float results do not depend on this machine's CPU.
from coreml_pipeline import numerics  # noqa: E402
from coreml_pipeline.config.schema import RuntimeConfig  # noqa: E402

numerics.apply(RuntimeConfig().numerics, RuntimeConfig().threads)

# The warm stage servers that the suite's stages start (coreml_pipeline/warmstart.py) live in a directory of the
# suite's own and stop when it ends, instead of idling for PIPELINE_WARM_IDLE after it (a short path: a Unix
# socket's has at most 107 bytes).
WARM_RUNTIME = tempfile.mkdtemp(prefix="warm-", dir="/tmp")
os.environ["XDG_RUNTIME_DIR"] = WARM_RUNTIME


def pytest_sessionfinish(session, exitstatus):
    from coreml_pipeline import warmstart

    warmstart.stop()
    shutil.rmtree(WARM_RUNTIME, ignore_errors=True)

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

PROJECT_FILES = ["dvc.yaml", "stages", "coreml_pipeline", "pyproject.toml", "conf", "data", "examples", ".dvc/config", ".dvcignore"]


def project_env(cwd: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a user of this venv has in ``cwd``: dvc and python on PATH (plus ``extra``).
    PYTHONPATH puts the copy's own library first, so a stage runs the code its dvc.yaml deps hash."""
    return {**os.environ, "PYTHONPATH": str(cwd), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            **(extra or {})}


# Other CPUs simulated on this one (coreml_pipeline/numerics.py, docs/reproducibility.md): the knobs that select
# the code paths torch, MKL, oneDNN, numpy, numba and OpenBLAS take on a CPU without AVX2, on one core,
# with another BLAS branch. In portable mode every output must stay byte-identical under each.
SIMULATED_CPUS = {
    "no AVX2 in ATen, MKL COMPATIBLE, one thread": {
        "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"},
    "oneDNN SSE4.1, numpy without AVX2, numba generic, OpenBLAS Sandybridge": {
        "ONEDNN_MAX_CPU_ISA": "SSE41", "NPY_DISABLE_CPU_FEATURES": "AVX2 FMA3 F16C AVX",
        "NUMBA_CPU_NAME": "generic", "OPENBLAS_CORETYPE": "Sandybridge"},
}


def run(cmd: list[str], cwd: Path, check: bool = True, env: dict[str, str] | None = None,
        **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, env=project_env(cwd, env), capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout}\n{result.stderr}")
    return result


def assert_each_refused_in_one_line(check, cases) -> None:
    """check(config) raises, for each (config, expected start) case, a ConfigError of one line starting so."""
    from coreml_pipeline.config.schema import ConfigError

    for cfg, expected in cases:
        with pytest.raises(ConfigError) as raised:
            check(cfg)
        message = str(raised.value)
        assert len(message.splitlines()) == 1 and message.startswith(expected), (expected, message)


def validate_stage_refusal(params: dict, folder: Path) -> str:
    """The validate stage run on ``params``: refused (exit 2, no traceback, no marker); its one line."""
    import yaml

    (folder / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "stages.validate", "--params", str(folder / "params.yaml"), "--out",
                             str(folder / "ok")], cwd=ROOT, env=project_env(ROOT), capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert not (folder / "ok").exists()
    return result.stderr.strip()


def make_project_copy(dest: Path, overrides: list[str]) -> Path:
    """A git + DVC repository holding this project, with params.yaml composed
    from conf/ plus ``overrides``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            # Bytecode is not copied, but numba's on-disk cache of the k-means kernels (__pycache__/*.nbi, *.nbc)
            # is: it is keyed by the source file's mtime and size, which copy2 keeps, and by the CPU, so a copy
            # reuses what this checkout compiled instead of compiling again (about 14 s per cold run).
            shutil.copytree(src, target, ignore=shutil.ignore_patterns("*.pyc"))
        else:
            shutil.copy2(src, target)
    (dest / ".gitignore").write_text("/artifacts/\n*.partial.*\n__pycache__/\n")
    run([sys.executable, "-m", "coreml_pipeline.tools.params", *overrides], dest)
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
