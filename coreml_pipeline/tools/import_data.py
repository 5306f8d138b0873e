"""Import a dataset from the Hugging Face hub (or any `datasets.load_dataset` path) into local parquet
files: sentence pairs (data.format=pairs), a text column (data.format=text) or images with labels
(data.format=imagefolder).

    HF_DATASETS_OFFLINE=0 python -m coreml_pipeline.tools.import_data mteb/sickr-sts --out data/sickr \\
        --calibration validation --eval test --train train
    HF_DATASETS_OFFLINE=0 python -m coreml_pipeline.tools.import_data Salesforce/wikitext \\
        --name wikitext-2-raw-v1 --format text --out data/wikitext
    HF_DATASETS_OFFLINE=0 python -m coreml_pipeline.tools.import_data frgfm/imagenette --name 160px \\
        --format imagefolder --out data/imagenette --calibration train --eval validation --train train \\
        --max-rows 500

The pipeline reads only local files: DVC tracks them as dependencies, the package's provenance
hashes them, and a rerun needs no network. This writes one parquet file per split (the columns as
they are; images embedded as bytes, so the files stand alone) and prints the overrides that select
them. Exit 2 with one line when the dataset or a split cannot be loaded (no network: set
HF_DATASETS_OFFLINE=0 where there is one).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# What each format reads from data.columns, as the override hint prints it.
COLUMN_HINTS = {
    "pairs": "data.columns.sentence1=... data.columns.sentence2=... data.columns.score=... data.score_range=[low,high]",
    "text": "data.columns.text=...",
    "imagefolder": "data.columns.image=... data.columns.label=... (null: unlabelled)",
}
# The conf/data option each format starts from.
DATA_CONFIGS = {"pairs": "pairs", "text": "prose", "imagefolder": "photos"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="a hub id (owner/name) or a local dataset path")
    parser.add_argument("--name", help="the dataset's config name, if it has several")
    parser.add_argument("--format", choices=tuple(COLUMN_HINTS), default="pairs", help="the data.format it is for")
    parser.add_argument("--out", type=Path, required=True, help="folder for the parquet files (e.g. data/mypairs)")
    parser.add_argument("--calibration", default="validation", help="split for calibration (held-out: not test)")
    parser.add_argument("--eval", default="test", help="split to evaluate on")
    parser.add_argument("--train", default="train", help="split for fine-tuning")
    parser.add_argument("--max-rows", type=int, help="keep the first N rows of each split (large image sets)")
    args = parser.parse_args(argv)

    import datasets
    from datasets.table import embed_table_storage

    datasets.disable_progress_bars()
    splits = {"calibration_file": args.calibration, "eval_file": args.eval, "train_file": args.train}
    loaded = {}
    for key, split in splits.items():
        if split in loaded:
            continue
        try:
            loaded[split] = datasets.load_dataset(args.dataset, args.name, split=split)
        except Exception as exc:  # noqa: BLE001 - network, hub and builder errors each have their own type
            offline = os.environ.get("HF_DATASETS_OFFLINE") == "1"
            hint = "; offline (HF_DATASETS_OFFLINE=1): set HF_DATASETS_OFFLINE=0 on a machine with a network" \
                if offline else ""
            print(f"import_data: {args.dataset} split {split!r} ({key}) cannot be loaded: "
                  f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}{hint}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for split, table in loaded.items():
        if args.max_rows is not None:
            table = table.select(range(min(args.max_rows, len(table))))
        # Images held as paths into the datasets cache become bytes inside the file (as push_to_hub does).
        table = table.with_format("arrow").map(embed_table_storage, batched=True).with_format(None)
        table.to_parquet(str(args.out / f"{split}.parquet"))
        print(f"wrote {args.out / f'{split}.parquet'} ({len(table)} rows; columns {', '.join(table.column_names)})")
    overrides = [f"data={DATA_CONFIGS[args.format]}", f"data.dir={args.out}"]
    overrides += [f"data.{key}={split}.parquet" for key, split in splits.items()]
    print("Use it (name the columns if they differ from the defaults):\n  " + " ".join(overrides) + " "
          + COLUMN_HINTS[args.format])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
