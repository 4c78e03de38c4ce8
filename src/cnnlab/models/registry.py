"""The model registry: each family module registers its variants, each with the spec that the rest of cnnlab
reads instead of probing the network (`create_model("tutorial-cnn", (3, 32, 32), 10)`).

A family is one file in cnnlab/models/ that calls `register(ModelSpec(...))` for each variant and is
imported by cnnlab.models; nothing else needs to change to add one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cnnlab.data.transforms import Normalization
from cnnlab.errors import CnnlabError, ConfigError

InputShape = tuple[int, int, int]  # (C, H, W)


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


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[InputShape, int, torch.Generator], nn.Module]  # (input shape, classes, init RNG)
    summary: str
    default_recipe: str | None = None  # the recipe a bare `--model NAME` trains with (see cnnlab.recipes)
    min_input_size: int = 1  # pixels per side
    input_size: int | None = None  # pixels per side it was designed for; None: any size above the minimum
    # Fixed input statistics (a pretrained network's); None: from the training data, as the recipe says.
    normalization: Normalization | None = None
    weights: str | None = None  # where pretrained weights come from, in words; None: trained from scratch
    load_weights: Callable[[nn.Module], None] | None = None  # loads them into a new model before training
    gradcam_layer: Callable[[nn.Module], nn.Module | None] = last_conv  # the layer Grad-CAM weighs; None: none
    # Data-dependent initialisation from a seeded sample of normalised (N, C, H, W) training images (at most
    # 5,000, fewer for large images: see train.state.INIT_PIXELS).
    init_from_data: Callable[[nn.Module, torch.Tensor], None] | None = None
    # Before each epoch (1-based) with the run's whiten_bias_epochs: parameters that learn only for a while.
    start_epoch: Callable[[nn.Module, int, int], None] | None = None
    parameter_groups: Callable[[nn.Module], ParameterGroups] = standard_groups
    # A pretrained model's (features of (B, C, H, W) inputs -> (B, F), the head that maps them to logits), for
    # training the head alone on features computed once; None: not a pretrained family.
    split_head: Callable[[nn.Module], tuple[Callable[[torch.Tensor], torch.Tensor], nn.Module]] | None = None

    def check_input(self, input_shape: InputShape) -> None:
        _, height, width = input_shape
        if min(height, width) < self.min_input_size:
            raise ConfigError(
                f"{self.name} needs images of at least {self.min_input_size}x{self.min_input_size} pixels, "
                f"got {height}x{width}; set data.image_size to {self.min_input_size} or more",
                "data.image_size",
            )


MODELS: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    if spec.name in MODELS:
        raise ValueError(f"model {spec.name!r} is registered twice")
    MODELS[spec.name] = spec
    return spec


def model_spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise CnnlabError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


def create_model(name: str, input_shape: InputShape, num_classes: int, seed: int = 0) -> nn.Module:
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


def least_step_bytes(name: str, input_shape: InputShape, batch_size: int, element_bytes: int) -> int:
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
