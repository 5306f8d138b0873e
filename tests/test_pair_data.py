"""Your own sentence pairs through config alone (data.format=pairs, issue 17.4): every local file
type with its columns mapped and its score range rescaled, the shipped example, the hub import,
and each bad input as one line naming the key before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import assert_each_refused_in_one_line, project_env, validate_stage_refusal

from coreml_pipeline.config import compose
from coreml_pipeline.config.schema import ColumnsConfig, ConfigError, DataConfig
from coreml_pipeline.families import stsb
from coreml_pipeline.families.tables import check_splits
from coreml_pipeline.validation import validate

ROOT = compose.ROOT
STSB_DEV = [line.split("\t") for line in (ROOT / "data/stsb/sts-dev.csv").read_text(encoding="utf-8").splitlines()[:20]]


def rows(scale: float = 1.0) -> list[dict]:
    return [{"left": r[5], "right": r[6], "rating": float(r[4]) * scale} for r in STSB_DEV]


def write(folder: Path, suffix: str, records: list[dict]) -> str:
    """``records`` as one file of type ``suffix``; returns its name."""
    import pandas

    name = f"split{suffix}"
    frame = pandas.DataFrame(records)
    path = folder / name
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif suffix == ".json":
        path.write_text(json.dumps(records), encoding="utf-8")
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path)
    return name


def pairs_config(folder: Path, name: str, **changes) -> DataConfig:
    cfg = DataConfig(format="pairs", dir=str(folder), calibration_file=name, eval_file=name, train_file=name,
                     columns=ColumnsConfig(sentence1="left", sentence2="right", score="rating"), score_range=[0.0, 10.0])
    for key, value in changes.items():
        setattr(cfg.columns if hasattr(cfg.columns, key) else cfg, key, value)
    return cfg


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".json", ".jsonl", ".parquet"])
def test_every_local_file_type_with_its_columns_mapped(suffix, tmp_path):
    """STS-B pairs rated on 0-10 under other column names: the same sentences, scores back on 0-5."""
    name = write(tmp_path, suffix, rows(scale=2.0))
    cfg = pairs_config(tmp_path, name)
    cfg.check()
    check_splits(cfg)
    pairs = stsb.load_pairs(cfg, name)
    assert pairs.sentence1 == [r[5] for r in STSB_DEV] and pairs.sentence2 == [r[6] for r in STSB_DEV]
    assert pairs.scores == pytest.approx([float(r[4]) for r in STSB_DEV], abs=1e-9)
    sample = stsb.load_pairs(cfg, name, max_pairs=5, seed=0)  # calibration's seeded sample
    assert len(sample) == 5 and set(sample.sentence1) <= set(pairs.sentence1)


def test_the_shipped_example_composes_and_matches_stsb(tmp_path):
    """data=pairs (conf/data/pairs.yaml): STS-B's first 300 pairs per split as jsonl, other names, 0-1 scores."""
    params = yaml.safe_load(compose.compose_text(["data=pairs"]))
    checked = validate(params)
    assert checked["data"].format == "pairs"
    mine = stsb.eval_pairs(checked["data"])
    theirs = stsb.load_pairs(DataConfig(), "sts-test.csv", max_pairs=300)
    assert mine.sentence1 == theirs.sentence1 and mine.sentence2 == theirs.sentence2
    assert mine.scores == pytest.approx(theirs.scores, abs=5e-4)  # rounded to 4 decimals on 0-1
    # the family's own readers (calibrate, fine-tune, layer-wise samples) take the same pairs
    from coreml_pipeline import families

    family = families.get(checked["model"], checked["data"])
    batches = family.calibration_samples(4, seed=0)
    assert len(batches) == 4 and set(batches[0]) == {"a", "b", "label"}  # both sentences tokenized, the score
    assert len(family.layerwise_samples(6)) == 6


