"""Models registered by name: `create_model("tutorial-cnn", (3, 32, 32), 10)`."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from cnnlab.errors import CnnlabError
from cnnlab.models.fast import FastNet
from cnnlab.models.tutorial import TutorialCNN, TutorialMLP

InputShape = tuple[int, int, int]  # (C, H, W)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[[InputShape, int, torch.Generator], nn.Module]  # (input shape, classes, init RNG)
    summary: str
    default_recipe: str | None = None  # the recipe a bare `--model NAME` trains with (see cnnlab.recipes)
    min_input_size: int = 1  # pixels per side

    def check_input(self, input_shape: InputShape) -> None:
        _, height, width = input_shape
        if min(height, width) < self.min_input_size:
            raise CnnlabError(
                f"{self.name} needs images of at least {self.min_input_size}x{self.min_input_size} pixels, "
                f"got {height}x{width}; pass --image-size {self.min_input_size} or more"
            )


def keras_init(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Keras' defaults: glorot-uniform kernels, zero biases."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.xavier_uniform_(module.weight, generator=generator)
            nn.init.zeros_(module.bias)
    return model


def _fast(shape: InputShape, classes: int, rng: torch.Generator, widths: tuple[int, int, int]) -> nn.Module:
    return FastNet(shape, classes, widths, rng)


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "tutorial-mlp",
            lambda shape, classes, rng: keras_init(TutorialMLP(shape, classes), rng),
            "the tutorial's MLP: Flatten, Dense 3000, Dense 1000, Dense classes",
            default_recipe="tutorial-mlp",
        ),
        ModelSpec(
            "tutorial-cnn",
            lambda shape, classes, rng: keras_init(TutorialCNN(shape, classes), rng),
            "the tutorial's CNN: Conv 32, Pool, Conv 64, Pool, Dense 64, Dense classes",
            default_recipe="tutorial-cnn",
            min_input_size=TutorialCNN.min_input_size,
        ),
        *(
            ModelSpec(
                name,
                functools.partial(_fast, widths=widths),
                f"speed-run net (whitening stem, 3 conv-pool-BN-GELU blocks), widths {'/'.join(map(str, widths))}"
                f"{note}",
                default_recipe=recipe,
                min_input_size=FastNet.min_input_size,
            )
            # Each with the speed-run recipe made for it; fast-small takes the thin net's SGD recipe.
            for name, widths, recipe, note in (
                ("fast-tiny", (16, 64, 128), "fast70", ": the full-resolution first block kept thin"),
                ("fast-small", (32, 64, 128), "fast70", ""),
                ("fast-mid", (64, 192, 256), "fast90", ": airbench94 with a cheaper middle block"),
                ("fast", (64, 256, 256), "fast94", ": airbench94's"),
            )
        ),
    )
}


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
    return model.to(memory_format=torch.channels_last)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
