"""Running a model over batches of images without gradients, and the one way cnnlab scores it.

Every accuracy cnnlab reports is a `Scores`: the plain one (each image seen once) and the delivered one (with
the model's test-time augmentation, its views averaged, as predict and serve answer; the plain one without).
Training writes it into each metrics.jsonl line (`Scores.metrics`); everything after reads it back from there
(`Scores.from_metrics`) and says it one way (`Scores.describe`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

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
    viewed: torch.Tensor  # (N,) bool: the images whose delivered logits average the TTA views

    @classmethod
    def seen_once(cls, logits: torch.Tensor) -> Logits:
        """The logits of a model without test-time augmentation."""
        return cls(logits, logits, "none", torch.zeros(len(logits), dtype=torch.bool))


@dataclass(frozen=True)
class Scores:
    tta: str  # "none", or the views averaged for `delivered_*`
    loss: float  # mean cross-entropy, plain
    accuracy: float  # plain
    delivered_loss: float
    delivered_accuracy: float  # what the model answers with: with TTA when it has one
    tta_share: float  # the share of images that got the TTA views (selective TTA: the less confident ones)

    @classmethod
    def of(cls, logits: Logits, labels: np.ndarray | torch.Tensor) -> Scores:
        targets = torch.as_tensor(labels)
        loss, accuracy = _loss_and_accuracy(logits.plain, targets)
        delivered = (loss, accuracy) if logits.tta == "none" else _loss_and_accuracy(logits.delivered, targets)
        share = logits.viewed.float().mean().item() if len(logits.viewed) else 0.0
        return cls(logits.tta, loss, accuracy, *delivered, share)

    def metrics(self, split: str) -> dict[str, Any]:
        """A split's entries in a metrics.jsonl line: plain `<split>_loss` and `<split>_acc` (each image seen
        once), delivered `<split>_delivered_loss` and `<split>_delivered_acc` (the plain ones without TTA),
        `<split>_tta` (the views) and `<split>_tta_share` (the share of images that got them)."""
        return {
            f"{split}_loss": self.loss,
            f"{split}_acc": self.accuracy,
            f"{split}_delivered_loss": self.delivered_loss,
            f"{split}_delivered_acc": self.delivered_accuracy,
            f"{split}_tta": self.tta,
            f"{split}_tta_share": self.tta_share,
        }

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any], split: str, tta: str = "none") -> Scores | None:
        """The scores a metrics line recorded for `split`, read back, never recomputed; None when it has none.
        Lines written before the delivered entries had `<split>_acc_tta` alone, with the model's `tta`."""
        if f"{split}_acc" not in metrics:
            return None
        plain_loss, plain = metrics[f"{split}_loss"], metrics[f"{split}_acc"]
        if f"{split}_delivered_acc" in metrics:
            delivered = metrics[f"{split}_delivered_loss"], metrics[f"{split}_delivered_acc"]
            return cls(metrics[f"{split}_tta"], plain_loss, plain, *delivered, metrics[f"{split}_tta_share"])
        if f"{split}_acc_tta" not in metrics:
            return cls("none", plain_loss, plain, plain_loss, plain, 0.0)
        share = metrics.get(f"{split}_tta_share", 1.0)
        return cls(tta, plain_loss, plain, float("nan"), metrics[f"{split}_acc_tta"], share)

    def describe(self) -> str:
        """ "accuracy 0.9412 (with flip-translate TTA; 0.9310 without)": the delivered accuracy, labelled;
        selective TTA says on what share of the images: "(with flip TTA on the 25% least sure; ...)"."""
        if self.tta == "none":
            return f"accuracy {self.accuracy:.4f}"
        covered = "" if self.tta_share == 1 else f" on the {self.tta_share:.0%} least sure"
        return f"accuracy {self.delivered_accuracy:.4f} (with {self.tta} TTA{covered}; {self.accuracy:.4f} without)"


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
    tta_below: float = 1.0,
) -> Logits:
    """Logits of (b, H, W, C) uint8 batches, in eval mode; both plain and delivered from one pass of views.
    With `tta_below` < 1 only the images whose plain top-class probability is below it get the TTA views."""
    was_training = model.training
    model.eval()
    plain, delivered, viewed = [], [], []
    try:
        for batch in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                one, averaged, doubtful = views(model, to_input(batch.to(device), normalization), tta, tta_below)
            plain.append(one.float().cpu())
            delivered.append(averaged.float().cpu())
            viewed.append(doubtful.cpu())
    finally:
        model.train(was_training)
    if not plain:
        return Logits(torch.empty(0), torch.empty(0), tta, torch.zeros(0, dtype=torch.bool))
    return Logits(torch.cat(plain), torch.cat(delivered), tta, torch.cat(viewed))


