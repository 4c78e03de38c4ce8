"""The two models of the classic Keras CIFAR-10 tutorial, adapted to any input size and class count.

Parameter counts at 32x32x3 with 10 classes match Keras' model.summary(): 12,230,010 for the MLP and
167,562 for the CNN. Softmax is left to the loss and to prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.data.dataset import ImageShape
from cnnlab.models.registry import Classifier, register


class TutorialMLP(Classifier):
    """Flatten -> Dense 3000 ReLU -> Dense 1000 ReLU -> Dense classes."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, hidden: tuple[int, ...] = (3000, 1000)):
        super().__init__()
        channels, height, width = input_shape
        layers: list[nn.Module] = [nn.Flatten()]
        width_in = channels * height * width
        for width_out in hidden:
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
            width_in = width_out
        layers.append(nn.Linear(width_in, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.layers(x)  # (B, C, H, W) -> (B, classes)
        return logits


class TutorialCNN(Classifier):
    """Conv 32 3x3 ReLU -> MaxPool 2 -> Conv 64 3x3 ReLU -> MaxPool 2 -> Dense 64 ReLU -> Dense classes."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        channels, height, width = input_shape
        self.conv1 = nn.Conv2d(channels, 32, kernel_size=3)
        self.conv2 = nn.Conv2d(32, 64, kernel_size=3)
        flat_height, flat_width = (((height - 2) // 2 - 2) // 2), (((width - 2) // 2 - 2) // 2)
        self.dense = nn.Linear(64 * flat_height * flat_width, 64)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ReLU after the pool gives the same values as before it (both are monotone), on 4x fewer
        # elements; on CPU that cuts the slow pointwise backward by about a third of an epoch.
        x = F.relu(F.max_pool2d(self.conv1(x), 2))  # (B, 32, (H-2)/2, (W-2)/2)
        x = F.relu(F.max_pool2d(self.conv2(x), 2))  # (B, 64, h, w)
        x = F.relu(self.dense(x.flatten(1)))  # (B, 64)
        logits: torch.Tensor = self.classifier(x)  # (B, classes)
        return logits


def keras_init(model: Classifier, generator: torch.Generator) -> Classifier:
    """Keras' defaults: glorot-uniform kernels, zero biases."""
    for module in model.modules():
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.xavier_uniform_(module.weight, generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


@register(
    "tutorial-mlp",
    summary="the tutorial's MLP: Flatten, Dense 3000, Dense 1000, Dense classes",
    default_recipe="tutorial-mlp",
    input_size=32,
)
def tutorial_mlp(shape: ImageShape, classes: int, generator: torch.Generator) -> Classifier:
    return keras_init(TutorialMLP(shape, classes), generator)


@register(
    "tutorial-cnn",
    summary="the tutorial's CNN: Conv 32, Pool, Conv 64, Pool, Dense 64, Dense classes",
    default_recipe="tutorial-cnn",
    min_input_size=10,  # two valid 3x3 convolutions and two 2x2 pools: (((s - 2) // 2) - 2) // 2 >= 1
    input_size=32,
)
def tutorial_cnn(shape: ImageShape, classes: int, generator: torch.Generator) -> Classifier:
    return keras_init(TutorialCNN(shape, classes), generator)
