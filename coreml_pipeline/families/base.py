"""What every family shares: the interface the stages call, the layer check,
the trace check, output PSNR, and the output-probe loss."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coreml_pipeline.config.schema import DATA_FORMATS, ConfigError, DataConfig, EvaluateConfig, ModelConfig, fail

# The layer types coremltools.optimize.torch compresses; weights anywhere else would stay float.
from coreml_pipeline.model import COMPRESSIBLE as SUPPORTED_LAYERS


def torch_device(cfg: ModelConfig) -> torch.device:
    """model.device resolved: auto is CUDA when torch sees a GPU, else the CPU."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available[cfg.device]:
        raise ConfigError(f"config error: model.device={cfg.device!r} is not allowed; torch sees no {cfg.device} "
                          "device here (allowed: auto, cpu)")
    return torch.device(cfg.device)


def to_device(value: Any, device: torch.device) -> Any:
    """A sample (tensors, possibly in nested mappings) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return type(value)({key: to_device(item, device) for key, item in value.items()})
    return value


def psnr(output: np.ndarray, reference: np.ndarray) -> float:
    """PSNR of ``output`` against ``reference`` as Apple's ml-stable-diffusion reports
    it (python_coreml_stable_diffusion.torch2coreml.compute_psnr): peak = max |reference|,
    noise = RMS of the difference."""
    peak = float(np.abs(reference).max())
    rms = float(np.sqrt(np.mean((output.astype(np.float64) - reference.astype(np.float64)) ** 2)))
    return 20 * math.log10((peak + 1e-5) / (rms + 1e-10))


def probe_loss(output: torch.Tensor, seed: int) -> torch.Tensor:
    """<output, r> with a seeded Gaussian probe r. Its squared gradient is, in expectation
    over r, diag(J^T J): the Gauss-Newton diagonal of the output MSE, i.e. the weight
    sensitivity of output PSNR. (The MSE to the float output itself would have zero
    gradient at the float model, so it cannot serve as the calibration loss.)"""
    generator = torch.Generator().manual_seed(seed)
    probe = torch.randn(output.shape, generator=generator, dtype=output.dtype).to(output.device)
    return (output * probe).sum()


@dataclass
class Scores:
    """What evaluate writes for a family: DVC metrics, the per-layer table, per-sample plot
    rows (float against compressed) and the one size/quality row `dvc plots diff` overlays."""

    metrics: dict[str, Any]
    layers: list[dict]
    per_sample: list[dict]
    tradeoff: dict[str, Any]


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


class Family:
    """The interface every stage uses. Samples are dicts of batch-1 tensors keyed by
    the traced function's input names (plus extras such as ``label``)."""

    # The family's name: model.family, and the name of its module in coreml_pipeline/families/.
    name = ""
    # Its model options: a ModelConfig subclass whose check() holds their rules.
    config: type[ModelConfig] = ModelConfig
    # The data.format values it calibrates and evaluates on.
    data_formats: tuple[str, ...] = DATA_FORMATS
    # The network's attribute inside the traced wrapper: torch names a weight <prefix>_<param path>.
    prefix = "model"
    output_name = "output"
    # The config key that names the network (in error messages).
    source_key = "source"
    # The metric compare() reports as ``quality`` (the headline every family's metrics carry), and
    # the values it can take (checked where a user states a target for it).
    quality_name = "psnr_db"
    quality_range = (0.0, math.inf)
    # A stack of repeated blocks, which coremltools' LayerwiseCompressor (SparseGPT, GPTQ) walks
    # (the family then defines layerwise_blocks and layerwise_samples); the others run its
    # algorithms layer by layer (coreml_pipeline/techniques/layerwise.py).
    block_stack = False

    def __init__(self, model: ModelConfig, data: DataConfig | None = None):
        self.cfg = model
        self.data = data

    @classmethod
    def fine_tunes(cls) -> bool:
        """Whether the finetune stage can train it: the family defines train_batches."""
        return cls.train_batches is not Family.train_batches

    @classmethod
    def check_sections(cls, sections: dict[str, Any]) -> None:
        """Its rules on the other sections: the data it reads, and fine-tuning only where it can train."""
        data = sections.get("data")
        if data is not None and data.format not in cls.data_formats:
            fail("data.format", data.format, f"allowed with model.family={cls.name}: {', '.join(cls.data_formats)} "
                 "(conf/model/ selects the matching data config)")
        finetune = sections.get("finetune")
        if finetune is not None and finetune.method != "none" and not cls.fine_tunes():
            fail("finetune.method", finetune.method, f"allowed with model.family={cls.name}: none (it has no training "
                 "data and loss for fine-tuning; compress post-training, with calibration data where the method "
                 "takes it)")

    # --- what each family defines -------------------------------------------------
    def load_float(self) -> torch.nn.Module:
        raise NotImplementedError

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """A module whose forward takes the inputs positionally and returns one tensor."""
        raise NotImplementedError

    def example_inputs(self, seq_len: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def calibration_samples(self, num_samples: int, seed: int) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def eval_samples(self) -> list[dict[str, torch.Tensor]]:
        raise NotImplementedError

    def loss(self, module: torch.nn.Module, sample: dict) -> torch.Tensor:
        """The loss whose per-sample squared gradients are the sensitivities."""
        raise NotImplementedError

    def train_batches(self, batch_size: int, steps: int, seed: int):
        """``steps`` shuffled mini-batches of its training split, for the finetune stage (optional)."""
        raise NotImplementedError

    def train_loss(self, module: torch.nn.Module, batch: dict) -> torch.Tensor:
        """The loss minimised while fine-tuning, averaged over the batch."""
        raise NotImplementedError

    def summary(self, output: torch.Tensor, sample: dict) -> dict[str, torch.Tensor]:
        """What is kept of one float output to score compressed outputs against."""
        return {"output": output.detach().float().cpu()[0]}

    def reference_metrics(self, reference: dict[str, torch.Tensor], samples: list[dict]) -> dict[str, Any]:
        """Quality of the float model itself (for the baseline report)."""
        return {}

    def compare(self, compressed: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], samples: list[dict],
                float_report: dict, cfg: EvaluateConfig) -> tuple[dict[str, Any], list[dict]]:
        """(metrics incl. ``quality`` and ``meets_target``, per-sample plot rows with float/compressed)."""
        return psnr_compare(compressed, reference, cfg)

    def divergence(self, output: torch.Tensor, reference: torch.Tensor) -> float:
        """How far one raw output of a compressed network is from the float network's: continuous, 0
        at equality (the mixed-bit generator's per-layer cost, where agreement on a few samples would
        not tell layers apart). Logits: KL(float || compressed) of the distributions over the last
        axis, averaged over the other positions; other outputs: squared error relative to the float
        output's energy (what PSNR measures, without its peak)."""
        if self.output_name == "logits":
            log_q, log_p = (torch.log_softmax(x.double(), -1) for x in (output, reference))
            return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
        reference = reference.double()
        return float((output.double() - reference).pow(2).sum() / reference.pow(2).sum().clamp_min(1e-30))

    # --- what the baseline, evaluate and coreml_compress stages ask of a family -----------
    # Defaults score a family by its own outputs on eval_samples (summary, compare); a family
    # with other scores (the sentence embedder: STS-B pairs) overrides these three.
    def float_reference(self, network: torch.nn.Module, cfg: EvaluateConfig, device: torch.device, log
                        ) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, int]]:
        """(float outputs kept to score against, float quality, sample counts) for the baseline."""
        from coreml_pipeline import runtime

        samples = self.eval_samples()
        with runtime.timed(log, f"float outputs on {len(samples)} samples on {device}"):
            reference = self.run(network, samples, device)
        quality = self.reference_metrics(reference, samples)
        log.info("float model: %s", quality)
        return reference, quality, {"num_samples": len(samples)}

    def score(self, model: torch.nn.Module, reference: dict[str, torch.Tensor], float_report: dict, readback: dict,
              cfg: EvaluateConfig, device: torch.device, package: Path, log) -> Scores:
        """The compressed weights scored against the float outputs, plus size (the evaluate stage)."""
        from coreml_pipeline import runtime
        from coreml_pipeline.evaluation import coreml_outputs, evaluate_family

        samples = self.eval_samples()
        with runtime.timed(log, f"evaluate {len(samples)} samples on {device}"):
            metrics, rows, per_sample = evaluate_family(self, model, self.load_float(), samples, reference,
                                                        float_report, cfg, readback, device)
        if sys.platform == "darwin":
            coreml = coreml_outputs(package, self, samples)
            if coreml is not None:
                metrics["coreml_quality"] = self.compare(coreml, reference, samples, float_report, cfg)[0]["quality"]
        metrics["evaluated"] = self.evaluated(readback)
        log.info("%s: quality %s, %d bytes (%.1f%% of float16), meets target: %s", self.name,
                 metrics["quality"], metrics["package_bytes"], 100 * metrics["size_ratio"], metrics["meets_target"])
        return Scores(metrics, rows, per_sample,
                      {"size_mb": round(metrics["package_bytes"] / 1e6, 4), "quality": metrics["quality"]})

    def score_package(self, network: torch.nn.Module, reference: dict[str, torch.Tensor], float_report: dict,
                      cfg: EvaluateConfig, device: torch.device, size: int, decoded: int, run: dict) -> dict:
        """A Core ML-side package's decoded weights (already in ``network``) scored as evaluate
        scores the torch side (the coreml_compress stage); ``run`` says how it was compressed."""
        samples = self.eval_samples()
        metrics, _ = self.compare(self.run(network, samples, device), reference, samples, float_report, cfg)
        return {**metrics, "package_bytes": size, "size_ratio": round(size / float_report["package_bytes"], 4),
                "weights_decoded": decoded, **run}

    @staticmethod
    def evaluated(readback: dict) -> str:
        if sys.platform == "darwin":
            return "torch weights and the Core ML package itself (macOS)"
        return ("torch weights proven equal to the .mlpackage's (read back, max abs diff "
                f"{readback['max_abs_diff']:.3g}); Core ML prediction needs macOS")

    # --- shared --------------------------------------------------------------------
    def weights_location(self) -> str:
        """Where the float weights come from, for the provenance record (a folder, file or id)."""
        from coreml_pipeline.model import resolve_source

        return resolve_source(self.cfg.source)

    @property
    def source_value(self) -> Any:
        return getattr(self.cfg, self.source_key)

    def config_error(self, what: str, exc: BaseException | None = None) -> ConfigError:
        detail = f" ({first_line(exc)})" if exc is not None else ""
        return ConfigError(f"config error: model.{self.source_key}={self.source_value!r} is not allowed "
                           f"(model.family={self.name}): {what}{detail}")

    def input_names(self) -> list[str]:
        if not hasattr(self, "_input_names"):
            self._input_names = list(self.example_inputs(8))
        return self._input_names

    def call(self, wrapped: torch.nn.Module, sample: dict, device: torch.device | None = None) -> torch.Tensor:
        names = self.input_names()
        return wrapped(*(sample[name].to(device) if device is not None else sample[name] for name in names))

    def check_layers(self, module: torch.nn.Module) -> None:
        """Every weight matrix must sit in a layer coremltools can compress."""
        unsupported = []
        for name, child in module.named_modules():
            if isinstance(child, SUPPORTED_LAYERS):
                continue
            for param_name, param in child.named_parameters(recurse=False):
                if param.ndim >= 2:
                    unsupported.append(f"{name}.{param_name} ({type(child).__name__})")
        if unsupported:
            raise self.config_error(
                f"{len(unsupported)} weight(s) sit in layer types coremltools cannot compress, e.g. "
                f"{', '.join(unsupported[:3])}; allowed: weights of "
                f"{', '.join(t.__name__ for t in SUPPORTED_LAYERS)} layers")

    @torch.no_grad()
    def trace(self, module: torch.nn.Module, seq_len: int) -> tuple[torch.jit.ScriptModule, dict[str, torch.Tensor]]:
        """torch.jit.trace of the wrapped network on the example inputs, and those inputs."""
        example = self.example_inputs(seq_len)
        return torch.jit.trace(self.wrap(module).eval(), tuple(example.values()), strict=False), example

    def check_traceable(self, module: torch.nn.Module, seq_len: int) -> None:
        """Trace the float network once, before any compression work."""
        try:
            self.trace(module, seq_len)
        except Exception as exc:  # noqa: BLE001 - any failure means it cannot be converted
            raise self.config_error("its forward cannot be traced with torch.jit.trace for conversion", exc) from None

    @torch.no_grad()
    def run(self, module: torch.nn.Module, samples: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
        """Summaries of the network's outputs on ``samples``, stacked per key."""
        wrapped = self.wrap(module).eval().to(device)
        rows = [self.summary(self.call(wrapped, sample, device), sample) for sample in samples]
        module.cpu()
        return {key: torch.stack([row[key] for row in rows]).contiguous() for key in rows[0]}


def psnr_compare(compressed: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                 cfg: EvaluateConfig) -> tuple[dict[str, Any], list[dict]]:
    values = [psnr(c.numpy(), r.numpy()) for c, r in zip(compressed["output"], reference["output"])]
    rms = [(float(c.pow(2).mean().sqrt()), float(r.pow(2).mean().sqrt()))
           for c, r in zip(compressed["output"], reference["output"])]
    cosine = torch.nn.functional.cosine_similarity(compressed["output"].flatten(1), reference["output"].flatten(1))
    metrics = {
        "psnr_db": round(float(np.mean(values)), 4),
        "min_psnr_db": round(float(np.min(values)), 4),
        "mean_cosine": round(float(cosine.mean()), 6),
        "num_samples": len(values),
    }
    metrics["quality"] = metrics["psnr_db"]
    metrics["meets_target"] = bool(metrics["min_psnr_db"] >= cfg.min_psnr_db)
    rows = [{"float": round(f, 6), "compressed": round(c, 6), "psnr_db": round(p, 4)}
            for (c, f), p in zip(rms, values)]
    return metrics, rows
