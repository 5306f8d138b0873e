"""Sentence pairs with a relatedness score, read through `datasets`: the STS Benchmark's own csv
files (data.format=stsb), or any pair dataset in csv, tsv, json, jsonl or parquet files with its
columns and score range named in the config (data.format=pairs)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from coreml_pipeline.config.schema import PAIR_FILE_TYPES, DataConfig, fail

COLUMNS = ["genre", "file", "years", "id", "score", "sentence1", "sentence2"]


@dataclass
class Pairs:
    sentence1: list[str]
    sentence2: list[str]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.scores)

    def sentences(self) -> list[str]:
        return self.sentence1 + self.sentence2


def read_split(cfg: DataConfig, file_name: str):
    """One split as a `datasets.Dataset` with columns sentence1, sentence2 and score (on STS-B's 0-5
    scale); data.format=pairs: its columns checked and mapped, its scores checked against
    data.score_range and rescaled (one ConfigError line naming the key otherwise)."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(cfg.dir) / file_name
    if cfg.format == "stsb":
        # quoting=3 (QUOTE_NONE): the sentences contain unbalanced quote characters.
        return datasets.load_dataset("csv", data_files={"split": str(path)}, split="split", delimiter="\t",
                                     quoting=3, column_names=COLUMNS)
    key = next(k for k in ("calibration_file", "eval_file", "train_file") if getattr(cfg, k) == file_name)
    options = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    if path.is_file() and path.stat().st_size < 4096 and not path.read_bytes().strip():
        # the json readers fail on an empty file without saying so
        fail(f"data.{key}", file_name, f"allowed: a split with pairs; {path} holds none")
    try:
        split = datasets.load_dataset(PAIR_FILE_TYPES[path.suffix], data_files={"split": str(path)}, split="split",
                                      **options)
    except Exception as exc:  # noqa: BLE001 - pyarrow, json and csv readers each raise their own
        fail(f"data.{key}", file_name, f"allowed: a readable {path.suffix} file; {path} does not read "
             f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
    if len(split) == 0:
        fail(f"data.{key}", file_name, f"allowed: a split with pairs; {path} holds none")
    mapping = {"sentence1_column": "sentence1", "sentence2_column": "sentence2", "score_column": "score"}
    for option in mapping:
        column = getattr(cfg, option)
        if column not in split.column_names:
            fail(f"data.{option}", column, f"allowed: a column of {file_name}: {', '.join(split.column_names)}")
    low, high = cfg.score_range
    for row, value in enumerate(split[cfg.score_column]):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("data.score_column", cfg.score_column, f"allowed: a numeric column; row {row} of {file_name} "
                 f"holds {value!r}")
        if not low <= value <= high:
            fail("data.score_range", cfg.score_range, f"allowed: a range holding every score; row {row} of "
                 f"{file_name} holds {value}")
    split = split.select_columns([getattr(cfg, option) for option in mapping])
    split = split.rename_columns({getattr(cfg, o): name for o, name in mapping.items() if getattr(cfg, o) != name})
    return split.map(lambda row: {"score": 5.0 * (row["score"] - low) / (high - low)})


def check_splits(cfg: DataConfig) -> None:
    """Every split of a data.format=pairs config read and checked (the validate stage: before any model loads)."""
    if cfg.format == "pairs":
        for name in dict.fromkeys((cfg.calibration_file, cfg.eval_file, cfg.train_file)):
            read_split(cfg, name)


def load_pairs(cfg: DataConfig, file_name: str, max_pairs: int | None = None, seed: int | None = None) -> Pairs:
    """Pairs of one split; with ``seed``, a seeded random sample of ``max_pairs``."""
    split = read_split(cfg, file_name)
    if seed is not None:
        split = split.shuffle(seed=seed)
    if max_pairs is not None:
        split = split.select(range(min(max_pairs, len(split))))
    return Pairs(list(split["sentence1"]), list(split["sentence2"]), [float(s) for s in split["score"]])


def eval_pairs(cfg: DataConfig) -> Pairs:
    return load_pairs(cfg, cfg.eval_file, cfg.eval_max_pairs)


def calibration_pairs(cfg: DataConfig, max_pairs: int, seed: int) -> Pairs:
    return load_pairs(cfg, cfg.calibration_file, max_pairs, seed)
