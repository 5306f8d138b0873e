"""The sentence-embedding model: loading, encoding, and weights with their
coremltools compression metadata.

The compressible network is a transformers ``BertModel`` without its pooler
(the pooled output is never used, and SKMPalettizer needs every compressed
parameter to get a gradient). Sentence embeddings are the mean of the token
states over the attention mask, L2-normalised, as in sentence-transformers.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Iterable

# Nothing here may reach a hub at run time; a hub id works only from a filled cache
# unless the user clears these.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch
from safetensors.torch import load_file, save_file

from stages.runtime import partial_path
from stages.schema import PACKAGED_PREFIX, ModelConfig

COREML_PREFIX = "_COREML_"
# BertModel's repeated blocks: what coremltools' LayerwiseCompressor (SparseGPT, GPTQ) walks.
BERT_BLOCKS = r"encoder\.layer\.\d+"
# coremltools' CompressionType values, as stored in the compression_type buffer.
PRUNING, PALETTIZATION, QUANTIZATION = 1, 2, 3


def resolve_source(source: str) -> str:
    """A directory or hub id that ``from_pretrained`` accepts."""
    if source.startswith(PACKAGED_PREFIX):
        package = importlib.import_module(source[len(PACKAGED_PREFIX):])
        return str(package.get_model_path())
    local = Path(source).expanduser()
    return str(local) if local.exists() else source


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_source(cfg.source))


def load_float_model(cfg: ModelConfig) -> torch.nn.Module:
    """The float network of model.family (stages/families/): the module whose
    state dict every stage reads and writes."""
    from stages import families

    return families.get(cfg).load_float()


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


def tokenize(tokenizer, sentences: list[str], max_length: int, padding="longest"):
    return tokenizer(sentences, padding=padding, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def encode(
    bert: torch.nn.Module, tokenizer, sentences: list[str], cfg: ModelConfig, batch_size: int = 64
) -> torch.Tensor:
    """Embeddings of ``sentences`` (float32, one row each)."""
    encoder = SentenceEncoder(bert, cfg.normalize).eval()
    out = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenize(tokenizer, sentences[start:start + batch_size], cfg.max_length)
        out.append(encoder(batch["input_ids"], batch["attention_mask"]))
    return torch.cat(out) if out else torch.empty(0)


def compressed_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters plus the ``_COREML_`` metadata buffers, as contiguous tensors."""
    return {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write safetensors atomically. No header metadata: safetensors serialises
    it in a random (hash map) order, which would change the file's hash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    save_file(tensors, str(partial))
    os.replace(partial, path)


def save_weights(model: torch.nn.Module, path: str | Path) -> None:
    """safetensors, not pickles: a pickled module that went through MagnitudePruner
    can serialise its pruned-only original (see shared notes)."""
    save_tensors(compressed_state_dict(model), path)


def register_metadata(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Re-register ``<module>._COREML_/<param>/<key>`` buffers, which a fresh
    BertModel does not have, so that ct.convert sees the compression again."""
    for key, value in state.items():
        if COREML_PREFIX not in key:
            continue
        module_name, _, buffer_name = key.partition(COREML_PREFIX)
        module = model.get_submodule(module_name.rstrip(".")) if module_name else model
        module.register_buffer(COREML_PREFIX + buffer_name, value)


def load_weights(cfg: ModelConfig, path: str | Path) -> torch.nn.Module:
    """The float architecture with the weights and compression metadata at ``path``."""
    model = load_float_model(cfg)
    state = load_file(str(path))
    register_metadata(model, state)
    model.load_state_dict(state, strict=True)
    return model.eval()


COMPRESSIBLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)


def compressible_weights(model: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Module]]:
    """(module name, module) of every Linear, Conv and Embedding: what this pipeline compresses."""
    for name, module in model.named_modules():
        if isinstance(module, COMPRESSIBLE):
            yield name, module


def compression_types(module: torch.nn.Module) -> list[int]:
    """The coremltools compressions applied to ``module.weight``, in order ([] for none)."""
    kinds = getattr(module, f"{COREML_PREFIX}/weight/compression_type", None)
    return [] if kinds is None else [int(k) for k in kinds.tolist()]
