"""The model registry: every network is a `Classifier`, registered by name with the facts the rest of cnnlab reads
instead of probing it (`create_model("tutorial-cnn", (3, 32, 32), 10)`).

A family is one file in cnnlab/models/families/: a `Classifier` subclass that overrides the hooks it needs, and a
factory per variant decorated with `@register(name, summary=...)`. Every file there is imported when
cnnlab.models is; nothing else needs to change to add one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from cnnlab.config import build, check_ranges
from cnnlab.data.dataset import ImageShape
from cnnlab.data.transforms import Normalization
from cnnlab.errors import CnnlabError, ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance


@dataclass
class ParameterGroups:
    """A model's trainable parameters as the optimizers treat them, each list in the model's parameter order."""

    filters: list[nn.Parameter]  # filter banks that Muon orthogonalises (SGD/Adam treat them as `others`)
    norm_biases: list[nn.Parameter]  # normalisation biases: learn `bias_lr_scale` times faster
    others: list[nn.Parameter]


def standard_groups(model: nn.Module, filter_type: type[nn.Module] = nn.Conv2d) -> ParameterGroups:
    """BatchNorm biases apart; the weights of the `filter_type` layers (any convolution by default) are filters."""
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    banks = {id(m.weight) for m in model.modules() if isinstance(m, filter_type)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    return ParameterGroups(
        filters=[p for p in trainable if id(p) in banks],
        norm_biases=[p for p in trainable if id(p) in norm_biases],
        others=[p for p in trainable if id(p) not in norm_biases and id(p) not in banks],
    )


def last_conv(model: nn.Module) -> nn.Module | None:
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    return convs[-1] if convs else None


class Classifier(nn.Module):
    """A registered network: (B, C, H, W) inputs -> (B, classes) logits, with the hooks training, fine-tuning and
    explanation call. Each does nothing, or what suits most networks, unless a family overrides it."""

    def load_pretrained(self) -> None:
        """Load the family's pretrained weights into a new model before training (none by default)."""

    def init_from_data(self, images: torch.Tensor) -> None:
        """Data-dependent initialisation from a seeded sample of normalised (N, C, H, W) training images (at most
        5,000, fewer for large images: see train.parts.INIT_PIXELS); none by default."""

    @property
    def initialises_from_data(self) -> bool:
        """Whether `init_from_data` does anything: training then draws the sample it needs."""
        return type(self).init_from_data is not Classifier.init_from_data

    def start_epoch(self, epoch: int, family: Any) -> None:
        """Before each training epoch (1-based), with the family's settings (`ModelSpec.settings`): parameters
        that learn only for a while."""

    def parameter_groups(self) -> ParameterGroups:
        """The trainable parameters as the optimizers treat them."""
        return standard_groups(self)

    def split_head(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module] | None:
        """A pretrained model's (features of inputs -> (B, F), the head that maps them to logits), for training
        the head alone on features computed once; None: not a pretrained family."""
        return None

    def gradcam_layer(self) -> nn.Module | None:
        """The layer Grad-CAM weighs (the last convolution by default); None: none."""
        return last_conv(self)


@dataclass
class NoSettings:
    """The settings of a family that has none of its own."""


Build = Callable[[ImageShape, int, torch.Generator], Classifier]  # (input shape, classes, init RNG)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Build
    summary: str
    default_recipe: str | None = None  # the recipe a bare `--model NAME` trains with (see cnnlab.recipes)
    min_input_size: int = 1  # pixels per side
    input_size: int | None = None  # pixels per side it was designed for; None: any size above the minimum
    # Fixed input statistics (a pretrained network's); None: from the training data, as the recipe says.
    normalization: Normalization | None = None
    weights: str | None = None  # where pretrained weights come from, in words; None: trained from scratch
    settings: type[DataclassInstance] = NoSettings  # the family's own settings, given as train.family

    def family_settings(self, values: dict[str, Any]) -> Any:
        """The family's settings from `values` (train.family), refusing unknown keys and values out of range."""
        chosen = build(self.settings, values, f"train.family ({self.name})")
        check_ranges(chosen, "train.family")
        return chosen

    def check_input(self, input_shape: ImageShape) -> None:
        _, height, width = input_shape
        if min(height, width) < self.min_input_size:
            raise ConfigError(
                f"{self.name} needs images of at least {self.min_input_size}x{self.min_input_size} pixels, "
                f"got {height}x{width}; set data.image_size to {self.min_input_size} or more",
                "data.image_size",
            )


MODELS: dict[str, ModelSpec] = {}


def register(
    name: str,
    *,
    summary: str,
    default_recipe: str | None = None,
    min_input_size: int = 1,
    input_size: int | None = None,
    normalization: Normalization | None = None,
    weights: str | None = None,
    settings: type[DataclassInstance] = NoSettings,
) -> Callable[[Build], Build]:
    """Register the decorated factory `(input shape, classes, init RNG) -> Classifier` as model `name`."""

    def decorate(build: Build) -> Build:
        if name in MODELS:
            raise ValueError(f"model {name!r} is registered twice")
        MODELS[name] = ModelSpec(
            name, build, summary, default_recipe, min_input_size, input_size, normalization, weights, settings
        )
        return build

    return decorate


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise CnnlabError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


def create_model(name: str, input_shape: ImageShape, num_classes: int, seed: int = 0) -> Classifier:
    """A freshly initialised model, in channels_last memory order (faster convolutions on CPU and GPU)."""
    spec = model_spec(name)
    spec.check_input(input_shape)
    if num_classes < 2:
        raise CnnlabError(f"a classifier needs at least two classes, got {num_classes}")
    model = spec.build(input_shape, num_classes, torch.Generator().manual_seed(seed))
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload,no-any-return]  # not in torch's stub


def fitting_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors that fit the model by name and shape, and the model's names they leave out, sorted: the
    caller judges those (a classifier of another size may be left) before loading the rest."""
    ours = model.state_dict()
    fitting = {name: tensor for name, tensor in tensors.items() if name in ours and ours[name].shape == tensor.shape}
    return fitting, sorted(set(ours) - set(fitting))


def least_step_bytes(name: str, input_shape: ImageShape, batch_size: int, element_bytes: int) -> int:
    """A lower bound on the memory one training step of model `name` takes with `batch_size` inputs of
    `input_shape`: the input, every layer's output (kept for the backward pass), and the weights with their
    gradients, at `element_bytes` each. Measured on the meta device, where nothing is allocated."""
    spec = model_spec(name)
    spec.check_input(input_shape)
    with torch.device("meta"):
        model = spec.build(input_shape, 2, torch.Generator().manual_seed(0))
        kept = [batch_size * math.prod(input_shape)]

        def count(_module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                kept.append(output.numel())

        for module in model.modules():
            if not any(module.children()):
                module.register_forward_hook(count)
        model(torch.empty(batch_size, *input_shape))
    return (sum(kept) + 2 * parameter_count(model)) * element_bytes


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
