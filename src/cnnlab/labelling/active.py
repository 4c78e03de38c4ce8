"""Active learning: which unlabelled images a person should label next, as a library function (`suggest`).

Two published methods, each where it is measured to help (BENCHMARKS.md, "labelling"):
- **Cold start**, while fewer than COLD_PER_CLASS images per class are labelled: TypiClust (Hacohen, Dekel and
  Weinshall, "Active Learning on a Budget: Opposite Strategies Suit High and Low Budgets", ICML 2022). The pool's
  pretrained embeddings are clustered into as many clusters as there will be labels (k-means); the largest clusters
  holding no labelled image are covered first, each by its most *typical* image (the inverse of its mean distance
  to its TYPICAL_NEIGHBOURS nearest in the cluster). With few labels a model's uncertainty is noise; typical and
  diverse images teach it the most.
- **Then, uncertainty with diversity**: margin sampling (the top two probabilities' difference, smallest first;
  Scheffer, Decomain and Wrobel 2001) of a linear head on the same embeddings, made diverse as in Zhdanov, "Diverse
  mini-batch Active Learning" (2019): the BETA x n least certain images are clustered into n (k-means weighted by
  their uncertainty) and the image nearest each centre is chosen, so that a batch is not n near-identical doubts.
Images the doctor found to be copies of each other form a group: once one of a group is labelled or chosen, the
others are not suggested.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans

from cnnlab.doctor import duplicates
from cnnlab.doctor.labels import fitted_probabilities

COLD_PER_CLASS = 20  # labelled images per class (on average) below which the cold start chooses (BENCHMARKS.md)
TYPICAL_NEIGHBOURS = 20  # TypiClust's k for typicality
MAX_CLUSTERS = 2000  # k-means clusters at most; beyond this the clustering costs more than labelling is worth
BETA = 10  # Zhdanov's prefilter: the least certain BETA x n images are clustered into n
FULL_KMEANS = 20_000  # points x clusters / 1000 up to which plain k-means runs; beyond, mini-batch k-means


@dataclass(frozen=True)
class Suggestion:
    rows: np.ndarray  # (n,) indices into the pool, in the order to label them
    method: str  # which method chose them, in words
    margins: np.ndarray | None  # (n,) how certain the head is of each (`margins_of`; 0: a tie); None: cold start


def suggest(
    embeddings: np.ndarray,
    targets: np.ndarray,
    classes: int,
    n: int,
    *,
    copies: np.ndarray | None = None,
    eligible: np.ndarray | None = None,
    probabilities: np.ndarray | None = None,
    seed: int = 0,
) -> Suggestion:
    """The `n` unlabelled images of the pool to label next. `embeddings`: (N, D) unit-length; `targets`: (N,) class
    indices with -1 where unlabelled, or (N, K) multi-hot rows with -1 rows where unlabelled; `copies`: (N,) a
    group number per image (-1: no copy), as the doctor found them; `eligible`: (N,) bool, the images that may be
    suggested (default: every unlabelled one); `probabilities`: (N, K) a head's, fitted on these labels (default:
    fitted here)."""
    labelled = targets.reshape(len(targets), -1).min(1) >= 0
    available = _available(labelled, copies) & (eligible if eligible is not None else True)
    n = min(n, int(available.sum()))
    if n == 0:
        return Suggestion(np.zeros(0, np.int64), "nothing left to label", None)
    vectors = duplicates.reduced(embeddings)
    if labelled.sum() < COLD_PER_CLASS * classes or not _every_class_seen(targets[labelled], classes):
        rows = typical_diverse(vectors, labelled, available, n, copies, seed)
        words = f"typical and diverse (TypiClust: fewer than {COLD_PER_CLASS} labels per class, or a class unseen)"
        return Suggestion(rows, words, None)
    if probabilities is None:
        probabilities = fitted_probabilities(embeddings[labelled], targets[labelled], embeddings, classes, seed)
    rows, margins = margin_diverse(vectors, probabilities, targets.ndim == 2, available, n, copies, seed)
    return Suggestion(rows, "least certain by margin, made diverse by clustering (Zhdanov 2019)", margins)


def _every_class_seen(targets: np.ndarray, classes: int) -> bool:
    if targets.ndim == 2:
        return bool((targets.sum(0) > 0).all())
    return len(np.unique(targets)) == classes


def _available(labelled: np.ndarray, copies: np.ndarray | None) -> np.ndarray:
    """Unlabelled images with no labelled copy."""
    available = ~labelled
    if copies is not None:
        grouped = copies >= 0
        covered = np.unique(copies[labelled & grouped])
        available &= ~(grouped & np.isin(copies, covered))
    return available


def _one_per_group(order: np.ndarray, copies: np.ndarray | None, n: int) -> np.ndarray:
    """The first `n` of `order` (rows, best first), skipping a row whose copy group was already taken."""
    if copies is None:
        return order[:n]
    taken: set[int] = set()
    chosen = []
    for row in order:
        group = int(copies[row])
        if group >= 0:
            if group in taken:
                continue
            taken.add(group)
        chosen.append(row)
        if len(chosen) == n:
            break
    return np.array(chosen, np.int64)


def _kmeans(points: np.ndarray, clusters: int, seed: int, weights: np.ndarray | None = None) -> KMeans:
    if len(points) * clusters <= FULL_KMEANS * 1000:
        model: KMeans = KMeans(clusters, n_init=1, random_state=seed)
    else:
        model = MiniBatchKMeans(clusters, n_init=1, random_state=seed, batch_size=4096)
    return model.fit(points, sample_weight=weights)


def typical_diverse(
    vectors: np.ndarray,
    labelled: np.ndarray,
    available: np.ndarray,
    n: int,
    copies: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """TypiClust's choice of `n` available rows: one per cluster, the largest clusters without a labelled image
    first, each cluster's most typical available image."""
    clusters = int(min(labelled.sum() + n, MAX_CLUSTERS, len(vectors)))
    assignment = _kmeans(vectors, clusters, seed).labels_
    sizes = np.bincount(assignment, minlength=clusters)
    covered = np.bincount(assignment[labelled], minlength=clusters)
    typicality = _typicality(vectors, assignment)
    chosen: list[int] = []
    taken_groups: set[int] = set()
    open_rows = available.copy()
    while len(chosen) < n and open_rows.any():
        # Fewest labelled first, then the largest (the paper's order).
        candidates = np.unique(assignment[open_rows])
        best = candidates[np.lexsort((-sizes[candidates], covered[candidates]))[0]]
        members = np.flatnonzero(open_rows & (assignment == best))
        row = int(members[np.argmax(typicality[members])])
        open_rows[row] = False
        group = int(copies[row]) if copies is not None else -1
        if group >= 0:
            if group in taken_groups:
                continue
            taken_groups.add(group)
        chosen.append(row)
        covered[best] += 1
    return np.array(chosen, np.int64)


