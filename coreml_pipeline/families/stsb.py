"""STS Benchmark pairs, read through `datasets` from the local csv files."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from coreml_pipeline.config.schema import DataConfig

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


def load_pairs(cfg: DataConfig, file_name: str, max_pairs: int | None = None, seed: int | None = None) -> Pairs:
    """Pairs of one split; with ``seed``, a seeded random sample of ``max_pairs``."""
    import datasets

    datasets.disable_progress_bars()
    # quoting=3 (QUOTE_NONE): the sentences contain unbalanced quote characters.
    split = datasets.load_dataset(
        "csv", data_files={"split": str(Path(cfg.dir) / file_name)}, split="split",
        delimiter="\t", quoting=3, column_names=COLUMNS,
    )
    if seed is not None:
        split = split.shuffle(seed=seed)
    if max_pairs is not None:
        split = split.select(range(min(max_pairs, len(split))))
    return Pairs(list(split["sentence1"]), list(split["sentence2"]), [float(s) for s in split["score"]])


def eval_pairs(cfg: DataConfig) -> Pairs:
    return load_pairs(cfg, cfg.eval_file, cfg.eval_max_pairs)


def calibration_pairs(cfg: DataConfig, max_pairs: int, seed: int) -> Pairs:
    return load_pairs(cfg, cfg.calibration_file, max_pairs, seed)
