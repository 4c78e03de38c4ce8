"""Suspected label errors: out-of-sample class probabilities, then confident learning.

Confident learning is from Northcutt, Jiang and Chuang, "Confident Learning: Estimating Uncertainty in Dataset
Labels", JAIR 70 (2021): a class's threshold is the mean probability the model gives that class over the images
labelled with it; an image is counted in the confident joint at (its given label, the class it most probably is
among those whose probability reaches their threshold), whose rows are then scaled to the number of images given
each label; a row's off-diagonal counts estimate how many images given that label belong to other classes, and
that many of them, the most suspected, are the suspected errors ("prune by class"), ranked by the margin (the most
probable other class's probability minus the given label's: largest first; `RANKING`).
Written here from the paper with numpy. Multi-label data is examined one class against the rest (carried or not,
as the paper's multi-label extension does): a suspect is a class given wrongly, or one missing.

The probabilities come from a linear model on pretrained embeddings (here) and, for small images, from K-fold
trainings of a fast net (`trained.py`), each image scored by models that never saw it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import KFold, StratifiedKFold

from cnnlab.data.dataset import class_counts
from cnnlab.errors import CnnlabError

# The linear model's L2 penalty on its weights (on the mean loss over standardised features) is chosen per
# dataset: the best of PENALTIES in a 2-fold cross-validation on at most PENALTY_SAMPLE images, scaled by how many
# fewer images those folds train on (the right penalty falls as the data grows). Measured: CIFAR-10's best was
# 1e-2 (83.8% out of sample against 82.6% at 1e-3 and 81.9% at 1e-1), flowers128's 1e-1 to 3e-1.
PENALTIES = (1e-3, 1e-2, 1e-1, 1.0)
PENALTY_SAMPLE = 10_000
LBFGS_STEPS = 100
# How suspects are ranked (`suspicion`). Measured on CIFAR-10 with 2% of its training labels flipped among the
# images a model finds most ambiguous ([A], BENCHMARKS.md): of confident learning's 882 suspects, ranked by the
# margin, 44.2% of the flips are found (precision 50%); by self-confidence, 39.2% (44%).
RANKING = "margin"
# The weights on the second of two sources of probabilities tried in their pool (`best_pool`), one chosen by
# agreement. A coarse grid: a choice among 11 on tens of thousands of images is hardly optimistic. Measured on
# CIFAR-10 ([A]): fast94 in 3 folds (6 epochs) agrees with the given labels on 92.5% out of sample, the linear
# model on embeddings on 83.2%, their pool at 0.2 on 93.5% (their mean, 0.5, on 91.3%).
POOL_WEIGHTS = tuple(round(0.1 * step, 1) for step in range(11))


@dataclass(frozen=True)
class LabelIssues:
    probabilities: np.ndarray  # (N, K) out-of-sample class probabilities of every image
    agreement: float  # how often their most probable class is the given label
    issues: np.ndarray  # (M,) indices of the suspected errors, most suspicious first
    suggested: np.ndarray  # (M,) the class each of them most probably is
    self_confidence: np.ndarray  # (M,) their probability of the given label
    suspicion: np.ndarray  # (M,) how strongly each is suspected (`suspicion`), descending
    confident_joint: np.ndarray  # (K, K) calibrated counts: given label x the class confidently predicted


@dataclass(frozen=True)
class LabelSetIssues:
    """Suspected errors of multi-label data: (image, class) decisions that are likely wrong."""

    probabilities: np.ndarray  # (N, K) out-of-sample probability of each class
    agreement: float  # the share of image-class decisions at 0.5 that are the given ones
    rows: np.ndarray  # (M,) the images, most suspicious first
    classes: np.ndarray  # (M,) the class each suspect concerns
    given: np.ndarray  # (M,) bool: that class was given (likely wrongly) or not (likely missing)
    self_confidence: np.ndarray  # (M,) the probability of what was given (p, or 1 - p), ascending


def label_set_issues(probabilities: np.ndarray, targets: np.ndarray) -> LabelSetIssues:
    """Confident learning of each class against the rest, the suspects of every class ranked together."""
    rows, classes, confidence = [], [], []
    for k in range(targets.shape[1]):
        chance = probabilities[:, k]
        binary = confident_learning(np.stack([1 - chance, chance], 1), targets[:, k].astype(np.int64))
        rows.append(binary.issues)
        classes.append(np.full(len(binary.issues), k))
        confidence.append(binary.self_confidence)
    order = np.argsort(np.concatenate(confidence), kind="stable")
    found = np.concatenate(rows)[order]
    concerned = np.concatenate(classes)[order]
    return LabelSetIssues(
        probabilities=probabilities,
        agreement=agreement(probabilities, targets),
        rows=found,
        classes=concerned,
        given=targets[found, concerned].astype(bool),
        self_confidence=np.concatenate(confidence)[order],
    )


def out_of_sample_probabilities(
    features: np.ndarray, labels: np.ndarray, classes: int, folds: int, seed: int
) -> np.ndarray:
    """(N, K) probabilities of each image from a softmax regression fitted on the other folds (stratified K-fold);
    for multi-hot labels, a logistic regression per class (K-fold)."""
    folds = _folds(labels, classes, folds)
    penalty = _penalty_times_images(features, labels, classes, seed) / (len(labels) * (folds - 1) / folds)
    return _cross_validated(features, labels, classes, folds, seed, penalty)


def fitted_probabilities(
    train: np.ndarray, labels: np.ndarray, features: np.ndarray, classes: int, seed: int
) -> np.ndarray:
    """(N, K) probabilities of `features` from a model fitted on (`train`, `labels`), its penalty chosen as
    `out_of_sample_probabilities` chooses it where every class has 2 images, else the middle of PENALTIES."""
    if class_counts(labels, classes).min() >= 2 and len(labels) >= 8:
        penalty = _penalty_times_images(train, labels, classes, seed) / len(labels)
    else:
        penalty = PENALTIES[1] * PENALTY_SAMPLE / 2 / len(labels)
    return _softmax_regression(train, labels, features, classes, penalty)


def _cross_validated(
    features: np.ndarray, labels: np.ndarray, classes: int, folds: int, seed: int, penalty: float
) -> np.ndarray:
    probabilities = np.zeros((len(labels), classes), np.float32)
    for fitted, held in _splitter(labels, folds, seed).split(features, labels):
        probabilities[held] = _softmax_regression(features[fitted], labels[fitted], features[held], classes, penalty)
    return probabilities


def _penalty_times_images(features: np.ndarray, labels: np.ndarray, classes: int, seed: int) -> float:
    """The best of PENALTIES on a sample, 2-fold, times the images its folds train on: divided by the images
    a model trains on, the penalty for it."""
    rows = np.arange(len(labels))
    if len(rows) > PENALTY_SAMPLE:
        rows = np.sort(np.random.default_rng(seed).choice(rows, PENALTY_SAMPLE, replace=False))
    sample, sample_labels = features[rows], labels[rows]
    folds = _folds(sample_labels, classes, 2)
    scores = {
        penalty: agreement(_cross_validated(sample, sample_labels, classes, folds, seed, penalty), sample_labels)
        for penalty in PENALTIES
    }
    return max(scores, key=scores.__getitem__) * len(rows) * (folds - 1) / folds


def _folds(labels: np.ndarray, classes: int, folds: int) -> int:
    """`folds`, or fewer when a class has fewer images (every fold must hold each class); at least 2."""
    smallest = int(class_counts(labels, classes).min())
    if smallest < 2:
        raise CnnlabError(f"a class has {smallest} image(s): out-of-sample probabilities need at least 2 per class")
    return min(folds, smallest)


def folds_of(labels: np.ndarray, classes: int, folds: int, seed: int) -> KFold | StratifiedKFold:
    """The seeded folds every out-of-sample model uses: `folds`, or fewer when a class has fewer images."""
    return _splitter(labels, _folds(labels, classes, folds), seed)


def _splitter(labels: np.ndarray, folds: int, seed: int) -> KFold | StratifiedKFold:
    """Folds stratified by class; for multi-hot labels, shuffled folds."""
    if labels.ndim == 2:
        return KFold(n_splits=folds, shuffle=True, random_state=seed)
    return StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)


def _softmax_regression(
    train: np.ndarray, labels: np.ndarray, held: np.ndarray, classes: int, penalty: float
) -> np.ndarray:
    """A multinomial logistic regression (full-batch L-BFGS, L2-penalised) on standardised features; for
    multi-hot labels, a logistic regression per class (the binary cross-entropy summed over the classes, whose
    gradient has the same form)."""
    multi = labels.ndim == 2
    activation = torch.sigmoid if multi else functools.partial(torch.softmax, dim=1)
    x = torch.from_numpy(train).float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    targets = torch.from_numpy(labels).float() if multi else F.one_hot(torch.from_numpy(labels), classes).float()
    weight = torch.zeros(x.shape[1], classes)
    bias = torch.zeros(classes)
    weight.grad, bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=LBFGS_STEPS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        # The gradient by hand: autograd's x.T @ g for the weights runs 4x slower on CPU than (g.T @ x).T.
        logits = x @ weight + bias
        if multi:
            fit = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / len(x)
        else:
            fit = F.cross_entropy(logits, targets)
        loss = fit + penalty * weight.square().sum()
        error = (activation(logits) - targets) / len(x)
        weight.grad.copy_((error.T @ x).T + 2 * penalty * weight)  # type: ignore[union-attr]
        bias.grad.copy_(error.sum(0))  # type: ignore[union-attr]
        return loss

    optimizer.step(closure)  # type: ignore[no-untyped-call]
    held_x = (torch.from_numpy(held).float() - mean) / std
    held_probabilities: np.ndarray = activation(held_x @ weight + bias).numpy()
    return held_probabilities


def suspicion(probabilities: np.ndarray, labels: np.ndarray, ranking: str = RANKING) -> np.ndarray:
    """(N,) how strongly each image's label is suspected by `ranking` (higher: look first): "self-confidence",
    1 - p(given label); "margin", the most probable other class's p minus p(given)."""
    given: np.ndarray = probabilities[np.arange(len(labels)), labels]
    if ranking == "self-confidence":
        return 1 - given
    margin: np.ndarray = _others(probabilities, labels).max(1) - given
    return margin


