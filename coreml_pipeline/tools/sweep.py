"""Hydra multirun over DVC experiments.

    python -m coreml_pipeline.tools.sweep -m palettize.n_bits=4,6 prune=none,magnitude
    python -m coreml_pipeline.tools.sweep -m hydra/launcher=joblib hydra.launcher.n_jobs=2 palettize.group_size=8,16
    python -m coreml_pipeline.tools.sweep -cn search        # Optuna: smallest package meeting the quality target

DVC itself drives only Hydra's basic sweeper (`dvc exp run -S`); this app
lets any Hydra sweeper (basic, Optuna) and launcher (basic, joblib, submitit)
drive the pipeline. Every job runs its overrides as one `dvc exp run --temp`
experiment, so dvc.lock, the run-cache and `dvc exp show` see it, parallel
jobs never share a workspace, and stages an experiment shares with an earlier
one are restored, not recomputed. The job returns the objective
(`sweep.objective`) for sweepers that optimise. Each job writes result.json
into its Hydra output folder; at the end of the multirun a summary table
(summary.md) and the smallest package meeting the quality target are printed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from coreml_pipeline.config.schema import SECTIONS, ConfigError
from coreml_pipeline.tools import experiments
from coreml_pipeline.validation import validate

log = logging.getLogger("pipeline.sweep")

# Returned for a failed or invalid job, so that an optimising sweeper ranks it
# last instead of the whole sweep stopping.
PENALTY = 1e6
OBJECTIVES = {
    # name: what it returns, and its direction
    "size_meeting_target": "package MB when the quality target is met, else 1000 + package MB (minimize)",
    "package_mb": "package MB (minimize)",
    "sts_spearman": "STS-B Spearman x100 (maximize)",
    "mean_cosine": "mean cosine to the float embeddings (maximize)",
    "size_and_spearman": "[package MB (minimize), STS-B Spearman (maximize)] for multi-objective Optuna",
    "quality": "the model family's headline quality: STS-B Spearman, PSNR dB or agreement (maximize)",
    "size_and_quality": "[package MB (minimize), quality (maximize)] for multi-objective Optuna, any family",
}
MAXIMIZED = {"sts_spearman", "mean_cosine", "quality"}
PAIRS = ("size_and_spearman", "size_and_quality")


def pipeline_overrides(task_overrides: list[str]) -> list[str]:
    """The job's overrides that belong to the pipeline (not to this app)."""
    return [o for o in task_overrides if not o.lstrip("+~").startswith(("sweep.", "sweep="))]


def experiment_name(prefix: str, overrides: list[str]) -> str:
    """Stable per recipe: the same overrides name the same experiment."""
    digest = hashlib.sha1("\n".join(sorted(overrides)).encode()).hexdigest()[:8]
    return f"{prefix}-{digest}"


def objective(name: str, metrics: dict | None) -> float | list[float]:
    if name not in OBJECTIVES:
        raise ConfigError(f"config error: sweep.objective={name!r} is not allowed; allowed: {', '.join(OBJECTIVES)}")
    worst = [PENALTY, -PENALTY] if name in PAIRS else -PENALTY if name in MAXIMIZED else PENALTY
    if metrics is None:  # failed job: worst possible value in the objective's direction
        return worst
    size_mb = metrics["package_bytes"] / 1e6
    if name == "size_meeting_target":
        value = size_mb if metrics["meets_target"] else 1000.0 + size_mb
    elif name == "package_mb":
        value = size_mb
    elif name in PAIRS:
        value = [size_mb, float(metrics["sts_spearman" if name == "size_and_spearman" else "quality"])]
    else:
        value = float(metrics[name])
    # A collapsed model can score NaN; a sweeper must rank it last, not first.
    finite = all(math.isfinite(v) for v in value) if isinstance(value, list) else math.isfinite(value)
    return value if finite else worst


PROGRESS = re.compile(r"stage=\w+ start|took [\d.]+ s|step \d+/\d+|^Running stage|is cached|ERROR")


def progress(name: str) -> Callable[[str], None]:
    """Log the lines of an experiment that say where it is (stage starts, stage
    times, training steps, run-cache restores), prefixed by its name. Logged at
    INFO, so `hydra.verbose` or the job log shows them and CI output stays short."""
    def show(line: str) -> None:
        if PROGRESS.search(line):
            log.info("[%s] %s", name, line.strip())
    return show


def run_job(cfg: DictConfig, overrides: list[str], output_dir: Path) -> dict[str, Any]:
    """One sweep point: check the composed config, run it as an experiment, record it."""
    sweep = cfg.sweep
    objective(sweep.objective, None)  # an unknown objective fails now, not after the experiment
    name = experiment_name(sweep.name_prefix, overrides)
    result: dict[str, Any] = {"name": name, "overrides": overrides}
    try:
        # Hydra composed exactly what `dvc exp run -S` will compose: refuse bad values before any work.
        validate({section: OmegaConf.to_container(cfg[section], resolve=True) for section in SECTIONS})
        log.info("experiment %s: %s", name, " ".join(overrides) or "(default config)")
        row = experiments.run_experiment(name, overrides, timeout=sweep.timeout, on_line=progress(name))
        result.update({k: row.get(k) for k in ("rev", "seconds", "stages_run", "compression_seconds", "timed_out",
                                                "metrics", "coreml")})
    except (ConfigError, RuntimeError) as exc:
        result["error"] = str(exc).strip().splitlines()[0] if isinstance(exc, ConfigError) else str(exc)[-2000:]
        log.error("experiment %s failed: %s", name, headline(result["error"]))
    result["objective"] = objective(sweep.objective, result.get("metrics"))
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if result.get("metrics"):
        m = result["metrics"]
        log.info("experiment %s: %.2f MB, quality %.4f, target %s, ran %s", name,
                 m["package_bytes"] / 1e6, m.get("quality", m.get("sts_spearman", float("nan"))),
                 "met" if m["meets_target"] else "missed", ", ".join(result["stages_run"]) or "nothing")
    return result


