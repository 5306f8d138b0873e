"""Per-weight sensitivity (normalised squared gradients of a family's loss), computed in place
in less memory than coremltools' SKMPalettizer.compute_sensitivity; sensitive k-means reads it."""

from __future__ import annotations

from typing import Callable

import torch

from coreml_pipeline.model import compressible_weights
from coreml_pipeline.runtime import progress

# coremltools' SKMPalettizer._SENSITIVITY_CLIP_THR: sensitivities are clipped to at least this.
SENSITIVITY_FLOOR = 1e-12


def fisher_sensitivity(model: torch.nn.Module, batches: list, loss_fn: Callable, names: set[str]
                       ) -> dict[str, torch.Tensor]:
    """SKMPalettizer.compute_sensitivity's values, computed in place.

    The same math: per-sample squared gradients summed (a square hook on every
    parameter), times 100, divided by the tensor's maximum, zeros raised to the
    smallest non-zero value, clipped at 1e-12. coremltools also round-trips the
    model through torch.save/torch.load and keeps a negated copy of every
    gradient plus a normalised copy of that: 5.2x the float32 model at peak on
    a 200 M-parameter stack (bench/scaling.py). Here only the gradients exist
    beside the model, each normalised in place and freed from the model as it is
    taken. tests/test_compression.py checks the values equal coremltools'."""
    parameters = dict(model.named_parameters())
    missing = names - {name for name, p in parameters.items() if p.requires_grad}
    if missing:
        raise RuntimeError(f"no trainable parameter for {sorted(missing)[:3]}")
    hooks = [p.register_hook(torch.square) for p in parameters.values() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    try:
        for batch in progress(batches, "sensitivity", unit="sample"):
            loss_fn(model, batch).backward()
    finally:
        for hook in hooks:
            hook.remove()
    values = {}
    for name, parameter in parameters.items():
        grad, parameter.grad = parameter.grad, None
        if name not in names:
            continue
        if grad is None:  # SKMPalettizer would crash later on a parameter with no gradient
            raise RuntimeError(f"no sensitivity (no gradient) for {name}")
        grad.mul_(100)
        if not bool(grad.any()):
            grad.fill_(1.0)
        grad.div_(grad.max())
        zero = grad == 0
        if bool(zero.any()):
            grad[zero] = grad[~zero].min()
        values[name] = grad.clamp_(min=SENSITIVITY_FLOOR).contiguous()
    return values


def sensitivity(model: torch.nn.Module, batches: list[dict], loss_fn: Callable
                ) -> dict[str, torch.Tensor]:
    """Normalised Fisher sensitivity of every Linear, Conv and Embedding weight."""
    wanted = {f"{name}.weight" for name, _ in compressible_weights(model)}
    values = fisher_sensitivity(model, batches, loss_fn, wanted)
    return {name: values[name].cpu() for name in sorted(wanted)}
