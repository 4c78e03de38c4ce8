"""The doctor: what is wrong with a dataset — suspected label errors, exact and near copies within a split and
across splits (leakage), outliers and odd images, class balance — as one typed `Diagnosis`.

from cnnlab.config import DataConfig, DoctorConfig
from cnnlab.data import load_dataset
from cnnlab.doctor import examine
diagnosis = examine(load_dataset(DataConfig(data="photos/")), DoctorConfig())
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cnnlab.config import DoctorConfig, check_ranges
from cnnlab.data.cache import cache_root
from cnnlab.data.dataset import Dataset, Pixels, SplitName, concatenate_images
from cnnlab.data.exclude import Kind, split_fingerprint
from cnnlab.data.loader import in_order
from cnnlab.doctor import duplicates, labels, odd, trained
from cnnlab.doctor.diagnosis import Diagnosis, Finding, ImageRef, Leakage, Rows
from cnnlab.doctor.embeddings import digests_of, embed, embedding_size
from cnnlab.doctor.stages import Stages
from cnnlab.evaluate import evaluate, test_split_of
from cnnlab.models import load_model
from cnnlab.progress import Advance

__all__ = ["Diagnosis", "DoctorConfig", "Finding", "ImageRef", "Kind", "Leakage", "examine"]

# Of the budget, kept for the copy search and the findings after the trainings (on CIFAR-10 they took 51 s, 6%
# of the default 15 minutes, [A]).
RESERVE = 0.1
# Pixel values read per batch: the copy search's float views of a batch take about 12 bytes a value, so a batch
# of 1,000 photos of 384x256 took 8.5 GB; this many take about 400 MB whatever the images' size.
READ_VALUES = 32_000_000


def examine(
    dataset: Dataset, config: DoctorConfig, cache: Path | None = None, stages: Stages | None = None
) -> Diagnosis:
    """Examine every split of `dataset`; with `config.run`, that run's test accuracy with and without leaks.
    Embeddings are cached in `cache` (default: cnnlab's cache folder)."""
    check_ranges(config, "doctor")
    stages = stages or Stages(quiet=True)
    root = cache or cache_root(None)
    splits = dataset.splits()
    names = list(splits)
    sizes = [len(split) for split in splits.values()]
    rows = Rows(names, np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int).tolist(), dataset)
    images = concatenate_images([split.images for split in splits.values()])
    given = np.concatenate([split.labels for split in splits.values()])
    total = len(given)

    with stages.step("pixels read", total) as advance:
        digests, statistics, descriptors, views = _read_pixels(images, advance)
    with stages.step(f"embeddings at {embedding_size(dataset.image_shape)} px", total) as advance:
        embeddings = embed(images, digests, root, advance)

    probabilities, method = _label_probabilities(images, embeddings, given, dataset, config, stages)
    findings, agreement, method = _suspected_labels(probabilities, given, rows, method)

    with stages.step("nearest neighbours by embedding", total) as advance:
        neighbours = duplicates.nearest_neighbours(duplicates.reduced(embeddings), advance)
    with stages.step("nearest neighbours by pixels", total) as advance:
        alike = duplicates.nearest_neighbours(descriptors, advance)
    train = splits[SplitName.TRAIN].images
    calibration = _calibration(train, statistics, views, (neighbours, alike), given, config.seed, stages)
    pairs = duplicates.candidate_pairs(neighbours, alike)
    closest = duplicates.candidate_pairs(neighbours, alike, nearest=duplicates.REGISTERED_NEIGHBOURS)
    with stages.step("candidate pairs compared", len(pairs)) as advance:
        near = duplicates.copy_pairs(pairs, closest, views, calibration, advance)

    copy_findings, test_copies = _copy_findings(digests, near, rows)
    findings += copy_findings
    findings += _odd_findings(statistics, neighbours, images, splits, rows, dataset)
    leakage = _leakage(config.run, dataset, test_copies, sizes[-1])
    return Diagnosis(
        images=total,
        data=f"{dataset.name}" + (f" ({dataset.layout})" if dataset.layout else ""),
        classes=list(dataset.classes),
        class_counts={name.value: counts.tolist() for name, counts in dataset.class_counts().items()},
        fingerprints={name.value: split_fingerprint(split) for name, split in splits.items()},
        label_method=method,
        label_agreement=agreement,
        calibration=calibration,
        leakage=leakage,
        findings=findings,
        seconds=dict(stages.seconds),
        peak_mb=dict(stages.peak_mb),
        label_probabilities=probabilities,
    )


def _calibration(
    train: Pixels,
    statistics: odd.PixelStatistics,
    views: np.ndarray,
    searches: tuple[duplicates.Neighbours, ...],
    given: np.ndarray,
    seed: int,
    stages: Stages,
) -> duplicates.Calibration:
    """The copy thresholds, from a seeded sample of the `train` images (its rows come first), checked on nearest
    pairs of differently labelled images by each of the `searches` (what finds candidates finds look-alikes)."""
    # Copies of a nearly constant image correlate with nothing: the calibration copies the others.
    textured = np.flatnonzero(statistics.std[: len(train)] >= odd.CONSTANT_STD)
    chosen = min(duplicates.CALIBRATION_IMAGES, len(textured))
    sample = np.sort(np.random.default_rng(seed).choice(textured, chosen, replace=False))
    unrelated = np.concatenate([duplicates.unrelated_pairs(found, given, seed) for found in searches])
    with stages.step("copy calibration", len(sample) + len(unrelated)) as advance:
        calibration = duplicates.calibrate(
            np.asarray(train[sample]), views[sample], (views[unrelated[:, 0]], views[unrelated[:, 1]]), seed
        )
        advance(len(sample) + len(unrelated))
    return calibration


