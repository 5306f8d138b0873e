"""sentence_embedding: all-MiniLM-L6-v2 (or any BERT) with mean pooling, scored on STS-B.

Its scoring (STS-B Spearman, embedding cosine, the similarity plot) and its
fine-tuning live in stages/evaluate.py, stages/baseline.py and stages/finetune.py."""

from __future__ import annotations

import torch

from stages.families.base import Family


class SentenceEmbedding(Family):
    name = "sentence_embedding"
    prefix = "bert"
    output_name = "embedding"
    block_stack = True

    def load_float(self) -> torch.nn.Module:
        from stages.model import load_bert

        return load_bert(self.cfg)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        from stages.model import SentenceEncoder

        return SentenceEncoder(module, self.cfg.normalize)

    def example_inputs(self, seq_len: int) -> dict[str, torch.Tensor]:
        return {name: torch.ones((1, seq_len), dtype=torch.int32) for name in ("input_ids", "attention_mask")}

    def calibration_samples(self, num_samples: int, seed: int) -> list[dict]:
        from stages.calibrate import pair_batches
        from stages.data import calibration_pairs
        from stages.model import load_tokenizer

        pairs = calibration_pairs(self.data, num_samples, seed)
        return pair_batches(pairs, load_tokenizer(self.cfg), self.cfg.max_length)

    def loss(self, module: torch.nn.Module, sample: dict) -> torch.Tensor:
        from stages.calibrate import cosine_loss

        return cosine_loss(module, sample)

    def layerwise_blocks(self, module: torch.nn.Module) -> str:
        from stages.model import BERT_BLOCKS

        return BERT_BLOCKS

    def layerwise_samples(self, num_samples: int) -> list[torch.Tensor]:
        from stages.prune import calibration_inputs

        return calibration_inputs(self.cfg, self.data, num_samples, seed=0)
