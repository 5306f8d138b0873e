"""How palettize, calibrate and convert scale: synthetic stacks of 2048 x 2048
linear layers (random weights: enough for cost) of about 10 M, 50 M and 200 M
parameters, each step in a fresh process.

    python -m bench.scaling [--sizes 2,12,48]     # layers per stack

Per step: wall time of the step itself (model build and imports excluded),
and peak resident memory of the whole process tree (sampled every 20 ms; the
k-means workers included) minus the footprint after imports, against the
stack's float32 size. The steps run the stages' own code on the stack:
palettize.run (4-bit, group 16, 2 workers: data-free k-means with both solvers, and
sensitive k-means with exact_dp on random positive sensitivities, on float32 weights and on
weights rounded to float16 values, as a float16 checkpoint gives them), the sensitivity
(8 random batches, squared-output loss) by SKMPalettizer and by the calibrate
stage's in-place computation of the same values, and the convert stage's
ct.convert call (iOS18, float16, bounded index search) plus the reproducible save.
Writes bench/results/scaling.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WIDTH = 2048
RESULTS = Path(__file__).resolve().parent / "results"
STEPS = ("palettize_coremltools", "palettize_exact_dp", "palettize_sensitive_exact_dp",
         "palettize_sensitive_exact_dp_fp16", "calibrate_coremltools", "calibrate", "convert")


class PeakSampler(threading.Thread):
    """Peak resident memory of this process and all its descendants."""

    def __init__(self, interval: float = 0.02):
        super().__init__(daemon=True)
        import psutil

        self.process, self.interval, self.peak, self.running = psutil.Process(), interval, 0, True

    def tree_rss(self) -> int:
        total = self.process.memory_info().rss
        for child in self.process.children(recursive=True):
            try:
                total += child.memory_info().rss
            except Exception:  # a worker that just exited
                pass
        return total

    def run(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.tree_rss())
            time.sleep(self.interval)

    def stop(self) -> int:
        self.running = False
        self.join()
        return max(self.peak, self.tree_rss())


def stack(layers: int, float16_values: bool = False):
    """The stack; with ``float16_values`` its weights rounded to float16 (a float16 checkpoint, such as the
    fp16 variant diffusers' SDXL ships, loaded in float32): fewer distinct values per group for exact_dp."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)]).eval()
    if float16_values:
        with torch.no_grad():
            for layer in model:
                layer.weight.copy_(layer.weight.half().float())
    return model


def palettize_config(solver: str, method: str = "kmeans"):
    from coreml_pipeline.config.schema import PalettizeConfig

    return PalettizeConfig(method=method, n_bits=4, granularity="per_grouped_channel", group_size=16,
                           num_kmeans_workers=2, kmeans_solver=solver)


def write_sensitivities(path: Path, layers: int) -> None:
    """Random positive sensitivities for the stack (the k-means' cost does not depend on their values)."""
    import torch

    from coreml_pipeline.model import save_tensors

    generator = torch.Generator().manual_seed(0)
    save_tensors({f"{i}.weight": torch.rand(WIDTH, WIDTH, generator=generator) + 1e-3 for i in range(layers)}, path)


def step(name: str, layers: int, tmp: Path) -> dict:
    """One step on a fresh stack; returns its time and memory."""
    import resource

    import coremltools as ct
    import numpy as np
    import torch
    from coremltools.optimize.torch.palettization import SKMPalettizer, SKMPalettizerConfig

    from coreml_pipeline import runtime
    from coreml_pipeline.coreml.convert import save_package
    from coreml_pipeline.model import register_metadata, save_weights
    from coreml_pipeline.techniques import palettize
    from coreml_pipeline.techniques.calibrate import fisher_sensitivity
    from coreml_pipeline.techniques.precision import bounded_index_search

    def cpu_seconds() -> float:  # this process's threads and every worker it waited for
        own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime

    runtime.setup("scaling")
    weights_path = tmp / f"palettized-{layers}.safetensors"
    sensitivity_path = tmp / f"sensitivity-{layers}.safetensors"
    if name.startswith("palettize_sensitive_exact_dp"):
        # Written by another process, as the calibrate stage writes them: making 805 MB of sensitivities here
        # would put them (and the heap glibc keeps after they are freed) into this step's peak.
        import multiprocessing

        writer = multiprocessing.get_context("spawn").Process(target=write_sensitivities, args=(sensitivity_path, layers))
        writer.start()
        writer.join()
    sampler = PeakSampler()
    footprint = sampler.tree_rss()
    sampler.start()
    model = stack(layers, float16_values=name.endswith("_fp16"))
    start, cpu_start = time.perf_counter(), cpu_seconds()
    if name.startswith("palettize_sensitive_exact_dp"):
        # Read as the palettize stage reads the calibrate stage's file: layer by layer.
        from coreml_pipeline.model import LazyTensors

        model = palettize.run(model, palettize_config("exact_dp", "sensitive_kmeans"), LazyTensors(sensitivity_path))
        seconds = time.perf_counter() - start
    elif name.startswith("palettize"):
        model = palettize.run(model, palettize_config(name.split("_", 1)[1]))
        seconds = time.perf_counter() - start
        if name == "palettize_exact_dp":
            save_weights(model, weights_path)  # the convert step's input
    elif name.startswith("calibrate"):
        generator = torch.Generator().manual_seed(0)
        batches = [torch.randn(4, WIDTH, generator=generator) for _ in range(8)]
        loss = lambda m, x: m(x).pow(2).mean()  # noqa: E731
        if name == "calibrate_coremltools":  # the reference: SKMPalettizer's own
            skm = SKMPalettizer(model, SKMPalettizerConfig.from_dict({"calibration_nsamples": len(batches)}))
            skm.compute_sensitivity(batches, loss, sensitivity_path=str(tmp / "s.pt"))
        else:  # the calibrate stage's in-place computation of the same values
            fisher_sensitivity(model, batches, loss, {f"{i}.weight" for i in range(layers)})
        seconds = time.perf_counter() - start
    else:
        from safetensors.torch import load_file

        state = load_file(str(weights_path))
        register_metadata(model, state)
        model.load_state_dict(state)
        del state
        start, cpu_start = time.perf_counter(), cpu_seconds()
        with torch.no_grad():
            traced = torch.jit.trace(model, torch.zeros(1, WIDTH))
        with bounded_index_search():
            mlmodel = ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, WIDTH), dtype=np.float32)],
                                 convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                                 compute_precision=ct.precision.FLOAT16)
        save_package(mlmodel, tmp / f"stack-{layers}.mlpackage")
        seconds = time.perf_counter() - start
    cores_busy = (cpu_seconds() - cpu_start) / seconds  # 2.0: both cores busy the whole step
    peak = sampler.stop()
    params = layers * WIDTH * WIDTH
    return {"step": name, "layers": layers, "params_m": round(params / 1e6, 1), "seconds": round(seconds, 2),
            "seconds_per_m_params": round(seconds / (params / 1e6), 3), "cores_busy": round(cores_busy, 2),
            "footprint_after_imports_mb": round(footprint / 2**20), "peak_tree_mb": round(peak / 2**20),
            "peak_above_footprint_mb": round((peak - footprint) / 2**20),
            "float32_mb": round(params * 4 / 2**20),
            "ratio_to_float32": round((peak - footprint) / (params * 4), 2)}


