"""Out-of-sample probabilities from K-fold trainings: each image scored by a net trained on the other folds, with the
strongest recipe whose measured cost fits the time the doctor's budget leaves.

The recipes, strongest first, each with the epochs it trains per fold (None: its recipe's own) and the most folds
it trains (None: as many as asked): fast94 (about 94% on CIFAR-10 when it trains on all 50,000 training images),
fast94 in at most 2 folds, fast90 (about 90%), fast70 for 1.5 epochs (about 72%). Measured on CIFAR-10's 60,000
images ([A], BENCHMARKS.md): fast94 in 2 folds agrees with the given labels out of sample on 92.1% in 8.6 minutes,
fast90 in 3 folds on 91.1% in 6.9; fast94 in 3 folds is estimated at 19 minutes. Before one is chosen it is timed
on PROBE_STEPS of its own training steps; it is chosen when that rate, over every fold's epochs and the prediction
of the held-out folds, fits the seconds left. When none fits, none trains: the
linear model on embeddings, the cheaper model, stands alone, and the doctor says why.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from cnnlab.config import RunConfig
from cnnlab.data.dataset import Dataset, ImageShape, Pixels, Split
from cnnlab.doctor.labels import folds_of
from cnnlab.models import model_spec
from cnnlab.progress import Advance
from cnnlab.recipes import recipe_values, resolve_run_config
from cnnlab.train import fit
from cnnlab.train.fit import TrainingResult
from cnnlab.train.reporter import LineReporter

LADDER: tuple[tuple[str, float | None, int | None], ...] = (
    ("fast94", None, None),
    ("fast94", None, 2),
    ("fast90", None, None),
    ("fast70", 1.5, None),
)
LARGEST = 64  # pixels per side: the fast nets are made for small images; an ImageNet net sees larger ones better
PROBE_STEPS = 3  # training steps timed per recipe before it is chosen
# Predicting a held-out image (with the recipe's test-time views, forward only) costs about this share of a
# training step's image.
PREDICT_SHARE = 0.5


@dataclass(frozen=True)
class Probe:
    """A recipe's measured cost: the first steps are the slowest, so an estimate from them errs long."""

    per_image: float  # seconds per training image of a step
    # Seconds of a one-epoch run besides its steps (building the model, its initialisation, the epoch's scoring and
    # checkpoint): counted once per epoch, which errs long.
    per_epoch: float


@dataclass(frozen=True)
class TrainedChoice:
    recipe: str | None  # None: no recipe fits the budget
    epochs: float
    folds: int
    estimate: float  # seconds, every fold
    said: str  # what was measured and chosen, in words


def trains_on(shape: ImageShape) -> bool:
    """Whether the images are small enough for the fast nets (and large enough for the smallest of them)."""
    smallest = min(model_spec(recipe_values(name)["model"]).min_input_size for name, _, _ in LADDER)
    return max(shape.size) <= LARGEST and min(shape.size) >= smallest


def choose_recipe(
    images: Pixels, labels: np.ndarray, dataset: Dataset, folds: int, seed: int, scratch: Path, seconds: float
) -> TrainedChoice:
    """The strongest entry of LADDER whose K-fold trainings (at most `folds`) fit in `seconds`, each recipe timed
    on the first fold's images before it is chosen."""
    probes: dict[str, Probe] = {}
    refused: list[str] = []
    for recipe, epochs, most in LADDER:
        count = min(folds, most or folds)
        config = _config(recipe, epochs, seed, scratch / f"probe-{recipe}")
        fitted = _splits(labels, len(dataset.classes), count, seed)[0][0]
        if recipe not in probes:  # timed once, whatever its folds
            probes[recipe] = _probe(config, images, labels, fitted, dataset)
        probe = probes[recipe]
        each = config.train.optim.epochs
        steps = probe.per_image * (len(fitted) * each + PREDICT_SHARE * len(labels) / count)
        estimate = count * (probe.per_epoch * math.ceil(each) + steps)
        measured = f"{recipe} {each:g} epochs x {count} folds, about {estimate / 60:.1f} min"
        if estimate <= seconds:
            said = "; ".join([*refused, f"{measured} of the {seconds / 60:.1f} the budget leaves"])
            return TrainedChoice(recipe, each, count, estimate, said)
        refused.append(f"{measured}: more than the {seconds / 60:.1f} the budget leaves")
    return TrainedChoice(None, 0.0, 0, 0.0, "; ".join([*refused, "no training fits: the linear model alone"]))


def trained_probabilities(
    images: Pixels,
    labels: np.ndarray,
    dataset: Dataset,
    choice: TrainedChoice,
    seed: int,
    scratch: Path,
    advance: Advance,
) -> np.ndarray:
    """(N, K) probabilities of each image from a `choice.recipe` net trained on the other `choice.folds` folds'
    images."""
    assert choice.recipe is not None, "a recipe was chosen"
    probabilities = np.zeros((len(labels), len(dataset.classes)), np.float32)
    for fold, (fitted, held) in enumerate(_splits(labels, len(dataset.classes), choice.folds, seed)):
        config = _config(choice.recipe, choice.epochs, seed + fold, scratch / f"fold-{fold}")
        model = _fit(config, images, labels, fitted, held[:: max(1, len(held) // 500)], dataset).model
        probabilities[held] = model.probabilities(np.asarray(images.take(held, axis=0)))
        advance(1)
    return probabilities


def _splits(labels: np.ndarray, classes: int, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    splitter = folds_of(labels, classes, folds, seed)
    return list(splitter.split(np.zeros(len(labels)), labels))


def _config(recipe: str, epochs: float | None, seed: int, out: Path) -> RunConfig:
    train = {"recipe": recipe, "seed": seed, **({"epochs": epochs} if epochs is not None else {})}
    return resolve_run_config({"train": train, "out": str(out)})


def _fit(
    config: RunConfig, images: Pixels, labels: np.ndarray, fitted: np.ndarray, probe: np.ndarray, dataset: Dataset
) -> TrainingResult:
    """`config` trained on the `fitted` images, scored each epoch on the few `probe` images only (the held-out
    fold's probabilities are computed once, after)."""
    part = Dataset(
        dataset.name,
        dataset.classes,
        Split(images.take(fitted, axis=0), labels[fitted]),
        Split(images.take(probe, axis=0), labels[probe]),
    )
    return fit(config, part, reporter=LineReporter(Console(file=io.StringIO())))


def _probe(config: RunConfig, images: Pixels, labels: np.ndarray, fitted: np.ndarray, dataset: Dataset) -> Probe:
    """`config`'s recipe trained for one epoch of PROBE_STEPS batches of the first fold's images, timed."""
    chosen = fitted[: PROBE_STEPS * config.train.optim.batch_size]
    probe = _config(config.train.recipe or "", 1.0, config.train.system.seed, Path(config.out or ""))
    started = time.perf_counter()
    history = _fit(probe, images, labels, chosen, chosen[:1], dataset).history
    training = sum(epoch["seconds"] for epoch in history)
    return Probe(training / len(chosen), time.perf_counter() - started - training)
