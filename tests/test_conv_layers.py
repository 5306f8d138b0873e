"""Convolutional networks as real ones are built: BatchNorms folded into their convolutions in torch,
and convolution subclasses (EfficientNet-Lite's Conv2dStaticSamePadding) compressed like nn.Conv2d."""

from __future__ import annotations

import logging
from collections import Counter

import coremltools as ct
import pytest
import torch
import torch.nn.functional as F

from coreml_pipeline.config.schema import PruneConfig, QuantizeConfig
from coreml_pipeline.coreml.convert import load_program
from coreml_pipeline.model import PRUNING, QUANTIZATION, compression_types, fold_batchnorms
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
        # Its output also feeds the residual sum: folding the BatchNorm would change that sum.
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
        if isinstance(module, torch.nn.BatchNorm2d):  # statistics far from identity, so folding shows
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.2, 3)
            module.weight.data.uniform_(0.5, 2)
            module.bias.data.uniform_(-1, 1)
    return model.eval()


def test_batchnorm_folds_into_the_convolution_it_alone_follows():
    model, x = net(), torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        before = model(x)
    assert fold_batchnorms(model) == ["stem", "depthwise"]
    assert isinstance(model.stem_bn, torch.nn.Identity) and isinstance(model.depthwise_bn, torch.nn.Identity)
    assert isinstance(model.shared_bn, torch.nn.BatchNorm2d)  # its convolution's output has a second user
    assert model.stem.bias is not None
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert fold_batchnorms(model) == []  # folded once


def test_a_network_fx_cannot_trace_keeps_its_batchnorms(caplog):
    class DataDependent(Net):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else x

    model = DataDependent().eval()
    with caplog.at_level(logging.INFO, logger="pipeline"):
        assert fold_batchnorms(model) == []
    assert isinstance(model.stem_bn, torch.nn.BatchNorm2d)
    assert "BatchNorm not folded in torch" in caplog.text


def test_a_transformers_classifier_folds_through_transformers_tracer(tmp_path):
    from tiny_families import tiny_image_classifier
    from transformers import ResNetForImageClassification

    model = ResNetForImageClassification.from_pretrained(tiny_image_classifier(tmp_path / "resnet")).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x).logits
    folded = fold_batchnorms(model, input_names=["pixel_values"])
    assert "resnet.embedder.embedder.convolution" in folded and len(folded) >= 5
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, before, rtol=1e-4, atol=1e-5)


def test_convolution_subclasses_are_quantized_and_pruned():
    quantized = linear_quantize(net(), QuantizeConfig(method="linear", dtype="int8", scheme="symmetric",
                                                      granularity="per_channel"))
    assert all(QUANTIZATION in compression_types(getattr(quantized, name))
               for name in ("stem", "depthwise", "shared", "head"))
    pruned = magnitude_prune(net(), PruneConfig(method="magnitude", target_sparsity=0.5))
    for name in ("stem", "depthwise", "shared"):
        assert PRUNING in compression_types(getattr(pruned, name))
        assert float((getattr(pruned, name).weight == 0).float().mean()) == pytest.approx(0.5, abs=0.05)


def test_int8_convolutions_reach_the_package_as_int8_without_batchnorm_ops(tmp_path):
    model = net()
    fold_batchnorms(model)
    model = linear_quantize(model, QuantizeConfig(method="linear", dtype="int8", scheme="symmetric",
                                                  granularity="per_channel"))
    x = torch.randn(1, 3, 12, 12)
    mlmodel = ct.convert(torch.jit.trace(model, x), inputs=[ct.TensorType(name="x", shape=x.shape)],
                         convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18)
    mlmodel.save(str(tmp_path / "net.mlpackage"))
    ops = Counter(op.op_type for op in load_program(tmp_path / "net.mlpackage").functions["main"].operations)
    # Four int8 weights (three convolutions, the head); only the BatchNorm that could not fold is left.
    assert ops["constexpr_blockwise_shift_scale"] == 4 and ops["batch_norm"] == 1
