"""Running a model over batches of images without gradients, and the one way cnnlab scores it.

Every accuracy cnnlab reports is a `Scores`: the plain one (each image seen once) and the delivered one (with
the model's test-time augmentation, its views averaged, as predict and serve answer; the plain one without).
Training writes it into each metrics.jsonl line (`Scores.metrics`); everything after reads it back from there
(`Scores.from_metrics`), writes it by the same names (`Scores.to_dict`) and says it one way (`Scores.describe`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.config import InferenceConfig
from cnnlab.data.loader import in_order
from cnnlab.data.transforms import Normalization, to_input
from cnnlab.models.label_sets import UNCHOSEN, binary_loss, choose_thresholds, label_set_scores, probabilities

NO_TTA = InferenceConfig()  # each image seen once


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
    """A model's scores on a split, by the one pair of names every file and page uses: `delivered_*` (what the
    model answers with: its TTA views averaged when it has them) and `plain_*` (each image seen once)."""

    tta: str  # "none", or the views averaged for `delivered_*`
    plain_loss: float  # mean cross-entropy
    plain_accuracy: float
    delivered_loss: float
    delivered_accuracy: float
    tta_share: float  # the share of images that got the TTA views (selective TTA: the less confident ones)
    # Multi-label models only, None else (see `label_sets`), delivered: the mean average precision over the classes
    # (threshold-free: their headline), and at the model's thresholds micro and macro F1 and the Hamming loss. Their
    # accuracy is the exact match (the whole label set right) and their loss the binary cross-entropy.
    delivered_map: float | None = None
    micro_f1: float | None = None
    macro_f1: float | None = None
    hamming_loss: float | None = None

    @classmethod
    def of(cls, logits: Logits, labels: np.ndarray | torch.Tensor, thresholds: np.ndarray | None = None) -> Scores:
        """The scores of `logits` against class indices, or against multi-hot labels with the decisions at
        `thresholds` (default UNCHOSEN for every class)."""
        share = logits.viewed.float().mean().item() if len(logits.viewed) else 0.0
        if labels.ndim == 2:
            targets = np.asarray(labels)
            cuts = thresholds if thresholds is not None else np.full(targets.shape[1], UNCHOSEN)
            plain, plain_loss = (
                label_set_scores(probabilities(logits.plain), targets, cuts),
                binary_loss(logits.plain, targets),
            )
            delivered, delivered_loss = plain, plain_loss
            if logits.tta != "none":
                delivered = label_set_scores(probabilities(logits.delivered), targets, cuts)
                delivered_loss = binary_loss(logits.delivered, targets)
            return cls(
                logits.tta,
                plain_loss,
                plain["exact_match"],
                delivered_loss,
                delivered["exact_match"],
                share,
                delivered["map"],
                delivered["micro_f1"],
                delivered["macro_f1"],
                delivered["hamming_loss"],
            )
        indices = torch.as_tensor(labels)
        loss, accuracy = _loss_and_accuracy(logits.plain, indices)
        delivered_single = (loss, accuracy) if logits.tta == "none" else _loss_and_accuracy(logits.delivered, indices)
        return cls(logits.tta, loss, accuracy, *delivered_single, share)

    @property
    def multi_label(self) -> bool:
        return self.delivered_map is not None

    @property
    def headline(self) -> tuple[str, float]:
        """The metric a table shows first, by name: "accuracy", or for multi-label models "mAP"."""
        if self.delivered_map is not None:
            return "mAP", self.delivered_map
        return "accuracy", self.delivered_accuracy

    @property
    def headline_text(self) -> str:
        """The headline as tables show it: the accuracy as a percentage, "94.12%"; the mAP as a fraction, "0.9280"."""
        name, value = self.headline
        return f"{value:.4f}" if name == "mAP" else f"{value:.2%}"

    def to_dict(self) -> dict[str, Any]:
        """The scores as every JSON file and answer names them (a split's metrics.jsonl entries add its name)."""
        multi = {"delivered_map": self.delivered_map, "micro_f1": self.micro_f1, "macro_f1": self.macro_f1}
        multi["hamming_loss"] = self.hamming_loss
        return {
            "delivered_accuracy": self.delivered_accuracy,
            "plain_accuracy": self.plain_accuracy,
            "delivered_loss": self.delivered_loss,
            "plain_loss": self.plain_loss,
            "tta": self.tta,
            "tta_share": self.tta_share,
        } | (multi if self.multi_label else {})

    def metrics(self, split: str) -> dict[str, Any]:
        """A split's entries in a metrics.jsonl line: `<split>_delivered_accuracy`, `<split>_plain_accuracy` and
        the rest of `to_dict`, each named after the split."""
        return {f"{split}_{key}": value for key, value in self.to_dict().items()}

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any], split: str) -> Scores | None:
        """The scores a metrics line recorded for `split`, read back, never recomputed; None when it has none
        (lines of older releases are read in these names by `run_dir.metrics_in_current_names`)."""
        if f"{split}_plain_accuracy" not in metrics:
            return None
        recorded: dict[str, Any] = {field: metrics.get(f"{split}_{field}") for field in SCORE_FIELDS}
        return cls(**recorded)

    def describe(self) -> str:
        """The one way an accuracy is printed: "accuracy 0.9412 (with flip-translate TTA; 0.9310 without)", the
        delivered accuracy, labelled; selective TTA says on what share of the images: "(with flip TTA on the 25%
        least sure; ...)". A multi-label model's: "mAP 0.9012; exact match 0.7100, Hamming loss 0.0800, F1
        micro 0.8100 / macro 0.8000 (...)", the accuracy there being the exact match."""
        if self.multi_label:
            sets = (
                f"mAP {self.delivered_map:.4f}; exact match {self.delivered_accuracy:.4f}, Hamming loss "
                f"{self.hamming_loss:.4f}, F1 micro {self.micro_f1:.4f} / macro {self.macro_f1:.4f}"
            )
            without = f" (with {self.tta} TTA; exact match {self.plain_accuracy:.4f} without)"
            return sets + (without if self.tta != "none" else "")
        if self.tta == "none":
            return f"accuracy {self.delivered_accuracy:.4f}"
        covered = "" if self.tta_share == 1 else f" on the {self.tta_share:.0%} least sure"
        return (
            f"accuracy {self.delivered_accuracy:.4f} (with {self.tta} TTA{covered}; {self.plain_accuracy:.4f} without)"
        )


