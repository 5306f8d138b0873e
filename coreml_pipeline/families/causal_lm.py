"""causal_lm: a transformers causal language model, traced for a fixed context.

Calibration and evaluation read text (data.format=text): a plain text file or the text
column of a table file (data.columns.text). The text is
tokenized once and cut into windows of model.max_length tokens. Evaluation is
perplexity on the held-out windows and agreement of next-token predictions
(argmax) with the float model."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from coreml_pipeline.config.schema import EvaluateConfig, ModelConfig, check_positive_int, fail
from coreml_pipeline.families import register
from coreml_pipeline.families.base import Family
from coreml_pipeline.model import GGUF_PREFIX, gguf_file


@dataclass
class CausalLMConfig(ModelConfig):
    family: str = "causal_lm"
    # Also gguf:<path to a .gguf file> or gguf:<installed package holding one> (transformers
    # dequantizes it once; model.gguf_folder caches the result).
    source: Optional[str] = None
    # Tokens per calibration/evaluation window (the context traced and converted).
    max_length: int = 128
    # Greedy generation scored against the float model's: from the first prompt_tokens of the first
    # generation_prompts evaluation windows, generation_tokens new tokens each (0 prompts: off).
    generation_prompts: int = 4
    prompt_tokens: int = 8
    generation_tokens: int = 16

    source_prefixes: ClassVar[tuple[str, ...]] = (GGUF_PREFIX,)
    source_modules: ClassVar[dict] = {"gguf": "gguf"}

    def check(self, prefix: str = "model") -> None:
        super().check(prefix)
        for key in ("max_length", "prompt_tokens", "generation_tokens"):
            check_positive_int(f"{prefix}.{key}", getattr(self, key))
        if not isinstance(self.generation_prompts, int) or self.generation_prompts < 0:
            fail(f"{prefix}.generation_prompts", self.generation_prompts, "allowed: an integer >= 0")
        if self.prompt_tokens >= self.max_length:
            fail(f"{prefix}.prompt_tokens", self.prompt_tokens,
                 f"allowed: fewer than model.max_length={self.max_length} (prompts are cut from its windows)")
        if self.source.startswith(GGUF_PREFIX):
            import importlib.util

            try:
                gguf_file(self.source)
            except OSError as exc:
                fail(f"{prefix}.source", self.source, str(exc))
            if importlib.util.find_spec("accelerate") is None:
                fail(f"{prefix}.source", self.source, "transformers needs accelerate to read GGUF (pip install it)")


def linear_from_conv1d(module: torch.nn.Module) -> int:
    """Replace transformers' Conv1D (GPT-2's attention and MLP projections) by the
    nn.Linear it computes (y = x W + b, W stored transposed): coremltools compresses
    nn.Linear but not Conv1D. Returns how many were replaced."""
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for name, child in list(module.named_modules()):
        if isinstance(child, Conv1D):
            linear = torch.nn.Linear(child.weight.shape[0], child.weight.shape[1])
            with torch.no_grad():
                linear.weight.copy_(child.weight.T)
                linear.bias.copy_(child.bias)
            parent_name, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent_name) if parent_name else module, attr, linear)
            replaced += 1
    return replaced


def untie_output_embedding(model: torch.nn.Module) -> None:
    """Give the LM head its own copy of a tied input embedding: each weight is then
    compressed (and stored in the package) on its own, and safetensors can save them."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and embedding is not None and head.weight is embedding.weight:
        head.weight = torch.nn.Parameter(embedding.weight.detach().clone())
    model.config.tie_word_embeddings = False


