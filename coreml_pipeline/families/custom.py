"""custom: any nn.Module, named by import path (model.module._target_), with a
function that makes its example input (model.example_inputs._target_, called
with seed=<int>). Calibration and evaluation inputs are that function's outputs
for fixed seeds; evaluation is output PSNR against the float module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from coreml_pipeline.config.schema import ModelConfig, check_import_path, check_state_dict_file, fail
from coreml_pipeline.families import register
from coreml_pipeline.families.base import Family, probe_loss

EVAL_SAMPLES = 16  # when data.eval_max_pairs is null


def load_state(module: torch.nn.Module, path: str) -> None:
    """A state dict from .safetensors, or from a torch.save file (tensors only)."""
    if Path(path).suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict(state, strict=True)


class FirstTensor(torch.nn.Module):
    """The module's output, or the first tensor of a tuple/list/dict output."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.model = module

    def forward(self, *inputs):
        out = self.model(*inputs)
        while not isinstance(out, torch.Tensor):
            if isinstance(out, dict) and out:
                out = next(iter(out.values()))
            elif isinstance(out, (tuple, list)) and out:
                out = out[0]
            else:
                raise TypeError(f"forward returned a {type(out).__name__}; allowed: a tensor, or a "
                                "tuple/list/dict whose first item is one")
        return out


@dataclass
class CustomConfig(ModelConfig):
    family: str = "custom"
    # Unused: the network is model.module.
    source: Optional[str] = None
    # {_target_: import.path.to.Module or factory, **its keyword arguments} (hydra.utils.instantiate),
    # a function {_target_: ..., **kwargs} called with seed=<int> that returns the example input
    # (a tensor or a tuple of tensors), and optionally a state dict to load (.safetensors or .pt).
    module: Optional[Dict[str, Any]] = None
    example_inputs: Optional[Dict[str, Any]] = None
    weights: Optional[str] = None

    def check(self, prefix: str = "model") -> None:
        super().check(prefix)
        for key in ("module", "example_inputs"):
            if getattr(self, key) is None:
                fail(f"{prefix}.{key}", None, "allowed with model.family=custom: {_target_: import.path, ...}")
            check_import_path(f"{prefix}.{key}", getattr(self, key))
        check_state_dict_file(f"{prefix}.weights", self.weights)

    def check_source(self, prefix: str) -> None:
        """None to check: the network is model.module."""


@register
class Custom(Family):
    name = "custom"
    config = CustomConfig
    source_key = "module"

    def load_float(self) -> torch.nn.Module:
        from hydra.utils import instantiate

        try:
            module = instantiate(self.cfg.module)
        except Exception as exc:  # noqa: BLE001 - the user's constructor
            raise self.config_error("it could not be built", exc) from None
        if not isinstance(module, torch.nn.Module):
            raise self.config_error(f"it built a {type(module).__name__}, not a torch.nn.Module")
        if self.cfg.weights:
            try:
                load_state(module, str(Path(self.cfg.weights).expanduser()))
            except (RuntimeError, OSError, ValueError) as exc:
                raise ValueError(f"config error: model.weights={self.cfg.weights!r} does not load into "
                                 f"model.module: {exc}") from None
        return module.eval()

    def weights_location(self) -> str:
        return str(Path(self.cfg.weights).expanduser()) if self.cfg.weights else f"module:{self.cfg.module['_target_']}"

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return FirstTensor(module)

    def _inputs(self, seed: int) -> dict[str, torch.Tensor]:
        from hydra.utils import instantiate

        try:
            value = instantiate(self.cfg.example_inputs, seed=seed)
        except Exception as exc:  # noqa: BLE001 - the user's function
            raise ValueError(f"config error: model.example_inputs={self.cfg.example_inputs!r} failed "
                             f"({type(exc).__name__}: {exc}); allowed: a function taking seed=<int> that returns "
                             "a tensor or a tuple of tensors") from None
        values = (value,) if isinstance(value, torch.Tensor) else tuple(value)
        if not values or not all(isinstance(v, torch.Tensor) for v in values):
            raise ValueError(f"config error: model.example_inputs={self.cfg.example_inputs!r} returned "
                             f"{type(value).__name__}; allowed: a tensor or a tuple of tensors")
        return {f"input_{index}": tensor for index, tensor in enumerate(values)}

    def example_inputs(self, seq_len: int) -> dict[str, torch.Tensor]:
        return self._inputs(0)

    def calibration_samples(self, num_samples: int, seed: int) -> list[dict]:
        return [{**self._inputs(1000 * (seed + 1) + index), "probe_seed": torch.tensor(index)}
                for index in range(num_samples)]

    def eval_samples(self) -> list[dict]:
        return [self._inputs(index) for index in range(self.data.eval_max_pairs or EVAL_SAMPLES)]

    def loss(self, module: torch.nn.Module, sample: dict) -> torch.Tensor:
        device = next(module.parameters()).device
        return probe_loss(self.call(self.wrap(module), sample, device), int(sample["probe_seed"]))
