"""Run recipes as DVC experiments and read their results back.

Shared by the Hydra sweep app (`coreml_pipeline.tools.sweep`), the report (`coreml_pipeline.tools.report`)
and the benchmark scripts. Every run is `dvc exp run --temp`: each experiment
gets its own temporary workspace (so parallel jobs never collide on output
paths), lands in `dvc.lock`/`dvc exp show` as a named experiment, and restores
every stage it shares with an earlier run from DVC's run-cache.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

# The project root: this library is installed editable (pip install -e .) from the project it runs.
ROOT = Path(__file__).resolve().parents[2]
TORCH_SIDE, COREML_SIDE = "metrics/evaluate.json", "metrics/coreml.json"
STAGE_START = re.compile(r"stage=(\w+) start")
# What the compressing stages log when they really compute (absent when restored).
STAGE_SECONDS = re.compile(
    r"pipeline\.(\w+) (?:prune|finetune|sensitivity|palettize|quantize|coremltools)[^\n]* took ([\d.]+) s")


def dvc(*args: str, cwd: Path = ROOT, check: bool = True, timeout: float | None = None,
        on_line: Callable[[str], None] | None = None) -> subprocess.CompletedProcess:
    """`dvc` of this interpreter's environment, in its own process group so that
    a timeout stops the stage processes DVC started too. With ``on_line``, the
    output (stderr merged into stdout) is handed over line by line as it comes."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "TQDM_DISABLE": "1"}
    stderr = subprocess.STDOUT if on_line else subprocess.PIPE
    with subprocess.Popen(["dvc", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=stderr,
                          text=True, start_new_session=True) as process:
        if on_line is None:
            try:
                out, err = process.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.communicate()
                raise
        else:
            expired = threading.Event()

            def stop() -> None:
                expired.set()
                os.killpg(process.pid, signal.SIGKILL)

            timer = threading.Timer(timeout, stop) if timeout else None
            if timer:
                timer.start()
            lines = []
            for line in process.stdout:
                lines.append(line)
                on_line(line.rstrip("\n"))
            process.wait()
            if timer:
                timer.cancel()
            if expired.is_set():
                raise subprocess.TimeoutExpired(process.args, timeout)
            out, err = "".join(lines), ""
    if check and process.returncode:
        raise subprocess.CalledProcessError(process.returncode, process.args, out, err)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def stages_run(output: str) -> list[str]:
    """Stages whose command really executed (each logs `stage=<name> start`)."""
    ran = set(STAGE_START.findall(output))
    if "Running stage 'validate'" in output:  # validate logs nothing of its own
        ran.add("validate")
    return sorted(ran)


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"palettize": {"n_bits": 4}} -> {"palettize.n_bits": 4}"""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def experiments(cwd: Path = ROOT, all_commits: bool = False) -> list[dict]:
    """Every experiment (and the workspace and baseline commit) from
    `dvc exp show --json`: name, rev, params (flat keys), evaluate metrics
    (None when it has none: failed, or a commit without them) and, when
    present, the Core ML-side metrics. ``all_commits``: experiments of every
    commit, not only of HEAD."""
    shown = json.loads(dvc("--wait-for-lock", "exp", "show", "--json", "--no-fetch",
                           *(["--all-commits"] if all_commits else []), cwd=cwd).stdout)
    rows = []

    def add(rev: dict, kind: str) -> None:
        data = rev.get("data") or {}
        metrics = data.get("metrics") or {}
        torch_side = (metrics.get(TORCH_SIDE) or {}).get("data") or None  # None: failed or never run
        params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
        rows.append({"name": rev.get("name") or data.get("rev", "")[:7], "rev": data.get("rev"), "kind": kind,
                     "timestamp": data.get("timestamp"), "params": flatten(params), "metrics": torch_side,
                     "coreml": (metrics.get(COREML_SIDE) or {}).get("data")})

    for baseline in shown:
        add(baseline, "workspace" if baseline.get("rev") == "workspace" else "baseline")
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                add(rev, "experiment")
    return rows


def experiment(name: str, cwd: Path = ROOT) -> dict:
    for row in experiments(cwd):
        if row["kind"] == "experiment" and row["name"] == name:
            return row
    raise KeyError(f"experiment {name} not found in dvc exp show")


def run_experiment(name: str, overrides: list[str], cwd: Path = ROOT, timeout: float | None = None,
                   on_line: Callable[[str], None] | None = None, extra_args: list[str] | None = None) -> dict:
    """`dvc exp run --temp -n name -S override ...`: the result row of
    `experiments()` plus wall seconds, the stages that really ran, and what the
    compressing stages logged as their own time. A timeout returns
    {"timed_out": seconds}; a failing experiment raises with DVC's output.
    ``on_line`` sees DVC's output as it comes (progress of long runs);
    ``extra_args`` go to `dvc exp run` (e.g. --force: recompute every stage)."""
    # Parallel jobs take the repository lock in turn (setting up and collecting
    # a temporary workspace) instead of failing on it.
    dvc("--wait-for-lock", "exp", "remove", name, cwd=cwd, check=False)  # a rerun replaces a same-named experiment
    args = ["--wait-for-lock", "exp", "run", "--temp", "-n", name, *(extra_args or [])]
    for override in overrides:
        args += ["-S", override]
    start = time.perf_counter()
    try:
        result = dvc(*args, cwd=cwd, check=False, timeout=timeout, on_line=on_line)
    except subprocess.TimeoutExpired:
        return {"name": name, "overrides": overrides, "timed_out": round(timeout or 0)}
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"experiment {name} failed (dvc exit {result.returncode}):\n{output[-4000:]}")
    took = {stage: float(secs) for stage, secs in STAGE_SECONDS.findall(output)}
    return {**experiment(name, cwd), "overrides": overrides, "seconds": round(seconds, 1),
            "stages_run": stages_run(output), "compression_seconds": took}
