"""What portable numerics cost: the cold default `dvc repro`, native against portable.

    python -m bench.numerics_cost     # writes bench/results/numerics_cost.json

Two fresh clones of the committed project (empty DVC cache and run-cache), one
composed with `runtime=native`, one with `runtime=portable` (the default); each
runs the whole default pipeline cold. Per stage: wall time (process start,
imports included, as bench/hooks records it). Also: which outputs differ
between the two modes, and their metrics.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import yaml

from bench.pipeline import RESULTS, Clone


def cold_run(tmp: Path, mode: str) -> dict:
    clone = Clone(tmp / mode / "project")
    clone.compose(f"runtime={mode}")
    result = clone.timed(["dvc", "repro"])
    lock = yaml.safe_load((clone.dir / "dvc.lock").read_text())
    result["outs"] = {o["path"]: o["md5"] for s in lock["stages"].values() for o in s.get("outs", [])}
    result["metrics"] = json.loads((clone.dir / "metrics" / "evaluate.json").read_text())
    print(f"cold dvc repro, runtime={mode}: {result['seconds']} s", flush=True)
    return result


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-numerics-") as tmp:
        runs = {mode: cold_run(Path(tmp), mode) for mode in ("native", "portable")}
    native, portable = runs["native"], runs["portable"]
    stages = {}
    for mode, result in runs.items():
        for stage in result["stages"]:
            stages.setdefault(stage["stage"], {})[mode] = stage["seconds"]
    result = {
        "runs": runs,
        "stage_seconds": stages,
        "cold_seconds": {mode: r["seconds"] for mode, r in runs.items()},
        "cost_ratio": round(portable["seconds"] / native["seconds"], 3),
        "outputs_differing": sorted(p for p in native["outs"] if native["outs"][p] != portable["outs"].get(p)),
        "metrics": {key: (native["metrics"][key], portable["metrics"][key])
                    for key in ("quality", "mean_cosine", "package_bytes")},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "numerics_cost.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