def bad(tmp_path: Path) -> list[tuple[DataConfig, str]]:
    """(config, the one line expected) for each bad input."""
    good = write(tmp_path, ".jsonl", rows())
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    words = [dict(r, rating="high") for r in rows()]
    (tmp_path / "words.jsonl").write_text("\n".join(json.dumps(r) for r in words) + "\n", encoding="utf-8")
    return [
        (pairs_config(tmp_path, good, sentence2="text_b"),
         "config error: data.columns.sentence2='text_b' is not allowed; allowed: a column of split.jsonl: left, right, "
         "rating"),
        (pairs_config(tmp_path, "words.jsonl"),
         "config error: data.columns.score='rating' is not allowed; allowed: a numeric column; row 0 of words.jsonl "
         "holds 'high'"),
        (pairs_config(tmp_path, good, score_range=[0.0, 1.0]),
         "config error: data.score_range=[0.0, 1.0] is not allowed; allowed: a range holding every score; row 0 of "
         "split.jsonl holds 5.0"),
        (pairs_config(tmp_path, "empty.jsonl"),
         "config error: data.calibration_file='empty.jsonl' is not allowed; allowed: a split with rows; "),
        (pairs_config(tmp_path, "broken.parquet"),
         "config error: data.calibration_file='broken.parquet' is not allowed; allowed: a readable .parquet file; "),
    ]


def test_bad_pair_data_is_one_line_naming_the_key(tmp_path):
    assert_each_refused_in_one_line(check_splits, bad(tmp_path))


@pytest.mark.parametrize("change, expected", [
    ({"score_range": None}, "config error: data.score_range=None is not allowed; allowed: [low, high]"),
    ({"score_range": [5.0, 0.0]}, "config error: data.score_range=[5.0, 0.0] is not allowed; allowed: [low, high]"),
    ({"eval_file": "pairs.xlsx"}, "config error: data.eval_file='pairs.xlsx' is not allowed; allowed with format=pairs: "
                                  "a .csv, .tsv, .json, .jsonl, .parquet file"),
])
def test_bad_pair_options_are_refused_by_the_schema(change, expected, tmp_path):
    name = write(tmp_path, ".csv", rows())
    with pytest.raises(ConfigError) as raised:
        pairs_config(tmp_path, name, **change).check()
    assert str(raised.value).startswith(expected)


def test_the_validate_stage_refuses_bad_pairs_before_any_model_loads(tmp_path):
    name = write(tmp_path, ".csv", rows())
    params = yaml.safe_load(compose.compose_text(["data=pairs"]))
    params["data"].update(dir=str(tmp_path), calibration_file=name, eval_file=name, train_file=name,
                          columns={"sentence1": "left", "sentence2": "right", "score": "score"})
    assert validate_stage_refusal(params, tmp_path) == ("config error: data.columns.score='score' is not allowed; "
                                                        "allowed: a column of split.csv: left, right, rating")


def test_import_data_writes_local_splits_and_says_how_to_use_them(tmp_path):
    """A dataset folder load_dataset reads like a hub dataset (split files by name); no network needed."""
    import pandas

    source = tmp_path / "hub_like"
    source.mkdir()
    for split in ("train", "validation", "test"):
        pandas.DataFrame(rows()).to_parquet(source / f"{split}.parquet")
    out = tmp_path / "data" / "mine"
    result = subprocess.run([sys.executable, "-m", "coreml_pipeline.tools.import_data", str(source), "--out", str(out)],
                            cwd=ROOT, env=project_env(ROOT), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["test.parquet", "train.parquet", "validation.parquet"]
    assert (f"data=pairs data.dir={out} data.calibration_file=validation.parquet data.eval_file=test.parquet "
            "data.train_file=train.parquet") in result.stdout
    cfg = pairs_config(out, "validation.parquet", eval_file="test.parquet", train_file="train.parquet")
    check_splits(cfg)
    assert len(stsb.eval_pairs(cfg)) == len(STSB_DEV)


def test_import_data_without_a_network_is_one_line():
    result = subprocess.run([sys.executable, "-m", "coreml_pipeline.tools.import_data", "someone/no-such-pairs",
                             "--out", "/nonexistent/out"], cwd=ROOT, env=project_env(ROOT, {"HF_DATASETS_OFFLINE": "1"}),
                            capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1
    assert line.startswith("import_data: someone/no-such-pairs split 'validation' (calibration_file) cannot be loaded: ")
    assert line.endswith("set HF_DATASETS_OFFLINE=0 on a machine with a network")
