"""A small user-defined network for the custom model family (conf/model/custom.yaml):
replace the two _target_ paths with your own module and example-input function.

Randomly initialised: it shows the plumbing, not compression quality."""

from __future__ import annotations

import torch


class ConvEncoder(torch.nn.Module):
    """Two convolutions, an MLP head and a tuple output (the pipeline keeps the first tensor)."""

    def __init__(self, channels: int = 16, features: int = 32, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1 = torch.nn.Conv2d(3, channels, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.norm = torch.nn.GroupNorm(4, channels)
        self.head = torch.nn.Sequential(torch.nn.Linear(channels, features), torch.nn.GELU(),
                                        torch.nn.Linear(features, features))

    def forward(self, image: torch.Tensor, scale: torch.Tensor):
        hidden = torch.nn.functional.silu(self.norm(self.conv2(torch.relu(self.conv1(image)))))
        features = self.head(hidden.mean(dim=(2, 3))) * scale
        return features, hidden


def example_inputs(seed: int, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, scale) for one call; the pipeline calls this with fixed seeds."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 3, size, size, generator=generator), torch.ones(1, 1)
