"""Out-of-sample probabilities from K-fold trainings: each image scored by a net trained on the other folds, with the
strongest recipe whose measured cost fits the time the doctor's budget leaves.

Small images (at most 64 px) climb LADDER, strongest first, each rung with the epochs it trains per fold (None:
its recipe's own), the fewest it may train to fit, and the most folds it trains (None: as many as asked): fast94
(about 94% on CIFAR-10 when it trains on all 50,000 training images) for its 10 epochs or as many down to 5 as
fit, fast94 in at most 2 folds, fast90 (about 90%), fast70 for 1.5 epochs (about 72%). Measured on CIFAR-10's
60,000 images ([A], BENCHMARKS.md), out-of-sample agreement with the given labels: fast94 for 6 epochs in 3 folds
92.5% (pooled with the linear model on embeddings, 93.5%), fast94 in 2 folds 92.1% (pooled, 93.4%), fast90 in 3
folds 91.1%; fast94's own 10 epochs in 3 folds takes about 16 minutes. Photos have one rung, PHOTOS: the finetune
recipe (the pretrained net's head on its features, then 2 epochs of the whole network), at the size the images
are examined. Before a rung is chosen its recipe is timed on PROBE_STEPS of its own training steps; it is chosen
when that rate, over every fold's epochs and the prediction of the held-out folds, times ESTIMATE_MARGIN, fits the
seconds left. When none fits, none trains: the linear model on embeddings, the cheaper model, stands alone, and
the doctor says why.
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


@dataclass(frozen=True)
class Rung:
    recipe: str
    epochs: float | None = None  # per fold; None: the recipe's own
    most_folds: int | None = None  # None: as many as asked
    unfreeze_epochs: float | None = None  # a finetune recipe's epochs of the whole network; None: the recipe's own
    fewest_epochs: float | None = None  # it may train fewer epochs, a whole one less at a time, down to these


LADDER = (
    Rung("fast94", fewest_epochs=5.0),
    Rung("fast94", most_folds=2),
    Rung("fast90"),
    Rung("fast70", epochs=1.5),
)
PHOTOS = (Rung("finetune", unfreeze_epochs=2.0),)
LARGEST = 64  # pixels per side: the fast nets are made for small images; an ImageNet net sees larger ones better
PROBE_STEPS = 3  # training steps timed per recipe before it is chosen
# Predicting a held-out image (with the recipe's test-time views, forward only) costs about this share of a
# training step's image.
PREDICT_SHARE = 0.5
# Estimates are multiplied by this: on CIFAR-10 ([A]) the trainings took 1.02-1.23 times the time their probe
# predicted (a longer run meets a busier host, and more of its memory is cold).
ESTIMATE_MARGIN = 1.25


@dataclass(frozen=True)
class Probe:
    """A recipe's measured cost, on its first steps."""

    per_image: float  # seconds per training image of a step
    # Seconds of a one-epoch run besides its steps (building the model, its initialisation, the epoch's scoring and
    # checkpoint): counted once per epoch, which errs long.
    per_epoch: float


@dataclass(frozen=True)
class TrainedChoice:
    rung: Rung | None  # None: no rung fits the budget
    epochs: float | None  # per fold, when fewer than the rung's; None: the rung's own
    folds: int
    estimate: float  # seconds, every fold
    said: str  # what was measured and chosen, in words


def ladder_for(shape: ImageShape) -> tuple[Rung, ...]:
    """The rungs for images of `shape`: LADDER's fast nets for small images (large enough for the smallest of
    them), PHOTOS for larger ones."""
    if max(shape.size) > LARGEST:
        return PHOTOS
    smallest = min(model_spec(recipe_values(rung.recipe)["model"]).min_input_size for rung in LADDER)
    return LADDER if min(shape.size) >= smallest else ()


def _network_epochs(config: RunConfig) -> float:
    """The epochs a recipe runs the whole network: a head-only recipe's unfreeze epochs, and one for the pass that
    computes the features (a forward pass costs about a third of a training step: this errs long)."""
    finetune = config.train.finetune
    return finetune.unfreeze_epochs + 1 if finetune.head_only else config.train.optim.epochs