def evaluate(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    labels: np.ndarray,
    normalization: Normalization,
    device: torch.device,
    tta: str = "none",
    bf16: bool = False,
    tta_below: float = 1.0,
) -> tuple[Scores, Logits]:
    """Plain and delivered scores of `model` on `batches` whose true classes are `labels`, and its logits."""
    logits = predict(model, batches, normalization, device, tta, bf16, tta_below)
    return Scores.of(logits, labels), logits


def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    normalization: Normalization,
    device: torch.device,
    tta: str = "none",
    bf16: bool = False,
    tta_below: float = 1.0,
) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, classes) float32 delivered logits on the CPU."""
    return predict(model, in_order(images), normalization, device, tta, bf16, tta_below).delivered


def views(
    model: nn.Module, x: torch.Tensor, tta: str, below: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of (B, C, H, W) inputs seen once, the delivered logits, and which images got the test-time views.

    The delivered logits average the views `tta` names for the images whose plain top-class probability is
    below `below` (all of them at 1), and are the plain logits for the rest: selective TTA spends its extra
    forward passes on the images the model is unsure of. Each image's answer depends on it alone.
    """
    plain: torch.Tensor = model(x)
    if tta == "none":
        return plain, plain, torch.zeros(len(x), dtype=torch.bool, device=x.device)
    doubtful = unsure(plain, below)
    if bool(doubtful.all()):
        return plain, averaged_views(model, x, plain, tta), doubtful
    delivered = plain.clone()
    if bool(doubtful.any()):
        delivered[doubtful] = averaged_views(model, x[doubtful], plain[doubtful], tta).to(plain.dtype)
    return plain, delivered, doubtful


def averaged_views(model: nn.Module, x: torch.Tensor, plain: torch.Tensor, tta: str) -> torch.Tensor:
    """The logits of (B, C, H, W) inputs averaged over the test-time views `tta` names; `plain` is model(x).

    "flip": the image and its mirror, equally weighted. "flip-translate": half on the flip pair, a
    quarter each on the flip pairs of the image shifted one pixel up-left and down-right (reflected).
    """
    pair: torch.Tensor = 0.5 * (plain + model(x.flip(-1)))
    if tta == "flip":
        return pair

    def mirrored(shifted: torch.Tensor) -> torch.Tensor:
        seen: torch.Tensor = model(shifted)
        mirror: torch.Tensor = model(shifted.flip(-1))
        return 0.5 * (seen + mirror)

    height, width = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1), mode="reflect")  # (B, C, H+2, W+2)
    up_left, down_right = padded[..., :height, :width], padded[..., 2:, 2:]
    return 0.5 * pair + 0.25 * (mirrored(up_left) + mirrored(down_right))


def tta_logits(model: nn.Module, x: torch.Tensor, tta: str, below: float = 1.0) -> torch.Tensor:
    """The delivered logits of (B, C, H, W) inputs, as `views` gives them, in a form export can trace: no
    branch on the data. The views run on the unsure images, or on the first image when none is (a graph cannot
    branch on that, and a batch of no images does not export); that image then keeps its plain logits."""
    plain: torch.Tensor = model(x)
    if tta == "none":
        return plain
    if below >= 1:
        return averaged_views(model, x, plain, tta)
    doubtful = unsure(plain, below)
    chosen = torch.cat([doubtful[:1] | ~doubtful.any(), doubtful[1:]])
    rows = torch.nonzero(chosen).squeeze(1)  # (R,) indices, R >= 1
    torch._check(rows.shape[0] >= 1)  # type: ignore[no-untyped-call]  # torch leaves _check untyped
    chosen_plain = plain.index_select(0, rows)
    averaged = averaged_views(model, x.index_select(0, rows), chosen_plain, tta).to(plain.dtype)
    return plain.index_copy(0, rows, torch.where(doubtful.index_select(0, rows)[:, None], averaged, chosen_plain))


def unsure(plain: torch.Tensor, below: float) -> torch.Tensor:
    """(B,) bool: the images whose plain top-class probability is below `below` (all of them at 1)."""
    if below >= 1:
        return torch.ones(len(plain), dtype=torch.bool, device=plain.device)
    return torch.softmax(plain.float(), 1).amax(1) < below