def _others(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """`probabilities` with each image's given label's set to -1: what the other classes say."""
    others = probabilities.copy()
    others[np.arange(len(labels)), labels] = -1.0
    return others


def confident_learning(probabilities: np.ndarray, labels: np.ndarray, ranking: str = RANKING) -> LabelIssues:
    """The suspected label errors among images with `labels`, given their out-of-sample `probabilities`, the most
    suspicious first by `ranking` (see `suspicion`)."""
    count, classes = probabilities.shape
    given = probabilities[np.arange(count), labels]
    # Each class's threshold: the mean probability of that class over the images labelled with it.
    thresholds = np.array(
        [probabilities[labels == k, k].mean() if np.any(labels == k) else 1.0 for k in range(classes)]
    )
    above = probabilities >= thresholds - 1e-6
    confident = np.where(above, probabilities, -1.0).argmax(1)
    counted = above.any(1)
    counts = np.zeros((classes, classes), np.int64)
    np.add.at(counts, (labels[counted], confident[counted]), 1)
    # Calibrated (the paper's eq. 3): each row scaled to the number of images given that label, as the images
    # that reach no threshold belong somewhere too.
    given_counts = np.bincount(labels, minlength=classes)
    joint = np.rint(counts / np.maximum(counts.sum(1, keepdims=True), 1) * given_counts[:, None]).astype(np.int64)
    suspected = suspicion(probabilities, labels, ranking)
    # Prune by class: of the images given label i, the joint's estimate of how many belong to other classes,
    # the most suspected.
    chosen = []
    for i in range(classes):
        given_i = np.flatnonzero(labels == i)
        estimate = int(joint[i].sum() - joint[i, i])
        chosen.append(given_i[np.argsort(-suspected[given_i], kind="stable")[:estimate]])
    issues = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
    issues = issues[np.argsort(-suspected[issues], kind="stable")]
    return LabelIssues(
        probabilities=probabilities,
        agreement=agreement(probabilities, labels),
        issues=issues,
        suggested=_others(probabilities[issues], labels[issues]).argmax(1),  # the most probable other class
        self_confidence=given[issues],
        suspicion=suspected[issues],
        confident_joint=joint,
    )


def pooled(first: np.ndarray, second: np.ndarray, weight: float, multi_label: bool) -> np.ndarray:
    """The log-linear pool of two sources' probabilities, `weight` on `second`: their log-probabilities' weighted
    mean, renormalised (of `multi_label` sigmoids, each class's log-odds' weighted mean)."""
    if multi_label:
        odds = (1 - weight) * _logit(first) + weight * _logit(second)
        chance: np.ndarray = (1 / (1 + np.exp(-odds))).astype(np.float32)
        return chance
    logs = (1 - weight) * np.log(np.clip(first, 1e-7, 1)) + weight * np.log(np.clip(second, 1e-7, 1))
    logs -= logs.max(1, keepdims=True)
    chances = np.exp(logs)
    normalised: np.ndarray = (chances / chances.sum(1, keepdims=True)).astype(np.float32)
    return normalised


def _logit(probabilities: np.ndarray) -> np.ndarray:
    clipped = np.clip(probabilities, 1e-7, 1 - 1e-7)
    odds: np.ndarray = np.log(clipped) - np.log1p(-clipped)
    return odds


def best_pool(first: np.ndarray, second: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """The weight of POOL_WEIGHTS on `second` whose `pooled` probabilities agree most often with `labels`, and
    those probabilities."""
    found = {weight: pooled(first, second, weight, labels.ndim == 2) for weight in POOL_WEIGHTS}
    weight = max(found, key=lambda weight: agreement(found[weight], labels))
    return weight, found[weight]


def agreement(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The share of images whose most probable class is their given label; for multi-hot labels, of image-class
    decisions at 0.5 that are the given ones."""
    if not len(labels):
        return 0.0
    if labels.ndim == 2:
        return float(((probabilities >= 0.5) == labels.astype(bool)).mean())
    return float((probabilities.argmax(1) == labels).mean())