def choose_recipe(
    images: Pixels, labels: np.ndarray, dataset: Dataset, folds: int, seed: int, scratch: Path, seconds: float
) -> TrainedChoice:
    """The strongest rung of the images' ladder whose K-fold trainings (at most `folds`) fit in `seconds`, each
    recipe timed on the first fold's images before it is chosen."""
    probes: dict[str, Probe] = {}
    refused: list[str] = []
    for rung in ladder_for(dataset.image_shape):
        count = min(folds, rung.most_folds or folds)
        config = _config(rung, seed, scratch / f"probe-{rung.recipe}")
        fitted = _splits(labels, len(dataset.classes), count, seed)[0][0]
        if rung.recipe not in probes:  # timed once, whatever its folds
            probes[rung.recipe] = _probe(rung, config, images, labels, fitted, dataset)
        probe, each = probes[rung.recipe], _network_epochs(config)
        tried = [each, *np.arange(each - 1, (rung.fewest_epochs or each) - 1e-9, -1.0).tolist()]
        estimates = [_estimate(probe, count, len(fitted), len(labels), epochs) for epochs in tried]
        measured = [
            f"{rung.recipe} {epochs:g} epochs x {count} folds, about {estimate / 60:.1f} min"
            for epochs, estimate in zip(tried, estimates, strict=True)
        ]
        fitting = [at for at, estimate in enumerate(estimates) if estimate <= seconds]
        over = f"more than the {seconds / 60:.1f} the budget leaves"
        if not fitting:
            refused.append(f"{measured[-1]}: {over}")
            continue
        at = fitting[0]
        chosen = f"{measured[at]} of the {seconds / 60:.1f} the budget leaves"
        said = "; ".join([*refused, *([f"{measured[0]}: {over}"] if at else []), chosen])
        return TrainedChoice(rung, tried[at] if at else None, count, estimates[at], said)
    return TrainedChoice(None, None, 0, 0.0, "; ".join([*refused, "no training fits: the linear model alone"]))


def _estimate(probe: Probe, folds: int, fitted: int, images: int, epochs: float) -> float:
    """Seconds of `folds` trainings of `epochs` on `fitted` images each, and the prediction of `images` held out,
    at the `probe`'s rates, times ESTIMATE_MARGIN."""
    per_fold = probe.per_epoch * math.ceil(epochs) + probe.per_image * (
        fitted * epochs + PREDICT_SHARE * images / folds
    )
    return ESTIMATE_MARGIN * folds * per_fold


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
    assert choice.rung is not None, "a rung was chosen"
    probabilities = np.zeros((len(labels), len(dataset.classes)), np.float32)
    for fold, (fitted, held) in enumerate(_splits(labels, len(dataset.classes), choice.folds, seed)):
        config = _config(choice.rung, seed + fold, scratch / f"fold-{fold}", choice.epochs)
        model = _fit(config, images, labels, fitted, held[:: max(1, len(held) // 500)], dataset).model
        probabilities[held] = model.probabilities(np.asarray(images.take(held, axis=0)))
        advance(1)
    return probabilities


def _splits(labels: np.ndarray, classes: int, folds: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    splitter = folds_of(labels, classes, folds, seed)
    return list(splitter.split(np.zeros(len(labels)), labels))


def _config(rung: Rung, seed: int, out: Path, epochs: float | None = None) -> RunConfig:
    chosen = {"epochs": epochs or rung.epochs, "unfreeze_epochs": rung.unfreeze_epochs}
    train = {"recipe": rung.recipe, "seed": seed, **{key: value for key, value in chosen.items() if value is not None}}
    return resolve_run_config({"train": train, "out": str(out)})


def _fit(
    config: RunConfig, images: Pixels, labels: np.ndarray, fitted: np.ndarray, probe: np.ndarray, dataset: Dataset
) -> TrainingResult:
    """`config` trained on the `fitted` images, scored each epoch on the few `probe` images only (the held-out
    fold's probabilities are computed once, after). A recipe that stops early is stopped by every tenth of the
    `fitted` images, held out of its training: never by the fold it will score."""
    if config.train.optim.patience:
        validation, fitted = fitted[::10], np.setdiff1d(fitted, fitted[::10])
    else:
        validation = None
    part = Dataset(
        dataset.name,
        dataset.classes,
        Split(images.take(fitted, axis=0), labels[fitted]),
        Split(images.take(probe, axis=0), labels[probe]),
        Split(images.take(validation, axis=0), labels[validation]) if validation is not None else None,
    )
    return fit(config, part, reporter=LineReporter(Console(file=io.StringIO())))


def _probe(
    rung: Rung, config: RunConfig, images: Pixels, labels: np.ndarray, fitted: np.ndarray, dataset: Dataset
) -> Probe:
    """`rung`'s recipe trained for one epoch of PROBE_STEPS batches of the first fold's images, timed."""
    chosen = fitted[: PROBE_STEPS * config.train.optim.batch_size]
    probe = _config(rung, config.train.system.seed, Path(config.out or ""), epochs=1.0)
    started = time.perf_counter()
    history = _fit(probe, images, labels, chosen, chosen[:1], dataset).history
    training = sum(epoch["seconds"] for epoch in history)
    return Probe(training / (len(chosen) * _network_epochs(probe)), time.perf_counter() - started - training)
