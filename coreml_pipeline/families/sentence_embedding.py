"""sentence_embedding: all-MiniLM-L6-v2 (or any BERT) with mean pooling, scored on STS-B.

Everything the sentence embedder is lives here: its network (BertModel plus
mean pooling), its data (STS-B pairs, families/stsb.py), its calibration loss
(the cosine-similarity loss it was trained with), and its scores (STS-B
Spearman, embedding cosine, the similarity plot). The stages call it through
the Family interface like every other family."""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coreml_pipeline import runtime
from coreml_pipeline.config.schema import (
    DataConfig,
    EvaluateConfig,
    ModelConfig,
    check_choice,
    check_positive_int,
    fail,
)
from coreml_pipeline.evaluation import layer_table, size_metrics
from coreml_pipeline.families import register
from coreml_pipeline.families.base import Family, Scores
from coreml_pipeline.families.stsb import Pairs, calibration_pairs, eval_pairs, load_pairs
from coreml_pipeline.model import BERT_BLOCKS, load_tokenizer, resolve_source

POOLINGS = ("mean",)


@dataclass
class SentenceEmbeddingConfig(ModelConfig):
    family: str = "sentence_embedding"
    # Tokens per sentence.
    max_length: int = 128
    pooling: str = "mean"
    normalize: bool = True

    def check(self, prefix: str = "model") -> None:
        super().check(prefix)
        check_positive_int(f"{prefix}.max_length", self.max_length)
        if self.max_length > 512:
            fail(f"{prefix}.max_length", self.max_length, "allowed: 1..512 (BERT position embeddings)")
        check_choice(f"{prefix}.pooling", self.pooling, POOLINGS)


@register
class SentenceEmbedding(Family):
    name = "sentence_embedding"
    config = SentenceEmbeddingConfig
    data_formats = ("stsb", "pairs")
    prefix = "bert"
    output_name = "embedding"
    # STS Spearman x 100 on the evaluation pairs.
    quality_name = "sts_spearman"
    quality_range = (-100.0, 100.0)
    block_stack = True

    def load_float(self) -> torch.nn.Module:
        return load_bert(self.cfg)

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return SentenceEncoder(module, self.cfg.normalize)

    def example_inputs(self, seq_len: int) -> dict[str, torch.Tensor]:
        return {name: torch.ones((1, seq_len), dtype=torch.int32) for name in ("input_ids", "attention_mask")}

    def calibration_samples(self, num_samples: int, seed: int) -> list[dict]:
        pairs = calibration_pairs(self.data, num_samples, seed)
        return pair_batches(pairs, load_tokenizer(self.cfg), self.cfg.max_length)

    def loss(self, module: torch.nn.Module, sample: dict) -> torch.Tensor:
        return cosine_loss(module, sample)

    def train_batches(self, batch_size: int, steps: int, seed: int):
        """Pairs of the STS-B train split (data.train_file), tokenized per mini-batch."""
        pairs = load_pairs(self.data, self.data.train_file)
        return pair_training_batches(pairs, load_tokenizer(self.cfg), self.cfg.max_length, batch_size, steps, seed)

    def train_loss(self, module: torch.nn.Module, batch: dict) -> torch.Tensor:
        return mean_cosine_loss(module, batch)

    def layerwise_blocks(self, module: torch.nn.Module) -> str:
        return BERT_BLOCKS

    def layerwise_samples(self, num_samples: int) -> list[torch.Tensor]:
        return calibration_inputs(self.cfg, self.data, num_samples, seed=0)

    # --- what the baseline, evaluate and coreml_compress stages ask of it ---------------
    def pair_scores(self, network: torch.nn.Module, batch_size: int) -> tuple[Pairs, torch.Tensor, float]:
        """(evaluation pairs, their embeddings by ``network``, STS-B Spearman x100)."""
        pairs = eval_pairs(self.data)
        embeddings = encode(network, load_tokenizer(self.cfg), pairs.sentences(), self.cfg, batch_size)
        return pairs, embeddings, sts_spearman(embeddings, pairs)

    def float_reference(self, network: torch.nn.Module, cfg: EvaluateConfig, device: torch.device, log
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, int]]:
        with runtime.timed(log, "float embeddings of the evaluation pairs"):
            pairs, embeddings, spearman = self.pair_scores(network, cfg.batch_size)
        log.info("float STS-B Spearman x100: %.2f", spearman)
        return {"embeddings": embeddings.contiguous()}, {"spearman": spearman}, {"num_pairs": len(pairs)}

    def score(self, model: torch.nn.Module, reference: dict[str, torch.Tensor], float_report: dict, readback: dict,
              cfg: EvaluateConfig, device: torch.device, package: Path, log) -> Scores:
        float_embeddings = reference["embeddings"]
        pairs = eval_pairs(self.data)
        tokenizer = load_tokenizer(self.cfg)
        with runtime.timed(log, f"evaluate {len(pairs)} pairs"):
            metrics, rows, similarities = evaluate(model, self.load_float(), tokenizer, pairs, float_embeddings,
                                                   self.cfg, cfg, readback, float_report)
        if sys.platform == "darwin":
            coreml = coreml_embeddings(package, tokenizer, pairs.sentences(), readback["seq_len"])
            metrics["coreml_sts_spearman"] = round(sts_spearman(coreml, pairs), 4)
        metrics["evaluated"] = self.evaluated(readback)
        reference_similarities = pair_similarities(float_embeddings, len(pairs))
        per_sample = [{"float": round(float(f), 6), "compressed": round(float(c), 6), "human": s}
                      for f, c, s in zip(reference_similarities, similarities, pairs.scores)]
        tradeoff = {"size_mb": round(metrics["package_bytes"] / 1e6, 4), "sts_spearman": metrics["sts_spearman"],
                    "mean_cosine": metrics["mean_cosine"], "quality": metrics["sts_spearman"]}
        log.info("STS-B %.2f (float %.2f), mean cosine %.4f, %d bytes (%.1f%% of float16), meets target: %s",
                 metrics["sts_spearman"], metrics["float_sts_spearman"], metrics["mean_cosine"],
                 metrics["package_bytes"], 100 * metrics["size_ratio"], metrics["meets_target"])
        return Scores(metrics, rows, per_sample, tradeoff)

    def score_package(self, network: torch.nn.Module, reference: dict[str, torch.Tensor], float_report: dict,
                      cfg: EvaluateConfig, device: torch.device, size: int, decoded: int, run: dict) -> dict:
        pairs, embeddings, spearman = self.pair_scores(network, cfg.batch_size)
        return {
            **{key: run[key] for key in ("enabled", "steps", "data_free_substitutes")},
            "sts_spearman": round(spearman, 4),
            "spearman_drop": round(float_report["spearman"] - spearman, 4),
            **{k: round(v, 6) for k, v in fidelity(embeddings, reference["embeddings"], len(pairs)).items()},
            "package_bytes": size,
            "size_ratio": round(size / float_report["package_bytes"], 4),
            "compression_seconds": run["compression_seconds"],
            "weights_decoded": decoded,
            "num_pairs": len(pairs),
            "quality": round(spearman, 4),  # the headline every family's metrics carry
        }


