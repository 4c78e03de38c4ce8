"""A model family as a user adds one: this file alone, with no other change to cnnlab (see test_layout)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cnnlab.data.dataset import ImageShape
from cnnlab.models.registry import Classifier, register


class Linear(Classifier):
    """One dense layer, recording when its hooks are called."""

    def __init__(self, shape: ImageShape, classes: int):
        super().__init__()
        self.layer = nn.Linear(int(np.prod(shape)), classes)
        self.initialised_on: tuple[int, ...] = ()
        self.starts: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x.flatten(1))

    def init_from_data(self, images: torch.Tensor) -> None:
        self.initialised_on = tuple(images.shape)

    def start_epoch(self, epoch: int, family: object) -> None:
        self.starts.append(epoch)


@register("linear", summary="one dense layer", default_recipe="tutorial-mlp")
def linear(shape: ImageShape, classes: int, generator: torch.Generator) -> Classifier:
    return Linear(shape, classes)