def extrapolate(rows: list[dict], params_m: float = 2600.0) -> dict:
    """Least-squares line through (parameters, seconds) per step, at ``params_m``."""
    import numpy as np

    out = {}
    for name in STEPS:
        points = [(r["params_m"], r["seconds"]) for r in rows if r["step"] == name]
        if len(points) >= 2:
            slope, intercept = np.polyfit(*zip(*points), 1)
            out[name] = {"seconds_at_2600m": round(float(slope * params_m + intercept)),
                         "seconds_per_m_params": round(float(slope), 3)}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2,12,48", help="layers per stack (2048 x 2048 each, 4.2 M parameters)")
    parser.add_argument("--steps", default=",".join(STEPS))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(step(args.worker, args.layers, Path(args.tmp))))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp:
        for layers in (int(s) for s in args.sizes.split(",")):
            for name in args.steps.split(","):
                result = subprocess.run([sys.executable, "-m", "bench.scaling", "--worker", name, "--layers",
                                         str(layers), "--tmp", tmp], capture_output=True, text=True)
                if result.returncode != 0:
                    row = {"step": name, "layers": layers, "failed": result.stderr.strip().splitlines()[-1:]}
                else:
                    row = json.loads(result.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                rows.append(row)
    # Rows of steps and sizes not run this time stay from the stored result.
    stored = json.loads((RESULTS / "scaling.json").read_text())["rows"] if (RESULTS / "scaling.json").is_file() else []
    fresh = {(r["step"], r["layers"]) for r in rows}
    rows = sorted([r for r in stored if (r["step"], r["layers"]) not in fresh] + rows,
                  key=lambda r: (r["layers"], STEPS.index(r["step"]) if r["step"] in STEPS else len(STEPS)))
    ok = [r for r in rows if "failed" not in r and r["step"] in STEPS]
    out = {"width": WIDTH, "rows": [r for r in rows if r["step"] in STEPS], "extrapolation_2_6b": extrapolate(ok)}
    # Stamped here too, so that a run of some steps alone (python -m bench.scaling --steps ...) keeps its date
    # and machine in the report (python -m bench stamps every part it runs).
    from bench.__main__ import machine

    out["measured"] = {"date": time.strftime("%Y-%m-%d"), "machine": machine()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaling.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