def load_bert(cfg: ModelConfig) -> torch.nn.Module:
    from transformers import BertModel

    model = BertModel.from_pretrained(resolve_source(cfg.source), add_pooling_layer=False, attn_implementation="eager")
    model.config.use_cache = False
    return model.eval()


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    summed = (hidden * mask).sum(dim=1)
    pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


class SentenceEncoder(torch.nn.Module):
    """BertModel + mean pooling (+ L2 norm): the function that is traced and shipped."""

    def __init__(self, bert: torch.nn.Module, normalize: bool = True):
        super().__init__()
        self.bert = bert
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(hidden, attention_mask, self.normalize)


def tokenize(tokenizer, sentences: str | list[str], max_length: int, padding: str = "longest", tensors: str = "pt"):
    """The embedder's one tokenizing path: truncated to ``max_length``, padded as asked (a single
    sentence is never padded by "longest"), as torch ("pt") or numpy ("np") arrays."""
    return tokenizer(sentences, padding=padding, truncation=True, max_length=max_length, return_tensors=tensors)


@torch.no_grad()
def encode(
    bert: torch.nn.Module, tokenizer, sentences: list[str], cfg: ModelConfig, batch_size: int = 64
) -> torch.Tensor:
    """Embeddings of ``sentences`` (float32, one row each, in their order). Batches hold sentences of
    similar length (sorted by token count, ties in input order): each batch is padded to its longest
    sentence, and on STS-B test this pads 40 k tokens instead of 73 k in input order."""
    if not sentences:
        return torch.empty(0)
    encoder = SentenceEncoder(bert, cfg.normalize).eval()
    lengths = [len(ids) for ids in tokenize(tokenizer, sentences, cfg.max_length, False, None)["input_ids"]]
    order = sorted(range(len(sentences)), key=lengths.__getitem__)
    out = []
    for start in runtime.progress(range(0, len(sentences), batch_size), "embeddings", unit="batch"):
        batch = tokenize(tokenizer, [sentences[i] for i in order[start:start + batch_size]], cfg.max_length)
        out.append(encoder(batch["input_ids"], batch["attention_mask"]))
    position = sorted(range(len(order)), key=order.__getitem__)  # each sentence's row in the sorted output
    return torch.cat(out)[position]


