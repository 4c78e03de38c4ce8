"""The `fast` family: a speed-run network after airbench (Jordan, 2024, arXiv 2404.00498).

A frozen patch-whitening convolution (GELU over each whitening direction with both signs, or with
`linear_stem` the directions themselves), then three blocks of conv -> max-pool -> BatchNorm -> GELU ->
conv -> BatchNorm -> GELU, then a global max-pool and a scaled linear head. What makes it train fast:
- the first layer decorrelates 2x2 patches using the training data's own covariance, so the network
  starts from whitened inputs instead of learning that transform;
- convolutions start as identities (dirac) on their first channels: an implicit residual path;
- BatchNorm has no learnable scale and a short memory (momentum 0.4), and its biases learn faster;
- the logits are scaled down, which acts like a temperature that keeps early training stable.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.config import setting
from cnnlab.data.dataset import ImageShape
from cnnlab.models.registry import Classifier, ParameterGroups, register, standard_groups

WHITEN_KERNEL = 2
WHITEN_EPS = 5e-4  # added to the covariance eigenvalues: caps the gain on near-constant directions
LOGIT_SCALE = 1 / 9


class Conv(nn.Conv2d):
    """3x3 'same' convolution without bias, identity-initialised on its first in_channels filters."""

    def __init__(self, channels_in: int, channels_out: int, generator: torch.Generator):
        super().__init__(channels_in, channels_out, kernel_size=3, padding="same", bias=False)
        bound = 1 / (channels_in * 9) ** 0.5  # torch's default kaiming-uniform bound for this layer
        with torch.no_grad():
            self.weight.uniform_(-bound, bound, generator=generator)
            nn.init.dirac_(self.weight[: min(channels_in, channels_out)])


class Norm(nn.BatchNorm2d):
    """BatchNorm with a fixed unit scale and a learnable bias; remembers 40% of each new batch."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-12, momentum=0.4)
        self.weight.requires_grad_(False)


class MaxPool2x2(torch.autograd.Function):
    """F.max_pool2d(x, 2) that keeps only the winners' indices for backward, not `x` as well.

    torch's pool saves its input, though its backward reads only the input's shape and layout: at the
    fast nets' widths that is a quarter of the activations a training step holds."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        pooled, winners = F.max_pool2d(x, 2, return_indices=True)
        ctx.save_for_backward(winners)
        ctx.input_layout = (x.shape, x.stride())
        return pooled

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (winners,) = ctx.saved_tensors
        shape, strides = ctx.input_layout
        layout = torch.empty_strided(shape, strides, dtype=grad.dtype, device=grad.device)  # never read
        kernel, stride, padding, dilation = [2, 2], [2, 2], [0, 0], [1, 1]
        grad_input: torch.Tensor = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, layout, kernel, stride, padding, dilation, False, winners
        )
        return grad_input


def global_max_pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C), each channel's largest value.

    Compiled, it takes torch.max's values, whose backward routes the gradient by the winner's index: inductor's
    amax backward masks the input by exact equality with the maximum, but recomputes the input by another float
    path than the forward (in fp32 after a bf16 GELU), so the mask can miss every element and its division by the
    count of maxima gives NaN (pytorch/pytorch#186799, fix proposed in #186953). Eager keeps amax, which splits
    the gradient among tied maxima."""
    if torch.compiler.is_compiling():
        return x.flatten(2).max(dim=2).values
    return torch.amax(x, dim=(2, 3))


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    # Inference and export take torch's own pool; only a training step has an input to drop.
    if torch.is_grad_enabled() and x.requires_grad:
        pooled: torch.Tensor = MaxPool2x2.apply(x)  # type: ignore[no-untyped-call]  # torch leaves apply untyped
        return pooled
    return F.max_pool2d(x, 2)


class Block(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, generator: torch.Generator):
        super().__init__()
        self.conv1 = Conv(channels_in, channels_out, generator)
        self.norm1 = Norm(channels_out)
        self.conv2 = Conv(channels_out, channels_out, generator)
        self.norm2 = Norm(channels_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(max_pool_2x2(self.conv1(x))))  # (B, C_out, H/2, W/2)
        return F.gelu(self.norm2(self.conv2(x)))


@dataclass
class FastSettings:
    """The fast family's own settings (train.family)."""

    whiten_bias_epochs: int = setting(
        0, "Epochs during which the fast nets' frozen whitening layer's bias learns.", at_least=0
    )