def headline(error: str) -> str:
    """The line of a failed experiment's output that says why: its last exception line
    (DVC's own "failed to reproduce" lines come after it and say only which stage)."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    for line in reversed(lines):
        if re.match(r"^[\w.]*(Error|Exception)\b[^:]*:", line) or line.startswith("config error:"):
            return line
    return lines[-1] if lines else ""


def summary_rows(sweep_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(sweep_dir.glob("*/result.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        rows.append(json.loads(path.read_text(encoding="utf-8")))
    return rows


def smallest_meeting_target(rows: list[dict]) -> dict | None:
    met = [r for r in rows if r.get("metrics") and r["metrics"]["meets_target"]]
    return min(met, key=lambda r: r["metrics"]["package_bytes"]) if met else None


def summary_markdown(rows: list[dict]) -> str:
    lines = ["| experiment | overrides | size MB | ratio | STS-B | mean cosine | target | stages run | s |",
             "|---|---|---:|---:|---:|---:|:---:|---|---:|"]
    for r in rows:
        overrides = " ".join(f"`{o}`" for o in r["overrides"]) or "(default)"
        m = r.get("metrics")
        if not m:
            reason = r.get("error") or f"timed out after {r.get('timed_out')} s"
            reason = headline(reason).replace("|", "/")[:160]
            lines.append(f"| {r['name']} | {overrides} | failed: {reason} | | | | | | |")
            continue
        lines.append(f"| {r['name']} | {overrides} | {m['package_bytes'] / 1e6:.2f} | {m['size_ratio']:.3f} "
                     f"| {m['sts_spearman']:.2f} | {m['mean_cosine']:.4f} | {'met' if m['meets_target'] else 'missed'} "
                     f"| {', '.join(r['stages_run']) or 'none (restored)'} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def grid_points(config: DictConfig) -> list[list[str]]:
    """Every job a basic (grid) sweep will launch, as its override strings, in launch order: the
    product of the task overrides' values, as Hydra's BasicSweeper expands them."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    task = list(config.hydra.overrides.task) + [f"{key}={value}" for key, value in
                                                (config.hydra.sweeper.get("params") or {}).items()]
    choices = []
    for override in OverridesParser.create().parse_overrides(task):
        key = override.get_key_element()
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else \
            [override.get_value_element_as_str()]
        choices.append([f"{key}={value}" for value in values])
    return [list(point) for point in itertools.product(*choices)]


def check_grid(config: DictConfig) -> None:
    """A grid sweep's every point composed and validated before the first experiment runs (a bad
    value in the last point must not cost the minutes of the first): one line naming the point,
    exit 2. Optimising sweepers (Optuna) choose points as they go: a bad one is penalised instead."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    if not str(config.hydra.sweeper.get("_target_", "")).endswith("BasicSweeper"):
        return
    points = grid_points(config)
    loader = GlobalHydra.instance().config_loader()
    for index, point in enumerate(points, 1):
        try:
            job = loader.load_configuration(config_name=config.hydra.job.config_name, overrides=point,
                                            run_mode=RunMode.RUN)
            validate({section: OmegaConf.to_container(job[section], resolve=True) for section in SECTIONS})
        except ConfigError as exc:
            reason = str(exc).strip().splitlines()[0]
        except Exception as exc:  # noqa: BLE001 - Hydra's and OmegaConf's own errors on a value
            reason = f"does not compose: {' '.join(str(exc).split())[:300]}"
        else:
            continue
        shown = " ".join(pipeline_overrides(point)) or "(default config)"
        print(f"sweep: point {index} of {len(points)} ({shown}): {reason}; no experiment was run", file=sys.stderr)
        raise SystemExit(2)


class SweepSummary(Callback):
    """Before a grid sweep: every point validated (check_grid). At the end of a multirun: summary.md
    in the sweep folder, and the winner."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_grid(config)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summary_rows(sweep_dir)
        table = summary_markdown(rows)
        best = smallest_meeting_target(rows)
        if best is None:
            verdict = "No experiment met the quality target."
        else:
            m = best["metrics"]
            verdict = (f"Smallest package meeting the target: {best['name']} "
                       f"({' '.join(best['overrides']) or 'default config'}): {m['package_bytes'] / 1e6:.2f} MB, "
                       f"STS-B {m['sts_spearman']:.2f} (float {m['float_sts_spearman']:.2f}), "
                       f"mean cosine {m['mean_cosine']:.4f}. Apply it with "
                       f"`dvc exp apply {best['name']}`.")
        (sweep_dir / "summary.md").write_text(table + "\n" + verdict + "\n", encoding="utf-8")
        print(table + "\n" + verdict, flush=True)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="sweep")
def main(cfg: DictConfig) -> float | list[float]:
    hydra_cfg = HydraConfig.get()
    result = run_job(cfg, pipeline_overrides(list(hydra_cfg.overrides.task)), Path(hydra_cfg.runtime.output_dir))
    return result["objective"]


if __name__ == "__main__":
    main()