def pair_batches(pairs: Pairs, tokenizer, max_length: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for s1, s2, score in zip(pairs.sentence1, pairs.sentence2, pairs.scores):
        batches.append({
            "a": tokenize(tokenizer, s1, max_length),
            "b": tokenize(tokenizer, s2, max_length),
            "label": torch.tensor(score / 5.0),
        })
    return batches


def pair_training_batches(pairs: Pairs, tokenizer, max_length: int, batch_size: int, steps: int, seed: int):
    """``steps`` shuffled mini-batches of pairs (epochs repeat as needed)."""
    order: list[int] = []
    rng = random.Random(seed)
    for _ in range(steps):
        if len(order) < batch_size:
            epoch = list(range(len(pairs)))
            rng.shuffle(epoch)
            order += epoch
        chosen, order = order[:batch_size], order[batch_size:]
        yield {"a": tokenize(tokenizer, [pairs.sentence1[i] for i in chosen], max_length),
               "b": tokenize(tokenizer, [pairs.sentence2[i] for i in chosen], max_length),
               "label": torch.tensor([pairs.scores[i] / 5.0 for i in chosen])}


def cosine_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    def embed(tokens):
        hidden = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        return pool(hidden, tokens["attention_mask"])

    cosine = (embed(batch["a"]) * embed(batch["b"])).sum(-1)
    return ((cosine - batch["label"]) ** 2).sum()


def mean_cosine_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """The calibration loss averaged over a batch of pairs: what fine-tuning minimises."""
    return cosine_loss(model, batch) / len(batch["label"])


def pair_similarities(embeddings: torch.Tensor, num_pairs: int) -> np.ndarray:
    """Cosine of each pair; rows are [all sentence1..., all sentence2...]."""
    a, b = embeddings[:num_pairs], embeddings[num_pairs:]
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).numpy()


def sts_spearman(embeddings: torch.Tensor, pairs: Pairs) -> float:
    """STS-B score: Spearman x100 between pair cosines and the human scores."""
    from scipy.stats import spearmanr  # scipy.stats takes seconds to import; only scoring needs it

    return float(spearmanr(pair_similarities(embeddings, len(pairs)), pairs.scores).statistic * 100)


def fidelity(compressed: torch.Tensor, reference: torch.Tensor, num_pairs: int) -> dict[str, float]:
    from scipy.stats import spearmanr

    cosine = torch.nn.functional.cosine_similarity(compressed, reference, dim=-1)
    similarity_rho = spearmanr(pair_similarities(compressed, num_pairs), pair_similarities(reference, num_pairs))
    return {
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "similarity_spearman": float(similarity_rho.statistic),
    }


def coreml_embeddings(package: Path, tokenizer, sentences: list[str], seq_len: int) -> torch.Tensor:
    """Run the .mlpackage itself (macOS only: Linux has no Core ML runtime)."""
    import coremltools as ct

    mlmodel = ct.models.MLModel(str(package))
    rows = []
    for sentence in sentences:
        tokens = tokenize(tokenizer, sentence, seq_len, padding="max_length", tensors="np")
        out = mlmodel.predict({name: tokens[name].astype(np.int32) for name in ("input_ids", "attention_mask")})
        rows.append(torch.from_numpy(np.asarray(out["embedding"], dtype=np.float32).reshape(-1)))
    return torch.stack(rows)


def evaluate(model, reference, tokenizer, pairs: Pairs, float_embeddings: torch.Tensor, model_cfg: ModelConfig,
             cfg: EvaluateConfig, readback: dict, float_report: dict) -> tuple[dict, list[dict], np.ndarray]:
    embeddings = encode(model, tokenizer, pairs.sentences(), model_cfg, cfg.batch_size)
    spearman = sts_spearman(embeddings, pairs)
    rows = layer_table(model, reference, readback)
    metrics = {
        "sts_spearman": round(spearman, 4),
        "float_sts_spearman": round(float_report["spearman"], 4),
        "spearman_drop": round(float_report["spearman"] - spearman, 4),
        **{k: round(v, 6) for k, v in fidelity(embeddings, float_embeddings, len(pairs)).items()},
        **size_metrics(rows, readback, float_report),
        "num_pairs": len(pairs),
    }
    metrics["quality"] = metrics["sts_spearman"]  # the headline every family's metrics carry
    metrics["meets_target"] = bool(metrics["spearman_drop"] <= cfg.max_spearman_drop
                                   and metrics["mean_cosine"] >= cfg.min_mean_cosine)
    return metrics, rows, pair_similarities(embeddings, len(pairs))


def calibration_inputs(model_cfg: ModelConfig, data_cfg: DataConfig, num_samples: int, seed: int) -> list[torch.Tensor]:
    """Unpadded [1, L] input_ids: the GPT input cacher calls model(batch) with no
    attention mask, so padding would pollute the layer Hessians."""
    tokenizer = load_tokenizer(model_cfg)
    sentences = calibration_pairs(data_cfg, num_samples, seed).sentences()[:num_samples]
    return [tokenize(tokenizer, s, model_cfg.max_length)["input_ids"] for s in sentences]
