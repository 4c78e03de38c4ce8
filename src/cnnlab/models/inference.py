"""Running a model over a whole array of images, in batches, without gradients."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.data.transforms import Normalization, to_input


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    normalization: Normalization,
    device: torch.device,
    tta: str = "none",
    bf16: bool = False,
    batch_size: int = 1000,
) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, classes) float32 logits on the CPU, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                chunks.append(tta_logits(model, to_input(batch, normalization), tta).float().cpu())
        return torch.cat(chunks) if chunks else torch.empty(0)
    finally:
        model.train(was_training)


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """Logits averaged over test-time views of (B, C, H, W) inputs.

    "flip": the image and its mirror, equally weighted. "flip-translate": half on the flip pair, a
    quarter each on the flip pairs of the image shifted one pixel up-left and down-right (reflected).
    """
    if tta == "none":
        return model(x)

    def mirrored(views: torch.Tensor) -> torch.Tensor:
        return 0.5 * (model(views) + model(views.flip(-1)))

    if tta == "flip":
        return mirrored(x)
    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")  # (B, C, H+2, W+2)
    up_left, down_right = padded[..., :height, :width], padded[..., 2:, 2:]
    return 0.5 * mirrored(x) + 0.25 * (mirrored(up_left) + mirrored(down_right))


def loss_and_accuracy(logits: torch.Tensor, labels: np.ndarray) -> tuple[float, float]:
    targets = torch.from_numpy(labels)
    loss = F.cross_entropy(logits, targets).item()
    accuracy = (logits.argmax(1) == targets).float().mean().item()
    return loss, accuracy