class FastNet(Classifier):
    def __init__(
        self,
        input_shape: ImageShape,
        num_classes: int,
        generator: torch.Generator,
        widths: tuple[int, int, int],
        linear_stem: bool = False,
    ):
        super().__init__()
        channels = input_shape[0]
        # Each whitening direction with both signs through a GELU, or once and linear: half the input channels
        # for the costliest convolution (the first, at full resolution) and no GELU over the largest tensor.
        self.linear_stem = linear_stem
        whitened = (1 if linear_stem else 2) * channels * WHITEN_KERNEL**2
        self.whiten = nn.Conv2d(channels, whitened, kernel_size=WHITEN_KERNEL, bias=True)
        self.whiten.weight.requires_grad_(False)
        self.whiten_bias().data.zero_()
        self.blocks = nn.Sequential(
            Block(whitened, widths[0], generator),
            Block(widths[0], widths[1], generator),
            Block(widths[1], widths[2], generator),
        )
        self.head = nn.Linear(widths[2], num_classes, bias=False)
        bound = 1 / widths[2] ** 0.5
        with torch.no_grad():
            self.head.weight.uniform_(-bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.whiten(x)  # (B, C*4 or 2*C*4, H-1, W-1)
        if not self.linear_stem:
            x = F.gelu(x)
        x = self.blocks(x)  # (B, widths[2], h, w)
        x = global_max_pool(x)  # (B, widths[2])
        logits: torch.Tensor = self.head(x) * LOGIT_SCALE  # (B, classes)
        return logits

    def whiten_bias(self) -> torch.Tensor:
        """The whitening layer's bias: it learns in the first `whiten_bias_epochs` epochs only (its filters never)."""
        bias = self.whiten.bias
        assert bias is not None  # made with bias=True
        return bias

    def gradcam_layer(self) -> nn.Module:
        """The last convolution: its maps are the finest that the class decision reads."""
        last = self.blocks[-1]
        assert isinstance(last, Block)
        return last.conv2

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor) -> None:
        """Set the whitening filters from the covariance of the 2x2 patches of (N, C, H, W) images."""
        channels = images.shape[1]
        patches = images.float().unfold(2, WHITEN_KERNEL, 1).unfold(3, WHITEN_KERNEL, 1)  # (N, C, h, w, k, k)
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels * WHITEN_KERNEL**2)  # (P, C*k*k)
        covariance = patches.T @ patches / len(patches)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        filters = (eigenvectors / torch.sqrt(eigenvalues + WHITEN_EPS)).T.float()  # rows: whitening directions
        filters = filters.reshape(-1, channels, WHITEN_KERNEL, WHITEN_KERNEL)
        self.whiten.weight.copy_(filters if self.linear_stem else torch.cat((filters, -filters)))

    def start_epoch(self, epoch: int, family: FastSettings) -> None:
        self.whiten_bias().requires_grad_(epoch <= family.whiten_bias_epochs)

    def parameter_groups(self) -> ParameterGroups:
        # Muon orthogonalises the blocks' 3x3 filter banks; the whitening filters are fixed.
        return standard_groups(self, filter_type=Conv)


# Each with the speed-run recipe made for it; fast-tiny and fast-small take the thin net's recipe.
for _name, _widths, _linear, _recipe, _note in (
    ("fast-tiny-linear", (16, 64, 128), True, "fast70", ": fast-tiny's widths, fast70's net"),
    ("fast-tiny", (16, 64, 128), False, "fast70", ": the full-resolution first block kept thin"),
    ("fast-small", (32, 64, 128), False, "fast70", ""),
    ("fast-mid", (64, 192, 256), False, "fast90", ": airbench94 with a cheaper middle block"),
    ("fast", (64, 256, 256), False, "fast94", ": airbench94's"),
):
    stem = "linear whitening stem" if _linear else "whitening stem"
    register(
        _name,
        summary=f"speed-run net ({stem}, 3 conv-pool-BN-GELU blocks), widths {'/'.join(map(str, _widths))}{_note}",
        default_recipe=_recipe,
        # The whitening conv takes one pixel off each side, then three 2x2 pools must each keep >= 1 pixel.
        min_input_size=WHITEN_KERNEL - 1 + 8,
        input_size=32,
        settings=FastSettings,
    )(functools.partial(FastNet, widths=_widths, linear_stem=_linear))
