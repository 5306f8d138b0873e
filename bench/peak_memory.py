"""Peak memory of finding look-up indices for an 8-bit palettized word embedding.

    python -m bench.peak_memory

The converter calls coremltools.optimize._utils.find_indices_for_lut for every
palettized weight. For the 30522 x 384 MiniLM word embedding with 256-entry
tables that compares every weight with every entry at once; the convert stage
swaps in coreml_pipeline.techniques.precision.find_indices_for_lut (row blocks). Each variant runs
in a fresh process and reports its peak resident memory above the process's
footprint before the call (ru_maxrss). The original is only run with --original,
as it may exhaust the machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE, GROUPS, ENTRIES = (30522, 384), 16, 256


def measure(variant: str) -> dict:
    import numpy as np

    generator = np.random.default_rng(0)
    lut = np.sort(generator.normal(size=(1, GROUPS, ENTRIES, 1)).astype(np.float32), axis=-2)
    rows = generator.integers(0, ENTRIES, size=SHAPE)
    group_of_column = np.arange(SHAPE[1]) // (SHAPE[1] // GROUPS)
    data = lut[0, group_of_column, rows, 0].astype(np.float32)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if variant == "row_blocks":
        from coreml_pipeline.techniques.precision import find_indices_for_lut
    else:
        from coreml_pipeline.coreml.private import coremltools_find_indices_for_lut

        find_indices_for_lut = coremltools_find_indices_for_lut()
    indices = find_indices_for_lut(data, lut)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert np.array_equal(indices.astype(np.int64), rows), "indices must recover the rows' entries"
    return {"variant": variant, "seconds": round(seconds, 1), "peak_above_start_mb": round((peak - before) / 1024),
            "weight_mb": round(data.nbytes / 2**20)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", action="store_true", help="also run coremltools' own search")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args.variant)))
        return
    rows = []
    for variant in ["row_blocks"] + (["coremltools"] if args.original else []):
        result = subprocess.run([sys.executable, "-m", "bench.peak_memory", "--variant", variant],
                                capture_output=True, text=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]) if result.returncode == 0
                    else {"variant": variant, "failed": f"exit {result.returncode}"})
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "peak_memory.json").write_text(json.dumps({"shape": SHAPE, "groups": GROUPS, "entries": ENTRIES,
                                                          "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
