"""Convolution subclasses (EfficientNet-Lite's Conv2dStaticSamePadding) are compressed like nn.Conv2d:
coremltools matches its module_type_configs by exact class name, which skipped them."""

from __future__ import annotations

import logging
from collections import Counter

import coremltools as ct
import pytest
import torch
import torch.nn.functional as F

from coreml_pipeline.config.schema import PruneConfig, QuantizeConfig
from coreml_pipeline.coreml.convert import load_program
from coreml_pipeline.model import PRUNING, QUANTIZATION, compression_types
from coreml_pipeline.techniques.prune import magnitude_prune
from coreml_pipeline.techniques.quantize import linear_quantize


class PaddedConv(torch.nn.Conv2d):
    """A Conv2d subclass with its own forward, as EfficientNet-Lite's same-padding convolution."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = PaddedConv(3, 8, 3, bias=False), torch.nn.BatchNorm2d(8)
        self.depthwise, self.depthwise_bn = PaddedConv(8, 8, 3, groups=8, bias=False), torch.nn.BatchNorm2d(8)
        self.shared, self.shared_bn = torch.nn.Conv2d(8, 8, 1), torch.nn.BatchNorm2d(8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(self.depthwise_bn(self.depthwise(x)))
        y = self.shared(x)
        x = self.shared_bn(y) + y
        return self.head(x.mean((2, 3)))


def net() -> Net:
    torch.manual_seed(0)
    model = Net()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):  # statistics far from identity
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.2, 3)
            module.weight.data.uniform_(0.5, 2)
            module.bias.data.uniform_(-1, 1)
    return model.eval()


def test_convolution_subclasses_are_quantized_and_pruned():
    quantized = linear_quantize(net(), QuantizeConfig(method="linear", dtype="int8", scheme="symmetric",
                                                      granularity="per_channel"))
    assert all(QUANTIZATION in compression_types(getattr(quantized, name))
               for name in ("stem", "depthwise", "shared", "head"))
    pruned = magnitude_prune(net(), PruneConfig(method="magnitude", target_sparsity=0.5))
    for name in ("stem", "depthwise", "shared"):
        assert PRUNING in compression_types(getattr(pruned, name))
        assert float((getattr(pruned, name).weight == 0).float().mean()) == pytest.approx(0.5, abs=0.05)


def test_int8_convolution_subclasses_reach_the_package_as_int8(tmp_path):
    model = linear_quantize(net(), QuantizeConfig(method="linear", dtype="int8", scheme="symmetric",
                                                  granularity="per_channel"))
    x = torch.randn(1, 3, 12, 12)
    mlmodel = ct.convert(torch.jit.trace(model, x), inputs=[ct.TensorType(name="x", shape=x.shape)],
                         convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18)
    mlmodel.save(str(tmp_path / "net.mlpackage"))
    ops = Counter(op.op_type for op in load_program(tmp_path / "net.mlpackage").functions["main"].operations)
    # Four int8 weights (three convolutions, the head); the BatchNorms stay ops of their own after them.
    assert ops["constexpr_blockwise_shift_scale"] == 4 and ops["batch_norm"] == 3


def test_a_channel_too_small_for_float16_quantizes_and_converts(tmp_path):
    """GPTQ uint4 gives a channel of weights ~1e-9 a scale that rounds to zero in float16; it converts
    (scale 1 encodes its zeros) instead of failing with an out-of-range int4 value."""
    from coreml_pipeline.techniques import layerwise, quantize

    class Plain:  # the family interface compress_each_layer feeds samples through
        def wrap(self, module):
            return module

        def call(self, wrapped, sample, device=None):
            return wrapped(sample["x"])

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 1)).eval()
    with torch.no_grad():
        model[0].weight[3] = 1e-9
    cfg = QuantizeConfig(method="gptq", dtype="uint4", scheme="symmetric", granularity="per_channel", block_size=None)
    samples = [{"x": torch.randn(1, 8, 6, 6)} for _ in range(4)]
    model = layerwise.compress_each_layer(model, "gptq", quantize.module_config(cfg), Plain(), samples, "cpu")
    quantize.round_like_package(model, logging.getLogger("test"))
    assert quantize.encode_dead_channels(model) == 1
    assert float(model[0].weight[3].abs().max()) == 0.0
    x = torch.randn(1, 8, 6, 6)
    ct.convert(torch.jit.trace(model, x), inputs=[ct.TensorType(name="x", shape=x.shape)], convert_to="mlprogram",
               minimum_deployment_target=ct.target.iOS18).save(str(tmp_path / "net.mlpackage"))
    ops = Counter(op.op_type for op in load_program(tmp_path / "net.mlpackage").functions["main"].operations)
    assert ops["constexpr_blockwise_shift_scale"] == 2
