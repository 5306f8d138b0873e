"""Sentence pairs with a relatedness score, read through `datasets`: the STS Benchmark's own csv
files (data.format=stsb), or any pair dataset in csv, tsv, json, jsonl or parquet files with its
columns and score range named in the config (data.format=pairs)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from coreml_pipeline.config.schema import DataConfig, fail
from coreml_pipeline.families.tables import SPLIT_KEYS, read_table

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
    if cfg.format == "stsb":
        # quoting=3 (QUOTE_NONE): the sentences contain unbalanced quote characters.
        return datasets.load_dataset("csv", data_files={"split": str(Path(cfg.dir) / file_name)}, split="split",
                                     delimiter="\t", quoting=3, column_names=COLUMNS)
    key = next(k for k in SPLIT_KEYS if getattr(cfg, k) == file_name)
    split = read_table(cfg, key, ("sentence1", "sentence2", "score"))
    columns = cfg.columns
    low, high = cfg.score_range
    for row, value in enumerate(split[columns.score]):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("data.columns.score", columns.score, f"allowed: a numeric column; row {row} of {file_name} "
                 f"holds {value!r}")
        if not low <= value <= high:
            fail("data.score_range", cfg.score_range, f"allowed: a range holding every score; row {row} of "
                 f"{file_name} holds {value}")
    mapping = {columns.sentence1: "sentence1", columns.sentence2: "sentence2", columns.score: "score"}
    split = split.select_columns(list(mapping))
    split = split.rename_columns({column: name for column, name in mapping.items() if column != name})
    return split.map(lambda row: {"score": 5.0 * (row["score"] - low) / (high - low)})


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
