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

from bench.pipeline import RESULTS, ROOT, Clone

DOC = ROOT / "docs" / "reproducibility.md"


def cost_table(result: dict) -> str:
    """The per-stage seconds of both cold runs as a markdown table."""
    lines = ["| stage | native (s) | portable (s) | ratio |", "|---|---|---|---|"]
    from coreml_pipeline.tools.audit import STAGE_ORDER

    for stage in sorted(result["stage_seconds"], key=lambda name: (STAGE_ORDER + (name,)).index(name)):
        seconds = result["stage_seconds"][stage]
        native, portable = seconds.get("native"), seconds.get("portable")
        ratio = f"{portable / native:.2f}" if native and portable else ""
        lines.append(f"| {stage} | {native} | {portable} | {ratio} |")
    cold = result["cold_seconds"]
    lines.append(f"| **cold `dvc repro`** | **{cold['native']}** | **{cold['portable']}** | "
                 f"**{result['cost_ratio']:.2f}** |")
    quality, cosine = result["metrics"]["quality"], result["metrics"]["mean_cosine"]
    return ("\n".join(lines) + f"\n\nSTS-B Spearman {quality[0]} native, {quality[1]} portable; mean cosine "
            f"{cosine[0]} / {cosine[1]}.\n")


def write_into_doc(result: dict, doc: Path = DOC) -> None:
    begin, end = "<!-- bench.numerics_cost -->", "<!-- /bench.numerics_cost -->"
    text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        caption = ("\n`python -m bench.numerics_cost`: the default pipeline, cold (empty cache and run-cache), "
                   "in two fresh clones, wall time per stage with process start:\n\n")
        doc.write_text(head + begin + caption + cost_table(result) + end + rest.split(end, 1)[1], encoding="utf-8")


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
    write_into_doc(result)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
