"""Running a model over a whole array of images, in batches, without gradients."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.data.transforms import Normalization, to_input


@torch.no_grad()
def predict_logits(
    model: nn.Module, images: np.ndarray, normalization: Normalization, device: torch.device, batch_size: int = 1000
) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, classes) float32 logits on the CPU, in eval mode."""
    was_training = model.training
    model.eval()
    try:
        chunks = []
        for start in range(0, len(images), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(device)
            chunks.append(model(to_input(batch, normalization)).float().cpu())
        return torch.cat(chunks) if chunks else torch.empty(0)
    finally:
        model.train(was_training)


def loss_and_accuracy(logits: torch.Tensor, labels: np.ndarray) -> tuple[float, float]:
    targets = torch.from_numpy(labels)
    loss = F.cross_entropy(logits, targets).item()
    accuracy = (logits.argmax(1) == targets).float().mean().item()
    return loss, accuracy