def _typicality(vectors: np.ndarray, assignment: np.ndarray) -> np.ndarray:
    """(N,) each row's inverse mean distance to its nearest TYPICAL_NEIGHBOURS of its cluster."""
    typicality = np.zeros(len(vectors), np.float32)
    for cluster in np.unique(assignment):
        members = np.flatnonzero(assignment == cluster)
        if len(members) == 1:
            continue
        points = vectors[members]
        squared = np.clip(2 - 2 * points @ points.T, 0, None)  # unit vectors: |a-b|^2 = 2 - 2 a.b
        nearest = min(TYPICAL_NEIGHBOURS, len(members) - 1)
        distances = np.sqrt(np.partition(squared, nearest, axis=1)[:, 1 : nearest + 1])
        typicality[members] = 1 / (distances.mean(1) + 1e-6)
    return typicality


def margins_of(probabilities: np.ndarray, multi_label: bool) -> np.ndarray:
    """(N,) how certain the model is of each image: the top two probabilities' difference; for multi-label, the
    least certain class's distance from 0.5, doubled (0: a toss-up, 1: sure)."""
    if multi_label:
        result: np.ndarray = (np.abs(probabilities - 0.5) * 2).min(1)
        return result
    top = np.partition(probabilities, -2, axis=1)[:, -2:]
    difference: np.ndarray = top[:, 1] - top[:, 0]
    return difference


def margin_diverse(
    vectors: np.ndarray,
    probabilities: np.ndarray,
    multi_label: bool,
    available: np.ndarray,
    n: int,
    copies: np.ndarray | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Zhdanov's choice of `n` available rows: the BETA x n of smallest margin, clustered into n weighted by their
    uncertainty, the row nearest each centre (then, should two centres share one, the least certain of the rest);
    in order of margin, with the margins."""
    margins = margins_of(probabilities, multi_label)
    rows = np.flatnonzero(available)
    doubtful = rows[np.argsort(margins[rows], kind="stable")[: BETA * n]]
    if len(doubtful) <= n:
        picked = doubtful
    else:
        model = _kmeans(vectors[doubtful], n, seed, weights=1 - margins[doubtful] + 1e-3)
        distances = model.transform(vectors[doubtful])  # (M, n): each row's distance to each centre
        picked = np.unique(doubtful[distances.argmin(0)])
    rest = doubtful[~np.isin(doubtful, picked)]
    ordered = np.concatenate([picked[np.argsort(margins[picked], kind="stable")], rest])
    chosen = _one_per_group(ordered, copies, n)
    return chosen, margins[chosen]
