"""Which stage's bytes depend on the CPU: every float stage under simulated CPUs.

    python -m bench.numerics --numerics native      # bench/results/numerics-native.json
    python -m bench.numerics --numerics portable    # bench/results/numerics-portable.json

One machine can stand in for others: the knobs below select the code paths
torch, MKL, oneDNN, numpy, numba and OpenBLAS take on other CPUs (an older
CPU's ISA, a machine with one core). The pipeline runs once under the
reference setting; then every stage runs again under each setting, in a fresh
process, on the reference run's own inputs, so a difference belongs to that
stage and is not inherited. The result: per setting, per stage, whether every
output is byte-identical, and for safetensors the largest absolute difference.
The table in docs/reproducibility.md is this script's output.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOC = ROOT / "docs" / "reproducibility.md"
sys.path.insert(0, str(ROOT))

from coreml_pipeline.coreml.provenance import sha256_file  # noqa: E402

SHORT = ["model.max_length=32", "convert.seq_len=32", "data.eval_max_pairs=96", "calibrate.num_samples=16"]
RECIPES = {
    # The reduced pipeline of the tests (tests/conftest.py) with more calibration data: SparseGPT,
    # sensitive k-means with the exact solver, mixed bits, conversion, baseline and evaluation.
    "sparsegpt-exact": [*SHORT, "prune=sparse_gpt", "prune.num_samples=16", "palettize.n_bits=2",
                        "palettize.group_size=32", "palettize.layer_bits={encoder.layer.5.output.dense:3}",
                        "palettize.kmeans_solver=exact_dp"],
    # Training (DKM fine-tuning) and coremltools' own C++ k-means.
    "dkm-kmeans": [*SHORT, "finetune=dkm", "finetune.steps=3", "finetune.batch_size=4", "palettize=kmeans",
                   "palettize.n_bits=2", "palettize.group_size=32"],
    # GPTQ's Hessians and solves.
    "gptq": [*SHORT, "palettize=none", "quantize=gptq", "quantize.num_samples=16"],
}
OVERRIDES = RECIPES["sparsegpt-exact"]

# Each setting: the environment a process starts with, as another CPU or machine would give it.
SETTINGS: dict[str, dict[str, str]] = {
    "reference": {},
    "1 thread": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"},
    "ATen default (no AVX2)": {"ATEN_CPU_CAPABILITY": "default"},
    "MKL COMPATIBLE branch": {"MKL_CBWR": "COMPATIBLE"},
    "oneDNN up to SSE4.1": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "numpy without AVX2/FMA3": {"NPY_DISABLE_CPU_FEATURES": "AVX2 FMA3 F16C AVX"},
    "numba generic CPU": {"NUMBA_CPU_NAME": "generic"},
    "OpenBLAS Sandybridge": {"OPENBLAS_CORETYPE": "Sandybridge"},
    "all of these at once": {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
                             "ATEN_CPU_CAPABILITY": "default", "MKL_CBWR": "COMPATIBLE",
                             "ONEDNN_MAX_CPU_ISA": "SSE41", "NPY_DISABLE_CPU_FEATURES": "AVX2 FMA3 F16C AVX",
                             "NUMBA_CPU_NAME": "generic", "OPENBLAS_CORETYPE": "Sandybridge"},
}
# The knobs a setting may set: cleared first, so the machine's own environment does not leak in.
KNOBS = sorted({key for env in SETTINGS.values() for key in env} | {"MKL_ENABLE_INSTRUCTIONS"})


def stage_specs(root: Path = ROOT) -> dict[str, dict]:
    """dvc.yaml's stages (validate aside): command line and output paths."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    specs = {}
    for name, stage in stages.items():
        if name == "validate":
            continue
        outs = []
        for key in ("outs", "metrics", "plots"):
            for item in stage.get(key, []):
                outs.append(next(iter(item)) if isinstance(item, dict) else item)
        specs[name] = {"cmd": stage["cmd"], "outs": outs}
    return specs


def workdir(path: Path, params_text: str) -> Path:
    """A folder the stage commands can run in: the project's data and examples, its own params."""
    path.mkdir(parents=True, exist_ok=True)
    for name in ("data", "examples", "conf"):
        if not (path / name).exists():
            (path / name).symlink_to(ROOT / name)
    (path / "artifacts" / "validate").mkdir(parents=True, exist_ok=True)
    (path / "artifacts" / "validate" / "config-ok").write_text("params.yaml passed validation\n")
    (path / "params.yaml").write_text(params_text, encoding="utf-8")
    return path


