"""Splits stored as table files (csv, tsv, json, jsonl, parquet), read through `datasets`, for every
data format that takes them: sentence pairs (stsb.py), a text column (causal_lm) and an image column
with labels (image_classifier). Each failure is one ConfigError line naming the config key, the value
and what is allowed, raised before any model loads (the validate stage calls ``check_splits``)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from coreml_pipeline.config.schema import TABLE_FILE_TYPES, DataConfig, fail

SPLIT_KEYS = ("calibration_file", "eval_file", "train_file")


def read_table(cfg: DataConfig, key: str, columns: tuple[str, ...]):
    """Split data.<key> as a `datasets.Dataset`, holding every data.columns.<name> in ``columns``."""
    import datasets

    datasets.disable_progress_bars()
    file_name = getattr(cfg, key)
    path = Path(cfg.dir) / file_name
    options = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    if path.is_file() and path.stat().st_size < 4096 and not path.read_bytes().strip():
        # the json readers fail on an empty file without saying so
        fail(f"data.{key}", file_name, f"allowed: a split with rows; {path} holds none")
    try:
        split = datasets.load_dataset(TABLE_FILE_TYPES[path.suffix], data_files={"split": str(path)}, split="split",
                                      **options)
    except Exception as exc:  # noqa: BLE001 - pyarrow, json and csv readers each raise their own
        fail(f"data.{key}", file_name, f"allowed: a readable {path.suffix} file; {path} does not read "
             f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
    if len(split) == 0:
        fail(f"data.{key}", file_name, f"allowed: a split with rows; {path} holds none")
    for name in columns:
        column = getattr(cfg.columns, name)
        if column not in split.column_names:
            fail(f"data.columns.{name}", column, f"allowed: a column of {file_name}: {', '.join(split.column_names)}")
    return split


def text_of(cfg: DataConfig, key: str) -> str:
    """Split data.<key> as one text: a plain text file, or the data.columns.text column of a table file
    (its rows joined by blank lines, as paragraphs)."""
    if not cfg.is_table(key):
        return (Path(cfg.dir) / getattr(cfg, key)).read_text(encoding="utf-8")
    split = read_table(cfg, key, ("text",))
    rows = split[cfg.columns.text]
    for row, value in enumerate(rows):
        if not isinstance(value, str):
            fail("data.columns.text", cfg.columns.text, f"allowed: a column of strings; row {row} of "
                 f"{getattr(cfg, key)} holds {value!r}")
    return "\n\n".join(value for value in rows if value.strip())


def image_table(cfg: DataConfig, key: str):
    """Split data.<key> (a table file) with its data.columns.image column decoded as images (paths
    resolved against the file's folder and checked) and renamed image, its label column (if any)
    renamed label."""
    import datasets

    wanted = ("image", "label") if cfg.columns.label is not None else ("image",)
    split = read_table(cfg, key, wanted)
    file_name, column = getattr(cfg, key), cfg.columns.image
    feature = split.features[column]
    if not isinstance(feature, datasets.Image):
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            fail("data.columns.image", column, f"allowed: an image column (datasets Image) or image paths; "
                 f"{file_name} holds {feature}")
        folder = (Path(cfg.dir) / file_name).parent
        for row, name in enumerate(split[column]):
            if not (folder / name).is_file():
                fail("data.columns.image", column, f"allowed: paths of image files relative to {folder}; row {row} "
                     f"of {file_name} names {name!r}, which does not exist")
        split = split.map(lambda item: {column: str(folder / item[column])})
        split = split.cast_column(column, datasets.Image())
    split = split.select_columns([getattr(cfg.columns, name) for name in wanted])
    renames = {getattr(cfg.columns, name): name for name in wanted if getattr(cfg.columns, name) != name}
    return split.rename_columns(renames) if renames else split


def split_label_names(split) -> list[str] | None:
    """The labels of an image split (a `datasets.Dataset` with a label column) as strings: a ClassLabel's
    names (folder names), or the distinct values; None when it has no labels."""
    feature = split.features.get("label")
    if feature is None:
        return None
    if hasattr(feature, "names"):
        return list(feature.names)
    return sorted({str(value) for value in split["label"]})


def mapped_labels(cfg: DataConfig, key: str, names: list[str]) -> dict[str, int | str]:
    """data.label_map's entry for every label of split data.<key>: one config error line naming a label
    it does not map."""
    mapping = cfg.label_mapping()
    missing = [name for name in names if name not in mapping]
    if missing:
        fail("data.label_map", cfg.label_map_shown, f"allowed: an entry for every label of data.{key}={getattr(cfg, key)!r}; "
             f"{len(missing)} have none, e.g. {missing[0]!r}")
    return {name: mapping[name] for name in names}


def folder_label_names(cfg: DataConfig, key: str) -> list[str]:
    """The labels `datasets`' imagefolder gives split data.<key> (a folder): its subfolders' names."""
    root = Path(cfg.dir) / getattr(cfg, key)
    return sorted(child.name for child in root.iterdir() if child.is_dir())


def check_splits(cfg: DataConfig) -> None:
    """Every table split read and its columns checked, and data.label_map checked against every image
    split's labels (the validate stage: before any model loads)."""
    from coreml_pipeline.families import stsb

    first_key = {}  # each file once, under the first key naming it
    for key in SPLIT_KEYS:
        if cfg.is_table(key) or cfg.label_map is not None:
            first_key.setdefault(getattr(cfg, key), key)
    for key in first_key.values():
        if cfg.format == "pairs":
            stsb.read_split(cfg, getattr(cfg, key))
        elif cfg.format == "text":
            text_of(cfg, key)
        elif cfg.is_table(key):
            split = image_table(cfg, key)
            if cfg.label_map is not None:
                mapped_labels(cfg, key, split_label_names(split) or [])
        elif cfg.label_map is not None:
            mapped_labels(cfg, key, folder_label_names(cfg, key))