class LogitsOfTokens(torch.nn.Module):
    """input_ids (1, L) -> logits (1, L, vocab), causal attention built in.

    The causal mask is passed as a ready 4-D additive mask: transformers' own mask
    builder uses torch.vmap, which torch.jit.trace cannot record."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        dtype = next(self.model.parameters()).dtype
        mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=input_ids.device)
        mask = torch.triu(mask, diagonal=1)[None, None]
        return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


@register
class CausalLM(Family):
    name = "causal_lm"
    config = CausalLMConfig
    data_formats = ("text",)
    output_name = "logits"
    quality_name = "next_token_agreement"
    quality_range = (0.0, 1.0)
    block_stack = True

    def load_float(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        from coreml_pipeline.model import resolve_source

        try:
            model = AutoModelForCausalLM.from_pretrained(resolve_source(self.cfg.source), attn_implementation="eager")
        except (OSError, ValueError, KeyError) as exc:
            raise self.config_error("not a transformers causal LM that loads offline", exc) from None
        model.config.use_cache = False
        linear_from_conv1d(model)
        untie_output_embedding(model)
        return model.eval()

    def weights_location(self) -> str:
        """The GGUF file itself for a gguf: source (its hash is what provenance records), else the folder."""
        if self.cfg.source.startswith(GGUF_PREFIX):
            return str(gguf_file(self.cfg.source))
        return super().weights_location()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return LogitsOfTokens(module)

    def example_inputs(self, seq_len: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.zeros((1, seq_len), dtype=torch.int32)}

    def _windows(self, key: str) -> list[torch.Tensor]:
        """Non-overlapping windows of model.max_length tokens of split data.<key> (a text file or a table's
        text column)."""
        from coreml_pipeline.families.tables import text_of
        from coreml_pipeline.model import load_tokenizer

        file_name = getattr(self.data, key)
        text = text_of(self.data, key)
        ids = load_tokenizer(self.cfg)(text, add_special_tokens=False, return_tensors="pt",
                                       verbose=False)["input_ids"][0]
        length = self.cfg.max_length
        windows = [ids[start:start + length][None] for start in range(0, len(ids) - length + 1, length)]
        if not windows:
            raise ValueError(f"config error: data.{key}={file_name!r} holds {len(ids)} tokens, fewer than one "
                             f"window of model.max_length={length}; allowed: a longer text or a smaller max_length")
        return windows

    def calibration_samples(self, num_samples: int, seed: int) -> list[dict]:
        windows = self._windows("calibration_file")
        random.Random(seed).shuffle(windows)
        return [{"input_ids": ids} for ids in windows[:num_samples]]

    def eval_samples(self) -> list[dict]:
        windows = self._windows("eval_file")
        return [{"input_ids": ids} for ids in windows[:self.data.eval_max_pairs or len(windows)]]

    def layerwise_blocks(self, module: torch.nn.Module) -> str:
        """Regex of the decoder blocks SparseGPT/GPTQ walk: the longest ModuleList
        (model.layers in Llama-style models, transformer.h in GPT-2)."""
        import re

        lists = [(len(child), name) for name, child in module.named_modules()
                 if isinstance(child, torch.nn.ModuleList) and name]
        if not lists:
            raise self.config_error("no stack of decoder blocks (nn.ModuleList) for SparseGPT/GPTQ")
        return rf"{re.escape(max(lists)[1])}\.\d+"

    def layerwise_samples(self, num_samples: int) -> list[torch.Tensor]:
        return [sample["input_ids"] for sample in self.calibration_samples(num_samples, seed=0)]

    def loss(self, module: torch.nn.Module, sample: dict) -> torch.Tensor:
        """Next-token cross-entropy on the window (the language-modelling loss)."""
        ids = sample["input_ids"]
        logits = self.wrap(module)(ids)
        return torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(logits.device), reduction="sum")

    def summary(self, output: torch.Tensor, sample: dict) -> dict[str, torch.Tensor]:
        """Per position: the predicted next token and the negative log-likelihood of the true one
        (not the logits themselves: vocab x context floats per window would not fit on disk)."""
        logits = output[0, :-1].float()
        target = sample["input_ids"][0, 1:].to(logits.device)
        nll = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        return {"next_token": logits.argmax(-1).cpu(), "nll": nll.cpu()}

    def run(self, module: torch.nn.Module, samples: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
        """Per-window summaries, plus the greedy continuations of the first generation_prompts windows'
        first prompt_tokens tokens ("generated": prompts x generation_tokens)."""
        outputs = super().run(module, samples, device)
        prompts = [sample["input_ids"][:, :self.cfg.prompt_tokens] for sample in samples[:self.cfg.generation_prompts]]
        if prompts:
            wrapped = self.wrap(module).eval().to(device)
            outputs["generated"] = torch.cat([greedy(wrapped, ids.to(device), self.cfg.generation_tokens)
                                              for ids in prompts]).cpu()
            module.cpu()
        return outputs

    def reference_metrics(self, reference: dict[str, torch.Tensor], samples: list[dict]) -> dict[str, Any]:
        return {"perplexity": math.exp(float(reference["nll"].double().mean()))}

    def compare(self, compressed: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], samples: list[dict],
                float_report: dict, cfg: EvaluateConfig) -> tuple[dict[str, Any], list[dict]]:
        perplexity = math.exp(float(compressed["nll"].double().mean()))
        agreement = float((compressed["next_token"] == reference["next_token"]).double().mean())
        metrics = {
            "perplexity": round(perplexity, 4),
            "float_perplexity": round(float_report["perplexity"], 4),
            "perplexity_ratio": round(perplexity / float_report["perplexity"], 6),
            "next_token_agreement": round(agreement, 6),
            "num_windows": len(samples),
            "tokens_per_window": int(compressed["nll"].shape[1]) + 1,
        }
        if "generated" in reference and "generated" in compressed:
            metrics.update(generation_agreement(compressed["generated"], reference["generated"]))
        metrics["quality"] = metrics["next_token_agreement"]
        metrics["meets_target"] = bool(agreement >= cfg.min_agreement)
        rows = [{"float": round(math.exp(float(f.double().mean())), 6),
                 "compressed": round(math.exp(float(c.double().mean())), 6)}
                for c, f in zip(compressed["nll"], reference["nll"])]
        return metrics, rows


@torch.no_grad()
def greedy(wrapped: torch.nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """``new_tokens`` greedy continuations of ``ids`` (1, P) through the traced wrapper's forward (no
    KV cache: the contexts are short, and it is the same function that is converted)."""
    for _ in range(new_tokens):
        next_token = wrapped(ids)[:, -1].argmax(-1, keepdim=True).to(ids.dtype)
        ids = torch.cat([ids, next_token], dim=1)
    return ids[:, -new_tokens:]


def generation_agreement(compressed: torch.Tensor, reference: torch.Tensor) -> dict[str, Any]:
    """How far greedy generation follows the float model's: the share of generated tokens before the
    first divergence (1.0: identical continuations), and the share of prompts continued identically."""
    same = (compressed == reference).to(torch.int64)
    prefix = same.cumprod(dim=1).sum(dim=1).double() / reference.shape[1]
    return {"generation_agreement": round(float(prefix.mean()), 6),
            "generations_identical": round(float((prefix == 1).double().mean()), 6),
            "num_generations": int(reference.shape[0])}
