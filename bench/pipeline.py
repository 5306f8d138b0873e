"""What the pipeline costs on this machine, on a fresh clone of the committed project.

    python -m bench.pipeline            # writes bench/results/pipeline.json

1. the plain script (bench/plain_script.py): the default recipe's coremltools
   calls in one process; then a cold `dvc repro` (empty cache and run-cache):
   wall time of each, their ratio, and per stage wall time and peak resident
   memory (recorded by bench/hooks/sitecustomize.py as each stage exits);
2. a no-op `dvc repro` (median of 3);
3. `palettize.group_size` changed: which stages ran, wall time against the sum
   of those stages' own times;
4. switched back: restored from the run-cache, nothing recomputed.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


class Clone:
    def __init__(self, dest: Path):
        self.dir = dest
        subprocess.run(["git", "clone", "--quiet", str(ROOT), str(dest)], check=True)
        self.stats = dest.parent / "stage-stats.jsonl"
        # The warm stage server's socket and log (coreml_pipeline/warmstart.py) live beside the clone.
        self.env = {**os.environ, "PIPELINE_STAGE_STATS": str(self.stats), "XDG_RUNTIME_DIR": str(dest.parent),
                    "PYTHONPATH": f"{ROOT / 'bench' / 'hooks'}:{dest}",
                    "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def timed(self, cmd: list[str]) -> dict:
        """Run ``cmd`` here; wall time, peak resident memory of the process tree's
        largest process, and the stages that ran (with their own records)."""
        self.stats.write_text("")
        start = time.perf_counter()
        process = subprocess.Popen(cmd, cwd=self.dir, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{output[-3000:]}")
        stages = [json.loads(line) for line in self.stats.read_text().splitlines() if line.strip()]
        return {"seconds": round(seconds, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024), "stages": stages}

    def warm_servers(self, action: str) -> None:
        subprocess.run([sys.executable, "-m", "coreml_pipeline.warmstart", action], cwd=self.dir, env=self.env,
                       check=True, capture_output=True)

    def compose(self, *overrides: str) -> None:
        subprocess.run([sys.executable, "-m", "coreml_pipeline.tools.params", *overrides], cwd=self.dir, env=self.env, check=True,
                       capture_output=True)


def measure(change: str = "palettize.group_size=8") -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        clone = Clone(Path(tmp) / "project")
        plain = clone.timed([sys.executable, "-m", "bench.plain_script", "--out", str(Path(tmp) / "plain")])
        plain["metrics"] = json.loads((Path(tmp) / "plain" / "metrics.json").read_text())
        print(f"plain script: {plain['seconds']} s", flush=True)
        # Cold means no warm stage server either (coreml_pipeline/warmstart.py): the first stage starts it.
        clone.warm_servers("--stop")
        cold = clone.timed(["dvc", "repro"])
        logs = "".join(log.read_text() for log in Path(tmp).glob("coreml-pipeline-warm-*/*.log"))
        cold["server_preload_seconds"] = [float(m) for m in re.findall(r"preloaded in ([0-9.]+) s", logs)]
        cold["metrics"] = json.loads((clone.dir / "metrics" / "evaluate.json").read_text())
        print(f"cold dvc repro: {cold['seconds']} s", flush=True)
        noops = [clone.timed(["dvc", "repro"]) for _ in range(3)]
        clone.compose(change)
        downstream = clone.timed(["dvc", "repro"])
        print(f"after {change}: {downstream['seconds']} s", flush=True)
        clone.compose()
        back = clone.timed(["dvc", "repro"])
        status = subprocess.run(["dvc", "status"], cwd=clone.dir, env=clone.env, capture_output=True, text=True)
        clone.warm_servers("--stop")
    stage_sum = round(sum(s["seconds"] for s in downstream["stages"]), 2)
    return {
        "plain_script": plain,
        "cold": cold,
        "overhead_ratio": round(cold["seconds"] / plain["seconds"], 3),
        "same_metrics": {k: (plain["metrics"][k], cold["metrics"][k])
                         for k in ("package_bytes", "sts_spearman", "mean_cosine")},
        "noop_seconds": [n["seconds"] for n in noops],
        "noop_median_seconds": statistics.median(n["seconds"] for n in noops),
        "noop_stages_run": sorted({s["stage"] for n in noops for s in n["stages"]}),
        "change": change,
        "downstream": downstream,
        "downstream_stage_seconds": stage_sum,
        "downstream_overhead_seconds": round(downstream["seconds"] - stage_sum, 2),
        "switch_back": back,
        "status_after": status.stdout.strip(),
    }


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--change", default="palettize.group_size=8", help="the one-parameter change to rerun")
    args = parser.parse_args(argv)
    result = measure(args.change)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pipeline.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("cold", "plain_script", "downstream")}, indent=2))


if __name__ == "__main__":
    main()
