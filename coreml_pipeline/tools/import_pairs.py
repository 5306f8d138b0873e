"""Import a sentence-pair dataset from the Hugging Face hub (or any `datasets.load_dataset` path) into
local parquet files, for data.format=pairs.

    HF_DATASETS_OFFLINE=0 python -m coreml_pipeline.tools.import_pairs mteb/sickr-sts --out data/sickr \\
        --calibration validation --eval test --train train

The pipeline reads only local files: DVC tracks them as dependencies, the package's provenance
hashes them, and a rerun needs no network. This writes one parquet file per split (the columns as
they are) and prints the overrides that select them (`data=pairs data.dir=... data.score_column=...`).
Exit 2 with one line when the dataset or a split cannot be loaded (no network: set
HF_DATASETS_OFFLINE=0 where there is one).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="a hub id (owner/name) or a local dataset path")
    parser.add_argument("--name", help="the dataset's config name, if it has several")
    parser.add_argument("--out", type=Path, required=True, help="folder for the parquet files (e.g. data/mypairs)")
    parser.add_argument("--calibration", default="validation", help="split for calibration (held-out: not test)")
    parser.add_argument("--eval", default="test", help="split to evaluate on")
    parser.add_argument("--train", default="train", help="split for fine-tuning")
    args = parser.parse_args(argv)

    import datasets

    datasets.disable_progress_bars()
    splits = {"calibration_file": args.calibration, "eval_file": args.eval, "train_file": args.train}
    loaded = {}
    for key, split in splits.items():
        try:
            loaded[key] = datasets.load_dataset(args.dataset, args.name, split=split)
        except Exception as exc:  # noqa: BLE001 - network, hub and builder errors each have their own type
            offline = os.environ.get("HF_DATASETS_OFFLINE") == "1"
            hint = "; offline (HF_DATASETS_OFFLINE=1): set HF_DATASETS_OFFLINE=0 on a machine with a network" \
                if offline else ""
            print(f"import_pairs: {args.dataset} split {split!r} ({key}) cannot be loaded: "
                  f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}{hint}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for key, split in splits.items():
        loaded[key].to_parquet(str(args.out / f"{split}.parquet"))
        print(f"wrote {args.out / f'{split}.parquet'} ({len(loaded[key])} rows; columns "
              f"{', '.join(loaded[key].column_names)})")
    overrides = ["data=pairs", f"data.dir={args.out}"] + [f"data.{key}={split}.parquet" for key, split in splits.items()]
    print("Use it (name the columns and the score range if they differ from the defaults):\n  "
          + " ".join(overrides) + " data.sentence1_column=... data.sentence2_column=... data.score_column=... "
          "data.score_range=[low,high]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