def _read_pixels(images: Pixels, advance: Advance) -> tuple[np.ndarray, odd.PixelStatistics, np.ndarray, np.ndarray]:
    """In one pass over the images (a disk-backed split is read once): their digests, their statistics for the
    odd-image checks, and their pixel descriptors and views for the copy search."""
    digests, statistics, descriptors, views = [], [], [], []
    per_image = int(np.prod(images.shape[1:]))
    for batch in in_order(images, max(1, min(1000, READ_VALUES // per_image))):
        digests.append(digests_of(batch))
        statistics.append(odd.PixelStatistics.of(batch))
        descriptor, view = duplicates.views_of(batch)
        descriptors.append(descriptor)
        views.append(view)
        advance(len(batch))
    return (
        np.concatenate(digests),
        odd.PixelStatistics.joined(statistics),
        np.concatenate(descriptors),
        np.concatenate(views),
    )


def _label_probabilities(
    images: Pixels, embeddings: np.ndarray, given: np.ndarray, dataset: Dataset, config: DoctorConfig, stages: Stages
) -> tuple[np.ndarray, str]:
    """Out-of-sample probabilities of every image's class, and which model gave them (and why)."""
    classes, folds = len(dataset.classes), config.folds
    wanted = config.label_model
    if wanted == "auto":
        wanted = "both" if trained.ladder_for(dataset.image_shape) else "embeddings"
    candidates: dict[str, np.ndarray] = {}

    def linear() -> None:
        with stages.step(f"linear model on embeddings, {folds}-fold", folds) as advance:
            candidates[f"a linear model on embeddings, {folds}-fold"] = labels.out_of_sample_probabilities(
                embeddings, given, classes, folds, config.seed
            )
            advance(folds)

    if wanted in ("embeddings", "both"):
        linear()
    if wanted in ("training", "both"):
        found, said = _trained(images, given, dataset, config, stages)
        if found is None:  # no training fits the budget: the linear model alone, and why
            if not candidates:
                linear()
            return next(iter(candidates.values())), f"{next(iter(candidates))} ({said})"
        candidates[said] = found
    if len(candidates) == 1:
        return next(iter(candidates.values())), next(iter(candidates))
    (linear_said, linear_found), (trained_said, trained_found) = candidates.items()
    weight, pooled = labels.best_pool(trained_found, linear_found, given)
    said = "; ".join(
        f"{name} {labels.agreement(found, given):.1%}"
        for name, found in ((trained_said, trained_found), (linear_said, linear_found))
    )
    return pooled, (
        f"the log-linear pool of both, weight {weight:.1f} on the linear model, the most often agreeing with the "
        f"given labels out of sample ({said}; pooled {labels.agreement(pooled, given):.1%})"
    )


def _trained(
    images: Pixels, given: np.ndarray, dataset: Dataset, config: DoctorConfig, stages: Stages
) -> tuple[np.ndarray | None, str]:
    """K-fold trainings of the strongest recipe that fits what the budget leaves (RESERVE of it kept for the steps
    after), and what was measured and chosen; None when no recipe fits. The folds may be fewer than asked: the
    ladder's fast94 in 2 folds is more accurate than fast90 in 3."""
    seconds = config.budget * 60 * (1 - RESERVE) - sum(stages.seconds.values())
    folds = config.folds
    with tempfile.TemporaryDirectory(prefix="cnnlab-doctor-") as scratch:
        with stages.step("recipe chosen by timing its steps", 1) as advance:
            choice = trained.choose_recipe(images, given, dataset, folds, config.seed, Path(scratch), seconds)
            advance(1)
        if choice.rung is None:
            return None, choice.said
        recipe = choice.rung.recipe
        with stages.step(f"{recipe} trainings, {choice.folds}-fold", choice.folds) as advance:
            found = trained.trained_probabilities(images, given, dataset, choice, config.seed, Path(scratch), advance)
    return found, f"{choice.folds}-fold {recipe} trainings ({choice.said})"


def _suspected_labels(
    probabilities: np.ndarray, given: np.ndarray, rows: Rows, method: str
) -> tuple[list[Finding], float, str]:
    """The label findings by confident learning (of multi-label data, each class against the rest), how often the
    out-of-sample probabilities agree with the given labels, and `method` with how the findings were made."""
    if given.ndim == 2:
        label_sets = labels.label_set_issues(probabilities, given)
        against = "; each class against the rest, a suspect being one image's class given wrongly or missing"
        return _label_set_findings(label_sets, rows, given), label_sets.agreement, method + against
    issues = labels.confident_learning(probabilities, given)
    return _label_findings(issues, rows, rows.dataset.classes), issues.agreement, method


def _label_findings(issues: labels.LabelIssues, rows: Rows, classes: tuple[str, ...]) -> list[Finding]:
    found = []
    scores = "p(suggested) - p(given)" if labels.RANKING == "margin" else "1 - p(given)"
    for row, suggested, confidence, suspicion in zip(
        issues.issues, issues.suggested, issues.self_confidence, issues.suspicion, strict=True
    ):
        image = rows.ref(int(row))
        probability = float(issues.probabilities[row, suggested])
        found.append(
            Finding(
                Kind.LABEL,
                image,
                float(suspicion),
                f"given {image.label} (p={confidence:.3f}), most probably {classes[suggested]} (p={probability:.3f}); "
                f"score: {scores}",
                suggested=classes[suggested],
            )
        )
    return found


def _label_set_findings(issues: labels.LabelSetIssues, rows: Rows, given: np.ndarray) -> list[Finding]:
    """A finding per suspected (image, class) decision of multi-label data, suggesting the corrected label set."""
    found, classes = [], rows.dataset.classes
    for row, k, was_given, confidence in zip(
        issues.rows, issues.classes, issues.given, issues.self_confidence, strict=True
    ):
        corrected = given[row].copy()
        corrected[k] = 1 - corrected[k]
        chance = float(issues.probabilities[row, k])
        what = (
            f"{classes[k]} given (p={chance:.3f}), likely wrongly"
            if was_given
            else f"{classes[k]} missing (p={chance:.3f})"
        )
        detail = f"{what}; score: 1 - p(as given)"
        found.append(
            Finding(Kind.LABEL, rows.ref(int(row)), 1 - float(confidence), detail, rows.label_of(corrected) or "none")
        )
    return found


def _copy_findings(digests: np.ndarray, near: list[duplicates.CopyPair], rows: Rows) -> tuple[list[Finding], set[int]]:
    """A finding per copy (on the later image of each pair), and the test split's rows with a copy in train."""
    pairs: dict[tuple[int, int], tuple[float, str]] = {}
    for group in duplicates.exact_groups(digests):
        for row in group[1:].tolist():
            pairs[(int(group[0]), row)] = (1.0, "exact copy (the same pixels)")
    measured = {"near-exact": "aligned correlation", "near duplicate": "correlation once registered"}
    for pair in near:
        words = f"{pair.tier} ({measured[pair.tier]} {pair.similarity:.3f})"
        pairs.setdefault((pair.first, pair.second), (pair.similarity, words))
    found, test_copies = [], set()
    for (first, second), (similarity, words) in sorted(pairs.items(), key=lambda item: -item[1][0]):
        image, other = rows.ref(second), rows.ref(first)
        across = image.split != other.split
        if image.split == SplitName.TEST and other.split == SplitName.TRAIN:
            test_copies.add(image.index)
        kind = Kind.LEAK if across else Kind.DUPLICATE
        found.append(Finding(kind, image, similarity, f"{words} of {other.split.value} #{other.index}", other=other))
    return found, test_copies


def _odd_findings(
    statistics: odd.PixelStatistics,
    neighbours: duplicates.Neighbours,
    images: Any,
    splits: Any,
    rows: Rows,
    dataset: Dataset,
) -> list[Finding]:
    native = [split.native_sizes for split in splits.values()]
    native_sizes = np.concatenate(native) if all(sizes is not None for sizes in native) else None
    reasons = odd.odd_reasons(statistics, dataset.image_shape.channels == 3, native_sizes, dataset.image_shape.size)
    found = []
    for row, said in enumerate(reasons):
        if said:
            detail = "; ".join(f"{name} ({value:.3g})" for name, value in said)
            found.append(Finding(Kind.ODD, rows.ref(row), float(len(said)), detail))
    outliers = odd.outlier_scores(neighbours.similarities, neighbours.indices)
    for row in np.flatnonzero(outliers > odd.ROBUST_Z)[np.argsort(-outliers[outliers > odd.ROBUST_Z])].tolist():
        found.append(
            Finding(
                Kind.OUTLIER,
                rows.ref(row),
                float(outliers[row]),
                f"far from its nearest images (robust z {outliers[row]:.1f} of its mean embedding cosine to its "
                f"{duplicates.NEIGHBOURS} nearest)",
            )
        )
    return found


def _leakage(run: str | None, dataset: Dataset, test_copies: set[int], test_images: int) -> Leakage:
    if run is None:
        return Leakage(test_images, len(test_copies))
    model = load_model(Path(run).expanduser())
    test = test_split_of(model, dataset)
    evaluation = evaluate(model, test)
    given = test.labels.astype(bool) if test.labels.ndim == 2 else np.eye(len(dataset.classes), dtype=bool)[test.labels]
    right = (evaluation.answered == given).all(1)  # the top class, or the whole label set
    clean = np.ones(len(right), bool)
    clean[sorted(test_copies)] = False
    return Leakage(
        test_images, len(test_copies), float(right.mean()), float(right[clean].mean()) if clean.any() else None, run
    )
