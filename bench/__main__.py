"""All benchmarks of this machine, and the report docs/benchmarks.md quotes.

    python -m bench                          # every part (about an hour on 2 cores)
    python -m bench --parts kmeans           # one part; the report uses every stored result
    python -m bench --report                 # only rebuild bench/results/bench.md and docs/benchmarks.md's section

Parts (each also runs alone as `python -m bench.<part>`): pipeline (what DVC
costs: cold / no-op / downstream-only / switch-back, per-stage time and peak
memory, against a plain one-process script), scaling (palettize, calibrate,
convert on 10 M / 50 M / 200 M synthetic stacks), kmeans (coremltools' k-means
against palettize.kmeans_solver=exact_dp), peak_memory (the 8-bit embedding
index search that ran out of memory in coremltools). Targets are checked in the report,
not in tests (timings are not pass/fail material on a shared machine).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
# Issue 18: 4-bit grouped sensitive palettization of a 2.6 B-parameter UNet in under 10 minutes on 2 cores.
SENSITIVE_GOAL_SECONDS_AT_2600M = 600
PARTS = ("pipeline", "scaling", "kmeans", "peak_memory")


def cpu_name() -> str:
    """The CPU's model name, and whether it has AVX-512 (the float results do not depend on it in
    portable mode, the timings do)."""
    info = Path("/proc/cpuinfo")
    text = info.read_text(errors="replace") if info.is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.processor() or "unknown CPU")
    return f"{name} ({'AVX-512' if ' avx512f' in text else 'AVX2' if ' avx2' in text else 'no AVX2'})"


def machine() -> str:
    import psutil

    return (f"{platform.system()} {platform.machine()}, {cpu_name()}, {os.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}")


def load(part: str) -> dict | None:
    path = RESULTS / f"{part}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def verdict(ok: bool) -> str:
    return "meets" if ok else "**misses**"


def pipeline_md(r: dict) -> list[str]:
    cold, plain, down, back = r["cold"], r["plain_script"], r["downstream"], r["switch_back"]
    preload = cold.get("server_preload_seconds")
    lines = ["Default recipe on a fresh clone (empty DVC cache and run-cache, no warm stage server). Per stage: "
             "wall time of the stage's process and its peak resident memory (largest k-means worker beside it). "
             + ("Stages run warm (docs/pipeline.md, Warm stages): a stage's time runs from its fork off the server, "
                "its memory includes the libraries it shares with the server, and the server's one-time imports "
                f"({', '.join(f'{p:.1f}' for p in preload)} s, while the first stage waits) count in the cold "
                "total, not in any stage." if preload else "Interpreter start and imports included."), "",
             "| stage (cold `dvc repro`) | wall s | peak RSS MB | worker peak MB |", "|---|---:|---:|---:|"]
    for s in cold["stages"]:
        lines.append(f"| {s['stage']} | {s['seconds']:.1f} | {s['peak_rss_mb']:,} | {s['worker_peak_rss_mb']:,} |")
    stage_sum = sum(s["seconds"] for s in cold["stages"])
    lines += [f"| **sum of stages** | **{stage_sum:.1f}** | | |", "",
              "| measurement | wall s | stages that ran | target |", "|---|---:|---|---|"]
    ratio = r["overhead_ratio"]
    lines.append(f"| plain script, one process (bench/plain_script.py) | {plain['seconds']:.1f} | all, in one process "
                 f"| |")
    # Issue 18's targets: cold <= 1.10x the plain script (same solver and numerics) and <= 110 s; the rerun
    # after the change <= 50 s and <= its stages' own time + 3 s; a no-op <= 1.0 s; switching back <= 3 s.
    lines.append(f"| cold `dvc repro` | {cold['seconds']:.1f} | {len(cold['stages'])} stages | {ratio:.2f}x the plain "
                 f"script (target <= 1.10x): {verdict(ratio <= 1.10)}; <= 110 s: {verdict(cold['seconds'] <= 110)} |")
    lines.append(f"| no-op `dvc repro` (median of 3) | {r['noop_median_seconds']:.2f} | "
                 f"{', '.join(r['noop_stages_run']) or 'none'} | <= 1.0 s: {verdict(r['noop_median_seconds'] <= 1.0)} |")
    ran = ", ".join(s["stage"] for s in down["stages"])
    lines.append(f"| after `{r['change']}` | {down['seconds']:.1f} | {ran} (own time {r['downstream_stage_seconds']:.1f} s)"
                 f" | <= 50 s: {verdict(down['seconds'] <= 50)}; <= stages + 3 s: "
                 f"{verdict(r['downstream_overhead_seconds'] <= 3)} ({r['downstream_overhead_seconds']:+.1f} s) |")
    restored = not back["stages"]
    lines.append(f"| switched back (run-cache) | {back['seconds']:.1f} | "
                 f"{', '.join(s['stage'] for s in back['stages']) or 'none: restored'} | nothing recomputed and "
                 f"<= 3 s: {verdict(restored and back['seconds'] <= 3)} |")
    same = r["same_metrics"]
    lines += ["", "Both produce the same model: " + ", ".join(
        f"{k} {a} / {b}" for k, (a, b) in same.items()) + " (plain script / pipeline)."]
    return lines


def scaling_md(r: dict) -> list[str]:
    lines = ["Synthetic stacks of 2048 x 2048 linear layers (random weights). Memory: peak of the whole process tree "
             "(k-means workers included) minus the footprint after imports, and that as a multiple of the stack's "
             "float32 size (target on the 200 M stack: <= 2.5; on the small ones the fixed cost of workers and "
             "libraries dominates).", "",
             "| parameters | step | s | s per M params | cores busy | peak above footprint MB | x float32 | target |",
             "|---:|---|---:|---:|---:|---:|---:|---|"]
    for row in r["rows"]:
        if "failed" in row:
            lines.append(f"| {row['layers']} layers | {row['step']} | failed: {' '.join(row['failed'])} | | | | | |")
            continue
        busy = row.get("cores_busy")
        lines.append(f"| {row['params_m']} M | {row['step']} | {row['seconds']:.1f} | {row['seconds_per_m_params']:.3f} "
                     f"| {'-' if busy is None else f'{busy:.2f}'} | {row['peak_above_footprint_mb']:,} | {row['ratio_to_float32']:.2f} | "
                     f"{verdict(row['ratio_to_float32'] <= 2.5) if row['params_m'] >= 200 else '-'} |")
    lines += ["", "Linear fit of time against parameters, extrapolated to a 2.6 B-parameter UNet:", ""]
    for step, fit in r["extrapolation_2_6b"].items():
        goal = ""
        if step.startswith("palettize_sensitive_exact_dp"):
            weights = "float16-valued weights" if step.endswith("_fp16") else "float32 weights"
            goal = (f" (goal: under {SENSITIVE_GOAL_SECONDS_AT_2600M // 60} min, {weights}: "
                    f"{verdict(fit['seconds_at_2600m'] <= SENSITIVE_GOAL_SECONDS_AT_2600M)})")
        lines.append(f"- {step}: {fit['seconds_per_m_params']:.3f} s per M parameters, about "
                     f"{fit['seconds_at_2600m'] / 60:.0f} min at 2.6 B{goal}")
    return lines


def kmeans_md(r: dict) -> list[str]:
    lines = ["Same weights (the default model after calibrate), same grouping. Error: the objective each k-means "
             "minimises (sensitivity-weighted squared error for sensitive k-means, plain for data-free), as a ratio "
             "to exact_dp's; worst layer: the largest per-layer ratio.", "",
             "| case | coremltools x1 s (its default) | coremltools x2 s | exact_dp x1 s | exact_dp x2 s "
             "| exact_dp x2 speed-up vs coremltools default (vs its faster setting) "
             "| coremltools error / exact_dp error (worst layer) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for case in r["cases"]:
        runs = case["runs"]
        default, ex = runs["coremltools x1"], runs["exact_dp x2"]
        fastest = min(runs["coremltools x1"]["seconds"], runs["coremltools x2"]["seconds"])
        lines.append(f"| {case['case']} | {default['seconds']:.1f} | {runs['coremltools x2']['seconds']:.1f} | "
                     f"{runs['exact_dp x1']['seconds']:.1f} | {ex['seconds']:.1f} | "
                     f"{default['seconds'] / ex['seconds']:.1f}x ({fastest / ex['seconds']:.1f}x) "
                     f"| {default['error_ratio']:.5f} ({default['worst_layer_ratio']:.5f}) |")
    if r.get("metrics"):
        lines += ["", "| recipe | solver | package bytes | STS-B Spearman | mean cosine to float | meets target "
                  "| palettize stage s |", "|---|---|---:|---:|---:|---|---:|"]
        for m in r["metrics"]:
            seconds = m.get("palettize_seconds")
            lines.append(f"| {m['recipe']} | {m['solver']} | {m['package_bytes']:,} | {m['sts_spearman']} | "
                         f"{m['mean_cosine']} | {m['meets_target']} | "
                         f"{'restored' if seconds is None else f'{seconds:.1f}'} |")
    return lines


def peak_memory_md(r: dict) -> list[str]:
    shape = " x ".join(str(d) for d in r["shape"])
    lines = [f"Finding the look-up indices of an 8-bit palettized {shape} embedding ({r['groups']} groups of "
             f"{r['entries']} entries), what ct.convert does for every palettized weight:", "",
             "| index search | s | peak above start MB |", "|---|---:|---:|"]
    for row in r["rows"]:
        name = {"row_blocks": "row blocks (coreml_pipeline/techniques/precision.py, used by convert)",
                "coremltools": "coremltools.optimize._utils.find_indices_for_lut"}.get(row["variant"], row["variant"])
        lines.append(f"| {name} | {row.get('seconds', '-')} | {row.get('peak_above_start_mb', row.get('failed'))} |")
    return lines


def report() -> str:
    sections = {"pipeline": ("What the pipeline costs", pipeline_md), "scaling": ("How the stages scale", scaling_md),
                "kmeans": ("Faster k-means: coremltools against exact_dp", kmeans_md),
                "peak_memory": ("8-bit embedding tables through conversion", peak_memory_md)}
    lines = [f"Measured by `python -m bench`; results in bench/results/*.json (report built "
             f"{datetime.date.today().isoformat()} on {machine()})."]
    for part, (title, render) in sections.items():
        data = load(part)
        if data is not None:
            # Parts are measured at different times, possibly on different machines of this kind.
            where = (f"Measured {data['measured']['date']} on {data['measured']['machine']}." if "measured" in data
                     else "Measured on an earlier machine of this kind (2 cores), before results recorded their machine.")
            lines += ["", f"#### {title}", "", where, "", *render(data)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from bench.recipes import update_readme

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {', '.join(PARTS)}")
    parser.add_argument("--report", action="store_true", help="only rebuild the report from stored results")
    args = parser.parse_args(argv)
    if not args.report:
        for part in args.parts.split(","):
            if part not in PARTS:
                raise SystemExit(f"--parts: unknown part {part!r}; allowed: {', '.join(PARTS)}")
            __import__(f"bench.{part}", fromlist=["main"]).main([])
            stored = load(part)
            if stored is not None:
                stored["measured"] = {"date": datetime.date.today().isoformat(), "machine": machine()}
                (RESULTS / f"{part}.json").write_text(json.dumps(stored, indent=2) + "\n")
    text = report()
    (RESULTS / "bench.md").write_text(text)
    update_readme(text, "bench")
    print(text)


if __name__ == "__main__":
    main()
