"""dvc.yaml's stage commands, run in this Python process in dvc.yaml's order.

For the structure tests and benchmarks that run many small pipelines: no process
start per stage and no DVC bookkeeping (nothing is cached or locked). Users run
`dvc repro`."""

from __future__ import annotations

import importlib
import shlex
from pathlib import Path

import yaml

# The project root: this library is installed editable (pip install -e .) from the project it runs.
ROOT = Path(__file__).resolve().parents[2]


def run_stages(params: Path, only: tuple[str, ...] | None = None) -> list[str]:
    """Every stage (or those in ``only``) with dvc.yaml's own command lines; their relative
    paths resolve under the current directory. Returns the stages run."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    ran = []
    for name, stage in stages.items():
        if only is not None and name not in only:
            continue
        argv = shlex.split(stage["cmd"])
        if argv[:2] != ["python", "-m"]:
            raise ValueError(f"dvc.yaml stage {name}: not a `python -m` command: {stage['cmd']}")
        importlib.import_module(argv[2]).main([*argv[3:], "--params", str(params)])
        ran.append(name)
    return ran
