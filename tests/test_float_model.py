"""The packaged all-MiniLM-L6-v2 reproduces its published STS-B test score."""

from __future__ import annotations

import pytest
from conftest import ROOT

from coreml_pipeline.config.schema import DataConfig
from coreml_pipeline.families.sentence_embedding import SentenceEmbeddingConfig, encode, sts_spearman
from coreml_pipeline.families.stsb import eval_pairs, load_pairs
from coreml_pipeline.model import load_float_model, load_tokenizer


def test_stsb_splits_load_through_datasets(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = DataConfig()
    assert [len(load_pairs(cfg, f)) for f in ("sts-train.csv", "sts-dev.csv", "sts-test.csv")] == [5749, 1500, 1379]
    pairs = eval_pairs(cfg)
    assert pairs.sentence1[0] == "a girl is styling her hair ." and pairs.scores[0] == 2.5
    assert (ROOT / "data/stsb/LICENSE.txt").is_file() and (ROOT / "data/stsb/readme.txt").is_file()


def test_float_model_reproduces_published_stsb_spearman(monkeypatch):
    monkeypatch.chdir(ROOT)
    model_cfg = SentenceEmbeddingConfig()  # mean pooling, max_length 128
    pairs = eval_pairs(DataConfig())
    embeddings = encode(load_float_model(model_cfg), load_tokenizer(model_cfg), pairs.sentences(), model_cfg)
    assert sts_spearman(embeddings, pairs) == pytest.approx(82.03, abs=0.005)


def test_length_sorted_batches_return_each_sentence_in_its_place(monkeypatch):
    """encode batches sentences by token count: every row is its own sentence's embedding (as encoded
    alone, without padding), in the input order, whatever the batch size."""
    import torch

    monkeypatch.chdir(ROOT)
    model_cfg = SentenceEmbeddingConfig()
    model, tokenizer = load_float_model(model_cfg), load_tokenizer(model_cfg)
    pairs = eval_pairs(DataConfig())
    sentences = pairs.sentences()[:40:3] + ["a", "a much longer sentence " * 12, ""]
    alone = torch.cat([encode(model, tokenizer, [sentence], model_cfg) for sentence in sentences])
    for batch_size in (4, 64):
        batched = encode(model, tokenizer, sentences, model_cfg, batch_size)
        assert batched.shape == alone.shape and torch.allclose(batched, alone, atol=1e-5)
    assert encode(model, tokenizer, [], model_cfg).shape == (0,)