SCORE_FIELDS = tuple(field.name for field in dataclasses.fields(Scores))


def scores_of_splits(scored: dict[str, tuple[Logits, np.ndarray]]) -> dict[str, Any]:
    """The metrics.jsonl entries of each split's logits against its labels. Multi-label data is decided at a
    threshold per class chosen on the "val" split's delivered probabilities (`choose_thresholds`; UNCHOSEN
    without one), which the entries keep as "thresholds"."""
    thresholds = None
    if any(labels.ndim == 2 for _, labels in scored.values()):
        if "val" in scored:
            logits, labels = scored["val"]
            thresholds = choose_thresholds(probabilities(logits.delivered), np.asarray(labels))
        else:
            thresholds = np.full(next(iter(scored.values()))[1].shape[1], UNCHOSEN)
    metrics: dict[str, Any] = {}
    for name, (logits, labels) in scored.items():
        metrics |= Scores.of(logits, labels, thresholds).metrics(name)
    return metrics | ({"thresholds": thresholds.tolist()} if thresholds is not None else {})


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
    inference: InferenceConfig = NO_TTA,
    bf16: bool = False,
    *,
    multi_label: bool = False,
) -> Logits:
    """Logits of (b, H, W, C) uint8 batches, in eval mode; both plain and delivered from one pass of views (see
    `views`), under bf16 autocast with `bf16`; `multi_label`: of a model with a sigmoid per class."""
    was_training = model.training
    model.eval()
    plain, delivered, viewed = [], [], []
    try:
        for batch in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                x = to_input(batch.to(device), normalization)
                one, averaged, doubtful = views(model, x, inference, multi_label=multi_label)
            plain.append(one.float().cpu())
            delivered.append(averaged.float().cpu())
            viewed.append(doubtful.cpu())
    finally:
        model.train(was_training)
    if not plain:
        return Logits(torch.empty(0), torch.empty(0), inference.tta, torch.zeros(0, dtype=torch.bool))
    return Logits(torch.cat(plain), torch.cat(delivered), inference.tta, torch.cat(viewed))


def predict_and_score(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    labels: np.ndarray,
    normalization: Normalization,
    device: torch.device,
    inference: InferenceConfig = NO_TTA,
    bf16: bool = False,
    thresholds: np.ndarray | None = None,
) -> tuple[Scores, Logits]:
    """Plain and delivered scores of `model` on `batches` whose true classes are `labels` (multi-hot for a
    multi-label model, decided at `thresholds`), and its logits."""
    logits = predict(model, batches, normalization, device, inference, bf16, multi_label=labels.ndim == 2)
    return Scores.of(logits, labels, thresholds), logits


