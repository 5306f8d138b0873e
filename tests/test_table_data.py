"""Text and images from your own table files through config alone (issue 17.4): a text column of a
csv, jsonl or parquet file (causal_lm), an image column with labels as embedded bytes or as paths
(image_classifier), the hub import for both, and each bad input as one line naming the key."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import assert_each_refused_in_one_line, project_env, validate_stage_refusal
from tiny_families import tiny_causal_lm

from coreml_pipeline import families
from coreml_pipeline.config import compose
from coreml_pipeline.config.schema import ColumnsConfig, ConfigError, DataConfig
from coreml_pipeline.families.tables import check_splits, text_of

ROOT = compose.ROOT
PHOTOS = ROOT / "data/photos/eval"
PROSE = [p for p in (ROOT / "data/prose/eval.txt").read_text(encoding="utf-8").split("\n\n") if p.strip()][:12]


def write_table(path: Path, records: list[dict]) -> str:
    import pandas

    frame = pandas.DataFrame(records)
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    elif path.suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    return path.name


def text_config(folder: Path, name: str, column: str = "body") -> DataConfig:
    return DataConfig(format="text", dir=str(folder), calibration_file=name, eval_file=name, train_file=name,
                      columns=ColumnsConfig(text=column))


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_text_column_of_each_file_type(suffix, tmp_path):
    name = write_table(tmp_path / f"prose{suffix}", [{"id": i, "body": text} for i, text in enumerate(PROSE)])
    cfg = text_config(tmp_path, name)
    cfg.check()
    check_splits(cfg)
    assert text_of(cfg, "eval_file") == "\n\n".join(PROSE)


def test_plain_text_files_read_as_before(tmp_path):
    cfg = DataConfig(format="text", dir=str(ROOT / "data/prose"), calibration_file="calibration.txt",
                     eval_file="eval.txt", train_file="calibration.txt")
    assert not cfg.is_table("eval_file")
    assert text_of(cfg, "eval_file") == (ROOT / "data/prose/eval.txt").read_text(encoding="utf-8")


def test_the_causal_lm_windows_a_text_column_as_it_windows_the_same_text_file(tmp_path):
    source = tiny_causal_lm(tmp_path / "lm")
    model = families.family_class("causal_lm", "model").config(source=str(source), max_length=16)
    (tmp_path / "prose.txt").write_text("\n\n".join(PROSE), encoding="utf-8")
    write_table(tmp_path / "prose.parquet", [{"body": text} for text in PROSE])
    from_file = families.get(model, text_config(tmp_path, "prose.txt")).eval_samples()
    from_column = families.get(model, text_config(tmp_path, "prose.parquet")).eval_samples()
    assert len(from_file) > 4 and all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(from_file, from_column))


def image_config(folder: Path, name: str, **columns) -> DataConfig:
    return DataConfig(format="imagefolder", dir=str(folder), calibration_file=name, eval_file=name, train_file=name,
                      columns=ColumnsConfig(**columns))


def efficientnet(data: DataConfig):
    model = families.family_class("image_classifier", "model").config(
        source="efficientnet-lite:efficientnet-lite0", image_size=64, resize_size=72)
    return families.get(model, data)


def test_an_image_table_gives_the_pixels_of_the_same_images_in_a_folder(tmp_path):
    """Embedded bytes (a hub dataset's parquet) and paths beside the file (csv) read as the folder does;
    integer labels are class indices, and digit-string labels too."""
    import datasets

    files = sorted(PHOTOS.iterdir())[:4]
    folder = tmp_path / "folder" / "eval"
    for index, path in enumerate(files):
        (folder / str(index)).mkdir(parents=True)
        (folder / str(index) / path.name).write_bytes(path.read_bytes())
    table = datasets.Dataset.from_dict(
        {"img": [{"bytes": p.read_bytes(), "path": None} for p in files], "cls": list(range(len(files)))},
        features=datasets.Features({"img": datasets.Image(), "cls": datasets.Value("int64")}))
    table.to_parquet(str(tmp_path / "photos.parquet"))
    for path in files:
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "images" / path.name).write_bytes(path.read_bytes())
    write_table(tmp_path / "photos.csv", [{"file": f"images/{p.name}", "cls": str(i)} for i, p in enumerate(files)])

    reference = efficientnet(DataConfig(format="imagefolder", dir=str(tmp_path / "folder"), calibration_file="eval",
                                        eval_file="eval", train_file="eval")).eval_samples()
    by_pixels = sorted(reference, key=lambda s: int(s["label"]))
    for name, column in (("photos.parquet", "img"), ("photos.csv", "file")):
        cfg = image_config(tmp_path, name, image=column, label="cls")
        cfg.check()
        check_splits(cfg)
        samples = efficientnet(cfg).eval_samples()
        assert [int(s["label"]) for s in samples] == list(range(len(files)))
        assert all(torch.equal(a["pixel_values"], b["pixel_values"]) for a, b in zip(samples, by_pixels)), name
    unlabelled = efficientnet(image_config(tmp_path, "photos.parquet", image="img", label=None)).eval_samples()
    assert len(unlabelled) == len(files) and "label" not in unlabelled[0]


def bad_inputs(tmp_path: Path) -> list[tuple[DataConfig, str]]:
    write_table(tmp_path / "prose.jsonl", [{"body": text} for text in PROSE[:3]])
    write_table(tmp_path / "numbers.jsonl", [{"body": 1}, {"body": 2}])
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    write_table(tmp_path / "paths.csv", [{"image": "missing.png", "label": 0}])
    write_table(tmp_path / "ints.parquet", [{"image": 3, "label": 0}])
    return [
        (text_config(tmp_path, "prose.jsonl", column="text"),
         "config error: data.columns.text='text' is not allowed; allowed: a column of prose.jsonl: body"),
        (text_config(tmp_path, "numbers.jsonl"),
         "config error: data.columns.text='body' is not allowed; allowed: a column of strings; row 0 of numbers.jsonl "
         "holds 1"),
        (text_config(tmp_path, "empty.csv"),
         "config error: data.calibration_file='empty.csv' is not allowed; allowed: a split with rows; "),
        (image_config(tmp_path, "paths.csv", label="class"),
         "config error: data.columns.label='class' is not allowed; allowed: a column of paths.csv: image, label"),
        (image_config(tmp_path, "paths.csv"),
         "config error: data.columns.image='image' is not allowed; allowed: paths of image files relative to "),
        (image_config(tmp_path, "ints.parquet"),
         "config error: data.columns.image='image' is not allowed; allowed: an image column (datasets Image) or image "
         "paths; ints.parquet holds Value('int64')"),
    ]


def test_bad_table_data_is_one_line_naming_the_key(tmp_path):
    assert_each_refused_in_one_line(check_splits, bad_inputs(tmp_path))


def test_an_image_split_that_is_neither_folder_nor_table_is_refused(tmp_path):
    (tmp_path / "photos.zip").write_bytes(b"")
    with pytest.raises(ConfigError) as raised:
        image_config(tmp_path, "photos.zip").check()
    assert str(raised.value) == ("config error: data.calibration_file='photos.zip' is not allowed; allowed: a folder "
                                 "of images, or a .csv, .tsv, .json, .jsonl, .parquet file with image and label columns, "
                                 f"that exists in {tmp_path}")


def test_the_validate_stage_refuses_a_missing_text_column_before_any_model_loads(tmp_path):
    name = write_table(tmp_path / "prose.parquet", [{"body": text} for text in PROSE])
    params = yaml.safe_load(compose.compose_text(["model=smollm2", "data=prose"]))
    params["data"].update(dir=str(tmp_path), calibration_file=name, eval_file=name, train_file=name)
    assert validate_stage_refusal(params, tmp_path) == ("config error: data.columns.text='text' is not allowed; "
                                                        "allowed: a column of prose.parquet: body")


def test_import_data_embeds_images_and_labels_for_the_image_classifier(tmp_path):
    """A local image dataset laid out as a hub one (split folders, class subfolders): the parquet files
    hold the image bytes (they stand alone), the labels keep their class names, and the printed
    overrides read them."""
    files = sorted(PHOTOS.iterdir())[:4]
    source = tmp_path / "hub_like"
    for split in ("train", "validation", "test"):
        for index, path in enumerate(files):
            (source / split / str(index % 2)).mkdir(parents=True, exist_ok=True)
            (source / split / str(index % 2) / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "data" / "photos"
    result = subprocess.run([sys.executable, "-m", "coreml_pipeline.tools.import_data", str(source), "--format",
                             "imagefolder", "--out", str(out)], cwd=ROOT, env=project_env(ROOT), capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr
    assert f"data=photos data.dir={out} data.calibration_file=validation.parquet" in result.stdout
    import shutil

    shutil.rmtree(source)  # nothing may point back at the source files
    cfg = image_config(out, "validation.parquet")
    cfg.eval_file, cfg.train_file = "test.parquet", "train.parquet"
    check_splits(cfg)
    samples = efficientnet(cfg).eval_samples()
    assert sorted(int(s["label"]) for s in samples) == [0, 0, 1, 1]
    import pyarrow.parquet as pq

    stored = pq.read_table(out / "test.parquet").column("image").to_pylist()
    assert all(isinstance(item["bytes"], bytes) and len(item["bytes"]) > 1000 for item in stored)
    assert json.loads(pq.read_schema(out / "test.parquet").metadata[b"huggingface"])["info"]["features"]["label"][
        "names"] == ["0", "1"]


def labelled_folders(root: Path, names: tuple[str, ...]) -> Path:
    """One split of the shipped photographs under class subfolders ``names`` (two images each)."""
    files = sorted(PHOTOS.iterdir())
    for index, name in enumerate(names):
        (root / "split" / name).mkdir(parents=True, exist_ok=True)
        for path in files[2 * index:2 * index + 2]:
            (root / "split" / name / path.name).write_bytes(path.read_bytes())
    return root


def tiny_classifier(tmp_path: Path, data: DataConfig):
    from tiny_families import tiny_image_classifier

    model = families.family_class("image_classifier", "model").config(
        source=str(tiny_image_classifier(tmp_path / "resnet")), image_size=32, resize_size=36)
    return families.get(model, data)


def test_label_map_turns_dataset_labels_into_model_classes(tmp_path):
    """Folder names that are not the model's classes (WordNet-style ids): data.label_map maps them, by class name or
    index, inline or from a .json file in data.dir, and the samples carry the model's class indices."""
    labelled_folders(tmp_path, ("n001", "n002", "n003"))
    unmapped = tiny_classifier(tmp_path, image_config(tmp_path, "split")).eval_samples()
    assert "label" not in unmapped[0]  # neither class names nor indices: no accuracy without a map
    (tmp_path / "wnids.json").write_text(json.dumps({"n001": "dog", "n002": 0, "n003": "bird"}))
    for label_map in ({"n001": "dog", "n002": 0, "n003": "bird"}, "wnids.json"):
        cfg = image_config(tmp_path, "split")
        cfg.label_map = label_map
        cfg.check()
        check_splits(cfg)
        samples = tiny_classifier(tmp_path, cfg).eval_samples()
        assert [int(s["label"]) for s in samples] == [1, 1, 0, 0, 2, 2]  # tiny_families.CLASSES: cat, dog, bird


def test_bad_label_maps_are_one_line_naming_the_key(tmp_path):
    labelled_folders(tmp_path, ("n001", "n002"))
    (tmp_path / "list.json").write_text("[1, 2]")

    def mapped(label_map):
        cfg = image_config(tmp_path, "split")
        cfg.label_map = label_map
        cfg.check("data")
        check_splits(cfg)
        tiny_classifier(tmp_path, cfg).eval_samples()

    assert_each_refused_in_one_line(mapped, [
        ({"n001": 0}, "config error: data.label_map='{...}' is not allowed; allowed: an entry for every label of "
                      "data.calibration_file='split'; 1 have none, e.g. 'n002'"),
        ({"n001": 0, "n002": "zebra"}, "config error: data.label_map='{...}' maps to 'zebra', which is not a class of "
                                       "model.source="),
        ({"n001": -1, "n002": 0}, "config error: data.label_map.n001=-1 is not allowed; allowed: a model class index"),
        ("missing.json", "config error: data.label_map='missing.json' is not allowed; allowed: a mapping, or a .json "
                         "file that exists in"),
        ("list.json", "config error: data.label_map='list.json' is not allowed; allowed: a .json file holding one "
                      "object; "),
        (3, "config error: data.label_map=3 is not allowed; allowed: null, {dataset label: model class index or name}"),
    ])
    (tmp_path / "prose.txt").write_text("Some prose.\n")
    text = text_config(tmp_path, "prose.txt")
    text.label_map = {"a": 0}
    with pytest.raises(ConfigError, match=r"data\.label_map='\{\.\.\.\}' is not allowed; allowed: null unless "
                                          r"data\.format=imagefolder"):
        text.check()
