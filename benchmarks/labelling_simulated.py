"""Simulated labelling: active learning (`cnnlab.labelling.active.suggest`) against random choice.

    PYTHONPATH=src python benchmarks/labelling_simulated.py --data ../shared/data/cifar10-png.tar.gz
    PYTHONPATH=src python benchmarks/labelling_simulated.py --data ../shared/data/flowers128.tar.gz
    PYTHONPATH=src python benchmarks/labelling_simulated.py --data scenes/images --labels scenes/miml_labels_1.csv

The pool is the training split (validation too, where the data has one), the oracle its true labels, the model
the `finetune` recipe's head alone: a linear classifier on the pretrained embeddings (cached), fitted again after
each round. Labels are added in rounds up to each budget; after each, the test split's accuracy (multi-label: mAP)
is measured. Prints per budget the mean and sd over seeds of each policy, and the seconds each round took.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.metrics import average_precision_score

from cnnlab.config import DataConfig
from cnnlab.data import load_dataset
from cnnlab.data.cache import cache_root
from cnnlab.data.dataset import concatenate_images
from cnnlab.doctor.embeddings import embed, pixel_digests
from cnnlab.doctor.labels import fitted_probabilities
from cnnlab.labelling.active import suggest

BUDGETS = (100, 200, 400, 800, 1000, 1600, 3200)


def score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    if labels.ndim == 2:
        present = labels.sum(0) > 0
        return float(average_precision_score(labels[:, present], probabilities[:, present], average="macro"))
    return float((probabilities.argmax(1) == labels).mean())


def simulate(pool, truth, test, test_labels, classes, policy, seed, budgets):
    """Accuracy after each budget, and each round's seconds (choosing and fitting)."""
    rng = np.random.default_rng(seed)
    targets = np.full(truth.shape, -1, truth.dtype if truth.ndim == 1 else np.int64)
    targets = targets.astype(np.int64)
    scores, seconds = [], []
    for budget in budgets:
        started = time.perf_counter()
        labelled = targets.reshape(len(targets), -1).min(1) >= 0
        wanted = min(budget, len(truth)) - int(labelled.sum())
        if policy == "random":
            rows = rng.choice(np.flatnonzero(~labelled), wanted, replace=False)
        else:
            rows = suggest(pool, targets, classes, wanted, seed=seed).rows
        targets[rows] = truth[rows]
        labelled = targets.reshape(len(targets), -1).min(1) >= 0
        probabilities = fitted_probabilities(pool[labelled], truth[labelled], test, classes, seed)
        seconds.append(time.perf_counter() - started)
        scores.append(score(probabilities, test_labels))
    return scores, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--labels")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--policies", default="random,active")
    args = parser.parse_args()
    dataset = load_dataset(DataConfig(data=args.data, labels=args.labels))
    splits = [split for split in (dataset.train, dataset.val) if split is not None]
    pool_images = concatenate_images([split.images for split in splits])
    truth = np.concatenate([split.labels for split in splits])
    root = cache_root(None)
    pool = embed(pool_images, pixel_digests(pool_images), root)
    test = embed(dataset.test.images, pixel_digests(dataset.test.images), root)
    budgets = [int(b) for b in args.budgets.split(",") if int(b) <= len(truth)]
    metric = "mAP" if dataset.multi_label else "accuracy"
    print(f"{dataset.name}: pool {len(truth):,}, test {len(dataset.test):,}, {len(dataset.classes)} classes; {metric}")
    results = {}
    for policy in args.policies.split(","):
        runs = [
            simulate(pool, truth, test, dataset.test.labels, len(dataset.classes), policy, seed, budgets)
            for seed in range(args.seeds)
        ]
        scores = np.array([run[0] for run in runs]) * 100
        seconds = np.array([run[1] for run in runs])
        results[policy] = scores
        for i, budget in enumerate(budgets):
            print(
                f"{policy:>7} {budget:>5} labels: {scores[:, i].mean():5.1f} ± {scores[:, i].std(ddof=1):.1f} "
                f"({' '.join(f'{s:.1f}' for s in scores[:, i])}); round {seconds[:, i].mean():.1f} s",
                flush=True,
            )


if __name__ == "__main__":
    main()
