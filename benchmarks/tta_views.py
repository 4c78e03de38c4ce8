"""Other test-time views, scored on trained models: is there a better set than fast90's and fast94's?

Each run folder's model sees its test split once per view (the image and its mirror, shifted by up to one
pixel in each direction with the border reflected, as `flip-translate` shifts it); the views' logits are
then combined by each rule below, with and without selective TTA. Only the test-time combination changes,
so every model pairs with itself: the table gives each rule's mean accuracy over the models and its mean
difference from those recipes' rule (flip-translate below 70% sure), with its standard error.

    .venv/bin/python benchmarks/tta_views.py runs/fast94-seed0 runs/fast94-seed1 runs/fast94-seed2 ...
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from cnnlab.data.loader import in_order
from cnnlab.data.transforms import to_input
from cnnlab.evaluate import test_split_for
from cnnlab.models.files import load_model
from cnnlab.models.inference import unsure

Shift = tuple[int, int]  # (down, right) in pixels
Views = dict[Shift, torch.Tensor]  # shift -> (N, classes) logits of the flip pair, averaged
DIAGONAL: list[Shift] = [(-1, -1), (1, 1)]  # flip-translate's two shifts
ANTI_DIAGONAL: list[Shift] = [(-1, 1), (1, -1)]
AXIAL: list[Shift] = [(-1, 0), (1, 0), (0, -1), (0, 1)]
SHIFTS: list[Shift] = [(0, 0), *DIAGONAL, *ANTI_DIAGONAL, *AXIAL]

RULES: dict[str, Callable[[Views], torch.Tensor]] = {
    "flip pair only": lambda views: views[(0, 0)],
    "flip-translate (half on the pair, a quarter on each diagonal shift)": lambda views: (
        0.5 * views[(0, 0)] + 0.25 * sum(views[s] for s in DIAGONAL)
    ),
    "both diagonals (half on the pair, an eighth on each of 4 shifts)": lambda views: (
        0.5 * views[(0, 0)] + 0.125 * sum(views[s] for s in DIAGONAL + ANTI_DIAGONAL)
    ),
    "the 3x3 grid, equally weighted (9 pairs)": lambda views: sum(views[s] for s in SHIFTS) / len(SHIFTS),
}
REFERENCE = "flip-translate (half on the pair, a quarter on each diagonal shift)"
THRESHOLDS = (0.6, 0.7, 1.0)  # selective TTA: the views only for images whose plain top probability is below
REFERENCE_BELOW = 0.7  # fast90's and fast94's tta_below


@torch.no_grad()
def flip_pair_logits(run: Path) -> tuple[torch.Tensor, Views, torch.Tensor]:
    """The plain logits of a run's test split, the flip pair's averaged logits at every shift, and the labels."""
    model = load_model(run)
    split = test_split_for(model, None)
    network = model.module.eval()
    bf16 = model.info.bf16_on(torch.device("cpu"))
    plain: list[torch.Tensor] = []
    views: dict[Shift, list[torch.Tensor]] = {shift: [] for shift in SHIFTS}
    for batch in in_order(split.images):
        x = to_input(batch, model.info.normalization)
        height, width = x.shape[-2:]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        for down, right in SHIFTS:
            shifted = padded[..., 1 + down : 1 + down + height, 1 + right : 1 + right + width]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                seen, mirror = network(shifted).float(), network(shifted.flip(-1)).float()
            views[(down, right)].append(0.5 * (seen + mirror))
            if (down, right) == (0, 0):
                plain.append(seen)
    return torch.cat(plain), {shift: torch.cat(parts) for shift, parts in views.items()}, torch.as_tensor(split.labels)


def accuracy(plain: torch.Tensor, combined: torch.Tensor, labels: torch.Tensor, below: float) -> float:
    """Percent correct when the images under `below` sure answer with `combined`, the rest with `plain`."""
    delivered = torch.where(unsure(plain, below)[:, None], combined, plain)
    return 100 * (delivered.argmax(1) == labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders of models trained with TTA")
    runs = parser.parse_args().runs
    scores: dict[tuple[str, float], list[float]] = {}
    for run in runs:
        plain, views, labels = flip_pair_logits(run)
        for name, rule in RULES.items():
            combined = rule(views)
            for below in THRESHOLDS:
                scores.setdefault((name, below), []).append(accuracy(plain, combined, labels, below))
        print(f"{run}: {scores[(REFERENCE, REFERENCE_BELOW)][-1]:.2f}% with flip-translate below 70% sure", flush=True)
    reference = scores[(REFERENCE, REFERENCE_BELOW)]
    print(f"\n| rule | below | mean accuracy | vs the reference (mean ± se, {len(runs)} models) | better / worse |")
    print("|---|---|---|---|---|")
    for (name, below), values in scores.items():
        differences = [value - base for value, base in zip(values, reference, strict=True)]
        error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else 0.0
        better, worse = sum(d > 0 for d in differences), sum(d < 0 for d in differences)
        difference = f"{statistics.mean(differences):+.3f} ± {error:.3f}"
        print(f"| {name} | {below:.1f} | {statistics.mean(values):.3f}% | {difference} | {better} / {worse} |")


if __name__ == "__main__":
    main()
