"""Multi-label decisions and scores: a sigmoid per class, a threshold per class, and the scores of label sets.

A class is answered when its probability is at least its threshold. The thresholds are chosen on the validation
split, each the one that maximises that class's F1 there (0.5 without a validation split, or for a class it never
shows). The scores are scikit-learn's: mean average precision over the classes (threshold-free, the headline), micro
and macro F1, exact match (the whole label set right: scikit-learn's accuracy of label sets) and Hamming loss (the
share of image-class decisions that are wrong).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    precision_recall_curve,
)

UNCHOSEN = 0.5  # a class's threshold with no validation images to choose it on


def probabilities(logits: torch.Tensor) -> np.ndarray:
    """(N, K) float32 logits of a sigmoid per class -> their probabilities."""
    return torch.sigmoid(logits.float()).numpy()


def binary_loss(logits: torch.Tensor, targets: np.ndarray) -> float:
    """The binary cross-entropy summed over the classes, averaged over images: the multi-label plain loss."""
    per_class = F.binary_cross_entropy_with_logits(logits.float(), torch.as_tensor(targets).float(), reduction="none")
    return float(per_class.sum(1).mean()) if len(logits) else float("nan")


def answered(probabilities: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(N, K) uint8: 1 where a class's probability reaches its threshold."""
    decided: np.ndarray = (probabilities >= thresholds[None, :]).astype(np.uint8)
    return decided


def answered_classes(row: np.ndarray, classes: list[str], thresholds: list[float]) -> list[tuple[str, float]]:
    """One image's answer: each class whose (K,) probability reaches its threshold, with it, most probable first."""
    order = np.argsort(-row, kind="stable")
    return [(classes[k], float(row[k])) for k in order if row[k] >= thresholds[k]]


def choose_thresholds(probabilities: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(K,) each class's threshold that maximises its F1 on these (N, K) probabilities and multi-hot targets:
    halfway between the lowest probability it answers and the next lower one, so that a slightly different image
    falls the same way. UNCHOSEN for a class with no positive image."""
    thresholds = np.full(targets.shape[1], UNCHOSEN)
    for k in range(targets.shape[1]):
        if not targets[:, k].any():
            continue
        precision, recall, cuts = precision_recall_curve(targets[:, k], probabilities[:, k])
        f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
        best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
        below = probabilities[:, k][probabilities[:, k] < cuts[best]]
        thresholds[k] = (cuts[best] + (below.max() if len(below) else 0.0)) / 2
    return thresholds


def average_precisions(probabilities: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(K,) each class's average precision over (N, K) probabilities and multi-hot targets; NaN for a class no
    image carries (it has no precision to average)."""
    return np.array(
        [
            average_precision_score(targets[:, k], probabilities[:, k]) if targets[:, k].any() else np.nan
            for k in range(targets.shape[1])
        ]
    )


def label_set_scores(probabilities: np.ndarray, targets: np.ndarray, thresholds: np.ndarray) -> dict[str, float]:
    """Mean average precision (over the classes that have positives), micro and macro F1, exact match and Hamming
    loss of (N, K) probabilities against multi-hot targets, the decisions at `thresholds`."""
    decided = answered(probabilities, thresholds)
    precisions = average_precisions(probabilities, targets)
    shown = ~np.isnan(precisions)
    return {
        "map": float(precisions[shown].mean()) if shown.any() else 0.0,
        "micro_f1": float(f1_score(targets, decided, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(targets, decided, average="macro", zero_division=0)),
        "exact_match": float(accuracy_score(targets, decided)),
        "hamming_loss": float(hamming_loss(targets, decided)),
    }