def run_stage(cwd: Path, spec: dict, env_extra: dict[str, str]) -> float:
    env = {key: value for key, value in os.environ.items() if key not in KNOBS}
    env.update(env_extra)
    env.update({"PYTHONPATH": str(ROOT), "PIPELINE_LOG_LEVEL": "WARNING"})
    argv = [sys.executable if word == "python" else word for word in shlex.split(spec["cmd"])]
    start = time.perf_counter()
    done = subprocess.run([*argv, "--params", "params.yaml"], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{spec['cmd']} failed under {env_extra}:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def hashes(cwd: Path, outs: list[str]) -> dict[str, str]:
    return {out: sha256_file(cwd / out) for out in outs}


def package_weights_identical(a: Path, b: Path) -> bool | None:
    """For two .mlpackages: whether their weight files are identical (None: not packages). A
    package's metadata records the platform, so its bytes differ between native runs on two
    CPUs even where the weights do not."""
    if a.suffix != ".mlpackage":
        return None
    from coreml_pipeline.coreml.provenance import package_weights_sha256

    return package_weights_sha256(a) == package_weights_sha256(b)


def max_difference(a: Path, b: Path) -> float | None:
    """Largest absolute difference between two safetensors files' tensors (None: not safetensors)."""
    if a.suffix != ".safetensors":
        return None
    import numpy as np
    from safetensors.numpy import load_file

    left, right = load_file(str(a)), load_file(str(b))
    return max(float(np.abs(left[k].astype(np.float64) - right[k].astype(np.float64)).max()) for k in left)


def measure(numerics: str, settings: list[str], overrides: list[str], scratch: Path) -> dict:
    from coreml_pipeline.config.compose import compose_text

    params_text = compose_text([*overrides, f"runtime={numerics}"])
    specs = stage_specs()
    reference = workdir(scratch / "reference", params_text)
    times = {name: run_stage(reference, spec, SETTINGS["reference"]) for name, spec in specs.items()}
    expected = {name: hashes(reference, spec["outs"]) for name, spec in specs.items()}
    result = {"numerics": numerics, "overrides": overrides, "reference_seconds": times, "settings": {}}
    for setting in settings:
        if setting == "reference":
            continue
        rows = {}
        for name, spec in specs.items():
            # The reference run's outputs as this stage's inputs (hard links: stages replace, never edit, files).
            trial = scratch / "trial"
            shutil.rmtree(trial, ignore_errors=True)
            shutil.copytree(reference, trial, symlinks=True, copy_function=os.link)
            seconds = run_stage(trial, spec, SETTINGS[setting])
            got = hashes(trial, spec["outs"])
            differing = [out for out in spec["outs"] if got[out] != expected[name][out]]
            rows[name] = {"identical": not differing, "differing": differing, "seconds": round(seconds, 1),
                          "max_abs_diff": {out: max_difference(reference / out, trial / out) for out in differing
                                           if (reference / out).suffix == ".safetensors"},
                          "package_weights_identical": {out: package_weights_identical(reference / out, trial / out)
                                                        for out in differing if out.endswith(".mlpackage")}}
            print(f"{numerics:8s} {setting:28s} {name:16s} {'identical' if not differing else 'DIFFERS'}"
                  f" {seconds:6.1f} s", flush=True)
        result["settings"][setting] = {"env": SETTINGS[setting], "stages": rows}
    return result


def table(result: dict) -> str:
    """The result as a markdown table: a row per setting, a column per stage."""
    stages = [name for name in stage_specs() if name in result["reference_seconds"]]  # pipeline order
    lines = ["| setting | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for setting in [name for name in SETTINGS if name in result["settings"]]:
        row = result["settings"][setting]
        cells = []
        for stage in stages:
            cell = row["stages"][stage]
            if cell["identical"]:
                cells.append("same")
            elif cell["package_weights_identical"] and all(cell["package_weights_identical"].values()) \
                    and all(out.endswith(".mlpackage") for out in cell["differing"]):
                cells.append("same weights, metadata differs")
            else:
                diffs = [f"{v:.1e}" for v in cell["max_abs_diff"].values() if v is not None]
                cells.append("**differs**" + (f" (max {max(diffs, key=float)})" if diffs else ""))
        env = ", ".join(f"`{k}={v}`" for k, v in row["env"].items())
        lines.append(f"| {setting} ({env}) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_into_doc(result: dict, doc: Path = DOC) -> None:
    """Replace the block between this mode's markers in the docs page with the table."""
    name = result["numerics"] + ("" if result.get("recipe", "sparsegpt-exact") == "sparsegpt-exact"
                                 else f" {result['recipe']}")
    begin, end = f"<!-- bench.numerics {name} -->", f"<!-- /bench.numerics {name} -->"
    if not doc.is_file():
        return
    text = doc.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        return
    head, rest = text.split(begin, 1)
    machine = result["machine"]
    recipe = f" --recipe {result['recipe']}" if result.get("recipe", "sparsegpt-exact") != "sparsegpt-exact" else ""
    caption = (f"\n`python -m bench.numerics --numerics {result['numerics']}{recipe}` on {machine['cpu']} "
               f"({machine['torch_cpu_capability']}, {machine['threads']} threads):\n\n")
    doc.write_text(head + begin + caption + table(result) + end + rest.split(end, 1)[1], encoding="utf-8")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    import platform

    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--numerics", choices=("native", "portable"), required=True)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names of SETTINGS")
    parser.add_argument("--recipe", choices=tuple(RECIPES), default="sparsegpt-exact")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.settings.split(",") if name.strip()]
    unknown = [name for name in names if name not in SETTINGS]
    if unknown:
        raise SystemExit(f"bench.numerics: --settings {unknown[0]!r} is not allowed; allowed: {', '.join(SETTINGS)}")
    with tempfile.TemporaryDirectory() as tmp:
        result = measure(args.numerics, names, RECIPES[args.recipe], Path(tmp))
    result["recipe"] = args.recipe
    from coreml_pipeline import numerics

    result["machine"] = {"cpu": cpu_model(), **numerics.fingerprint("native")}
    suffix = "" if args.recipe == "sparsegpt-exact" else f"-{args.recipe}"
    out = args.out or RESULTS / f"numerics-{args.numerics}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    write_into_doc(result)
    print(f"wrote {out} and its table into {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
