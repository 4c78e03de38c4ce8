"""Running a model over batches of images without gradients, and the one way cnnlab scores it.

Every accuracy cnnlab reports comes from `evaluate`: the plain one (each image seen once) and, when the
model has test-time augmentation, the delivered one (its views averaged, as predict and serve answer).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.data.loader import in_order
from cnnlab.data.transforms import Normalization, to_input


@dataclass(frozen=True)
class Logits:
    plain: torch.Tensor  # (N, classes) float32 on the CPU: each image once
    delivered: torch.Tensor  # (N, classes): with the TTA views averaged (`plain` itself when tta is "none")
    tta: str


@dataclass(frozen=True)
class Scores:
    tta: str  # "none", or the views averaged for `delivered_*`
    loss: float  # mean cross-entropy, plain
    accuracy: float  # plain
    delivered_loss: float
    delivered_accuracy: float  # what the model answers with: with TTA when it has one

    @classmethod
    def of(cls, logits: Logits, labels: np.ndarray | torch.Tensor) -> Scores:
        targets = torch.as_tensor(labels)
        loss, accuracy = _loss_and_accuracy(logits.plain, targets)
        delivered = (loss, accuracy) if logits.tta == "none" else _loss_and_accuracy(logits.delivered, targets)
        return cls(logits.tta, loss, accuracy, *delivered)

    def metrics(self, split: str) -> dict[str, float]:
        """Log entries: `<split>_loss`, `<split>_acc` (plain) and, with TTA, `<split>_acc_tta` (delivered)."""
        entries = {f"{split}_loss": self.loss, f"{split}_acc": self.accuracy}
        return entries | ({f"{split}_acc_tta": self.delivered_accuracy} if self.tta != "none" else {})

    def describe(self) -> str:
        return describe_accuracy(self.delivered_accuracy, self.accuracy, self.tta)


def describe_accuracy(delivered: float, plain: float, tta: str) -> str:
    """ "accuracy 0.9412 (with flip-translate TTA; 0.9310 without)": the delivered accuracy, labelled."""
    if tta == "none":
        return f"accuracy {plain:.4f}"
    return f"accuracy {delivered:.4f} (with {tta} TTA; {plain:.4f} without)"


def _loss_and_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    loss = F.cross_entropy(logits, targets).item()
    accuracy = (logits.argmax(1) == targets).float().mean().item()
    return loss, accuracy


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    normalization: Normalization,
    device: torch.device,
    tta: str = "none",
    bf16: bool = False,
) -> Logits:
    """Logits of (b, H, W, C) uint8 batches, in eval mode; both plain and delivered from one pass of views."""
    was_training = model.training
    model.eval()
    plain, delivered = [], []
    try:
        for batch in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                one, averaged = views(model, to_input(batch.to(device), normalization), tta)
            plain.append(one.float().cpu())
            delivered.append(averaged.float().cpu())
    finally:
        model.train(was_training)
    if not plain:
        return Logits(torch.empty(0), torch.empty(0), tta)
    return Logits(torch.cat(plain), torch.cat(delivered) if tta != "none" else torch.cat(plain), tta)


def evaluate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    labels: np.ndarray,
    normalization: Normalization,
    device: torch.device,
    tta: str = "none",
    bf16: bool = False,
) -> tuple[Scores, Logits]:
    """Plain and delivered scores of `model` on `batches` whose true classes are `labels`, and its logits."""
    logits = predict(model, batches, normalization, device, tta, bf16)
    return Scores.of(logits, labels), logits


def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    normalization: Normalization,
    device: torch.device,
    tta: str = "none",
    bf16: bool = False,
) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, classes) float32 delivered logits on the CPU."""
    return predict(model, in_order(images), normalization, device, tta, bf16).delivered


def views(model: nn.Module, x: torch.Tensor, tta: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of (B, C, H, W) inputs seen once, and averaged over the test-time views `tta` names.

    "flip": the image and its mirror, equally weighted. "flip-translate": half on the flip pair, a
    quarter each on the flip pairs of the image shifted one pixel up-left and down-right (reflected).
    """
    plain: torch.Tensor = model(x)
    if tta == "none":
        return plain, plain
    pair = 0.5 * (plain + model(x.flip(-1)))
    if tta == "flip":
        return plain, pair

    def mirrored(shifted: torch.Tensor) -> torch.Tensor:
        seen: torch.Tensor = model(shifted)
        mirror: torch.Tensor = model(shifted.flip(-1))
        return 0.5 * (seen + mirror)

    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")  # (B, C, H+2, W+2)
    up_left, down_right = padded[..., :height, :width], padded[..., 2:, 2:]
    return plain, 0.5 * pair + 0.25 * (mirrored(up_left) + mirrored(down_right))


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str) -> torch.Tensor:
    """The delivered logits of (B, C, H, W) inputs: what export and serving answer with."""
    _, delivered = views(model, x, tta)
    return delivered
