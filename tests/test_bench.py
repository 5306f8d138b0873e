"""The benchmark report: it renders from the stored results and checks the
targets there (timings themselves are never asserted in tests)."""

from __future__ import annotations

import json

import pytest

import bench.__main__ as bench_main

PIPELINE = {
    "plain_script": {"seconds": 100.0},
    "cold": {"seconds": 130.0, "stages": [{"stage": "prune", "seconds": 9.0, "peak_rss_mb": 555,
                                           "worker_peak_rss_mb": 0}]},
    "overhead_ratio": 1.3, "same_metrics": {"package_bytes": [1, 1]},
    "noop_median_seconds": 1.5, "noop_stages_run": [], "change": "palettize.group_size=8",
    "downstream": {"seconds": 60.0, "stages": [{"stage": "palettize", "seconds": 50.0}]},
    "downstream_stage_seconds": 50.0, "downstream_overhead_seconds": 10.0,
    "switch_back": {"seconds": 4.0, "stages": []},
}
SCALING = {"rows": [{"step": "convert", "layers": 2, "params_m": 8.4, "seconds": 5.0, "seconds_per_m_params": 0.6,
                     "peak_above_footprint_mb": 60, "ratio_to_float32": 1.8},
                    {"step": "calibrate", "layers": 48, "failed": ["MemoryError"]}],
           "extrapolation_2_6b": {"convert": {"seconds_per_m_params": 0.6, "seconds_at_2600m": 1560}}}


@pytest.fixture
def results(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_main, "RESULTS", tmp_path)
    return tmp_path


def test_report_checks_each_target_and_names_failures(results):
    (results / "pipeline.json").write_text(json.dumps(PIPELINE))
    (results / "scaling.json").write_text(json.dumps(SCALING))
    text = bench_main.report()
    assert "1.30x the plain script (target <= 1.10x): **misses**; <= 110 s: **misses**" in text
    assert "<= 1.0 s: **misses**" in text  # the no-op took 1.5 s
    assert "<= 50 s: **misses**; <= stages + 3 s: **misses** (+10.0 s)" in text
    assert "none: restored" in text and "nothing recomputed and <= 3 s: **misses**" in text  # restored in 4 s
    assert "| 8.4 M | convert | 5.0 | 0.600 | - | 60 | 1.80 | - |" in text  # the target is for the 200 M stack
    assert "failed: MemoryError" in text and "about 26 min at 2.6 B" in text
    assert "Faster k-means" not in text  # no stored result, no section


def test_unknown_part_is_refused(results):
    with pytest.raises(SystemExit, match="unknown part 'gpu'; allowed: pipeline, scaling, kmeans, peak_memory"):
        bench_main.main(["--parts", "gpu"])