def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    normalization: Normalization,
    device: torch.device,
    inference: InferenceConfig = NO_TTA,
    bf16: bool = False,
    *,
    multi_label: bool = False,
) -> torch.Tensor:
    """(N, H, W, C) uint8 -> (N, classes) float32 delivered logits on the CPU."""
    return predict(model, in_order(images), normalization, device, inference, bf16, multi_label=multi_label).delivered


def views(
    model: nn.Module, x: torch.Tensor, inference: InferenceConfig, *, multi_label: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits of (B, C, H, W) inputs seen once, the delivered logits, and which images got the test-time views.

    The delivered logits average the views `inference.tta` names for the images whose plain top-class
    probability is below `inference.tta_below` (all of them at 1), and are the plain logits for the rest:
    selective TTA spends its extra forward passes on the images the model is unsure of. Each image's answer
    depends on it alone.
    """
    tta = inference.tta
    plain: torch.Tensor = model(x)
    if tta == "none":
        return plain, plain, torch.zeros(len(x), dtype=torch.bool, device=x.device)
    doubtful = unsure(plain, inference.tta_below, multi_label=multi_label)
    if bool(doubtful.all()):
        return plain, averaged_views(model, x, plain, tta, multi_label=multi_label), doubtful
    delivered = plain.clone()
    if bool(doubtful.any()):
        averaged = averaged_views(model, x[doubtful], plain[doubtful], tta, multi_label=multi_label)
        delivered[doubtful] = averaged.to(plain.dtype)
    return plain, delivered, doubtful


def averaged_views(
    model: nn.Module, x: torch.Tensor, plain: torch.Tensor, tta: str, *, multi_label: bool = False
) -> torch.Tensor:
    """The logits of (B, C, H, W) inputs averaged over the test-time views `tta` names; `plain` is model(x).
    A multi-label model's views average their probabilities (each class's sigmoid), returned as the logits of
    the average.

    "flip": the image and its mirror, equally weighted. "flip-translate": half on the flip pair, a
    quarter each on the flip pairs of the image shifted one pixel up-left and down-right (reflected).
    """

    def seen(view: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = model(view) if view is not x else plain
        return torch.sigmoid(logits.float()) if multi_label else logits

    def mirrored(view: torch.Tensor) -> torch.Tensor:
        return 0.5 * (seen(view) + seen(view.flip(-1)))

    average = mirrored(x)
    if tta == "flip-translate":
        height, width = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")  # (B, C, H+2, W+2)
        up_left, down_right = padded[..., :height, :width], padded[..., 2:, 2:]
        average = 0.5 * average + 0.25 * (mirrored(up_left) + mirrored(down_right))
    return torch.logit(average, eps=1e-6) if multi_label else average


def tta_logits(
    model: nn.Module, x: torch.Tensor, inference: InferenceConfig, *, multi_label: bool = False
) -> torch.Tensor:
    """The delivered logits of (B, C, H, W) inputs, as `views` gives them, in a form export can trace: no
    branch on the data. The views run on the unsure images, or on the first image when none is (a graph cannot
    branch on that, and a batch of no images does not export); that image then keeps its plain logits."""
    tta, below = inference.tta, inference.tta_below
    plain: torch.Tensor = model(x)
    if tta == "none":
        return plain
    if below >= 1:
        return averaged_views(model, x, plain, tta, multi_label=multi_label)
    doubtful = unsure(plain, below, multi_label=multi_label)
    chosen = torch.cat([doubtful[:1] | ~doubtful.any(), doubtful[1:]])
    rows = torch.nonzero(chosen).squeeze(1)  # (R,) indices, R >= 1
    torch._check(rows.shape[0] >= 1)  # type: ignore[no-untyped-call]  # torch leaves _check untyped
    chosen_plain = plain.index_select(0, rows)
    averaged = averaged_views(model, x.index_select(0, rows), chosen_plain, tta, multi_label=multi_label)
    averaged = averaged.to(plain.dtype)
    return plain.index_copy(0, rows, torch.where(doubtful.index_select(0, rows)[:, None], averaged, chosen_plain))


def unsure(plain: torch.Tensor, below: float, *, multi_label: bool = False) -> torch.Tensor:
    """(B,) bool: the images whose plain top-class probability is below `below` (all of them at 1); for a
    multi-label model, those with a class whose sigmoid is that unsure either way (max(p, 1 - p) below it)."""
    if below >= 1:
        return torch.ones(len(plain), dtype=torch.bool, device=plain.device)
    if multi_label:
        probability = torch.sigmoid(plain.float())
        return torch.maximum(probability, 1 - probability).amin(1) < below
    return torch.softmax(plain.float(), 1).amax(1) < below
