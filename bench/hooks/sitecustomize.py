"""Loaded by every Python process that `python -m bench` starts (it puts this
folder first on PYTHONPATH): a process running a pipeline stage appends its
wall time (since the process started, imports included) and peak resident
memory to $PIPELINE_STAGE_STATS when it exits. Measuring from outside keeps
the stages' code, and so DVC's dependency hashes, untouched."""

import atexit
import os
import sys


def _record() -> None:
    import json
    import multiprocessing
    import resource
    import time
    from pathlib import Path

    import psutil

    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is None or script.parent.name != "stages" or multiprocessing.parent_process() is not None:
        return  # dvc itself, or a k-means worker process (spawned workers re-run the stage's module)
    line = {"stage": script.stem, "seconds": round(time.time() - psutil.Process().create_time(), 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "worker_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}
    with open(os.environ["PIPELINE_STAGE_STATS"], "a", encoding="utf-8") as out:
        out.write(json.dumps(line) + "\n")


if os.environ.get("PIPELINE_STAGE_STATS"):
    atexit.register(_record)
