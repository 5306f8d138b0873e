"""Stage 2, calibrate: per-weight sensitivity for sensitive k-means, computed once.

One backward pass per calibration pair of a cosine-similarity loss (the loss
all-MiniLM was trained with on STS-like data), giving the normalised squared
gradients SKMPalettizer.compute_sensitivity gives, computed in place in
less than half its memory (fisher_sensitivity). They are cached as an artifact so
that every palettize variant reuses them.
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from stages import config, families, runtime
from stages.data import Pairs
from stages.families.base import to_device, torch_device
from stages.model import compressible_weights, load_weights, pool, save_tensors


def pair_batches(pairs: Pairs, tokenizer, max_length: int) -> list[dict[str, torch.Tensor]]:
    batches = []
    for s1, s2, score in zip(pairs.sentence1, pairs.sentence2, pairs.scores):
        batches.append({
            "a": tokenizer(s1, truncation=True, max_length=max_length, return_tensors="pt"),
            "b": tokenizer(s2, truncation=True, max_length=max_length, return_tensors="pt"),
            "label": torch.tensor(score / 5.0),
        })
    return batches


def cosine_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    def embed(tokens):
        hidden = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        return pool(hidden, tokens["attention_mask"])

    cosine = (embed(batch["a"]) * embed(batch["b"])).sum(-1)
    return ((cosine - batch["label"]) ** 2).sum()


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
        for batch in batches:
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


def sensitivity(model: torch.nn.Module, batches: list[dict], loss_fn: Callable = cosine_loss
                ) -> dict[str, torch.Tensor]:
    """Normalised Fisher sensitivity of every Linear, Conv and Embedding weight."""
    wanted = {f"{name}.weight" for name, _ in compressible_weights(model)}
    values = fisher_sensitivity(model, batches, loss_fn, wanted)
    return {name: values[name].cpu() for name in sorted(wanted)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default=str(config.PARAMS))
    parser.add_argument("--weights", required=True, help="pruned weights from the prune stage")
    parser.add_argument("--out", required=True, help="sensitivity (.safetensors)")
    args = parser.parse_args(argv)
    params = config.load(("model", "data", "calibrate", "runtime"), args.params)
    cfg = params["calibrate"]
    log = runtime.setup("calibrate", cfg.seed, params["runtime"])

    family = families.get(params["model"], params["data"])
    device = torch_device(params["model"])
    batches = [to_device(batch, device) for batch in family.calibration_samples(cfg.num_samples, cfg.seed)]
    model = load_weights(params["model"], args.weights).to(device)
    with runtime.timed(log, f"sensitivity from {len(batches)} samples on {device}"):
        values = sensitivity(model, batches, family.loss)
    save_tensors(values, args.out)
    log.info("wrote %s (%d tensors)", args.out, len(values))


if __name__ == "__main__":
    raise SystemExit(runtime.run_cli(main))
