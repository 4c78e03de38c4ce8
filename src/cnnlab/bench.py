"""Time-to-accuracy benchmark: train recipes side by side and report how fast each reaches each mark.

Each run is a separate `cnnlab train` process (`runs.train_in_child`, as `compare` runs models), so that its
peak memory is its own and no run warms the caches of the next; the runs are measured in the same session, one
after the other, so their ratios are comparable. The accuracy is that of the epoch the run kept. Training
seconds exclude the per-epoch evaluations; delivered seconds, which the time-to-accuracy marks count, add what
else it takes to deliver the accuracy: the data-dependent initialisation and one evaluation of the test split
with the recipe's TTA. Dense peaks are measured in a few seconds, only for the precisions that this machine's
recipes run in (never an emulated bf16)."""

from __future__ import annotations

import functools
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from cnnlab.atomic import write_text
from cnnlab.config import AugmentConfig, DataConfig, TrainConfig
from cnnlab.data import load_dataset
from cnnlab.data.augment import resolution_at
from cnnlab.data.dataset import ImageShape
from cnnlab.errors import CnnlabError
from cnnlab.machine import DTYPES, Machine, resolve_device, resolve_precision, synchronize, this_machine
from cnnlab.models import create_model
from cnnlab.recipes import resolve_run_config
from cnnlab.runs import ChildRun, RunOutcome, train_in_child

MARKS = (0.70, 0.80, 0.90, 0.93, 0.94)


def dense_peaks(device: torch.device, machine: Machine | None = None, budget_s: float = 0.4) -> dict[str, float]:
    """The best dense throughput torch reaches on `device`, in GFLOP/s, for fp32 and, where it is native, bf16:
    a 2048x2048 matmul and a 3x3 convolution over 256 channels (channels_last), each timed for about `budget_s`.

    Both, because neither library is fastest everywhere: MKL's sgemm runs AVX2 code on AMD CPUs, half of what
    oneDNN's convolutions reach there. Emulated bf16 is skipped: no recipe runs in it, and it takes minutes."""
    precisions = ["fp32"] + (["bf16"] if resolve_precision("auto", device, machine) == "bf16" else [])
    peaks: dict[str, float] = {}
    for name in precisions:
        dtype = DTYPES[name]
        a, b = (torch.randn(2048, 2048, device=device).to(dtype) for _ in range(2))
        matmul = _gflops(functools.partial(torch.mm, a, b), 2 * 2048**3, device, budget_s)
        images = torch.randn(32, 256, 16, 16, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        filters = torch.randn(256, 256, 3, 3, device=device).to(dtype).contiguous(memory_format=torch.channels_last)
        conv_flops = 2 * 32 * 16 * 16 * 256 * 256 * 9
        conv = _gflops(functools.partial(F.conv2d, images, filters, padding=1), conv_flops, device, budget_s)
        peaks |= {
            f"{name}_matmul_gflops": matmul,
            f"{name}_conv_gflops": conv,
            f"{name}_peak_gflops": max(matmul, conv),
        }
    return peaks


def _gflops(work: Callable[[], object], flops: float, device: torch.device, budget_s: float) -> float:
    """GFLOP/s of the fastest of a few calls of `work`, timed for about `budget_s` after one warm-up call."""
    best, spent = float("inf"), 0.0
    for repeat in range(20):  # the first is a warm-up (thread pool, kernel choice)
        synchronize(device)
        started = time.perf_counter()
        work()
        synchronize(device)
        seconds = time.perf_counter() - started
        best, spent = (min(best, seconds) if repeat else best), spent + seconds
        if spent > budget_s and repeat >= 2:
            break
    return flops / best / 1e9


def training_flops_per_image(train: TrainConfig, input_shape: ImageShape, classes: int) -> float:
    """Forward FLOPs of one image times 3 (the backward pass costs about twice the forward), scaled by the mean
    share of the full size's pixels that the run's steps see: a convolution's FLOPs follow its pixels, and
    progressive resizing shrinks the early steps."""
    model = create_model(train.model, input_shape, classes)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape))
    return 3.0 * float(counter.get_total_flops()) * mean_pixel_share(train.augment, input_shape.size)


def mean_pixel_share(augment: AugmentConfig, full: tuple[int, int], samples: int = 1000) -> float:
    """The pixels a training step sees, as a share of the full size's, averaged over a run (1.0 without
    low_res). A step's size is a function of the share of the run's steps done, here sampled `samples` times."""
    pixels = sum(math.prod(resolution_at(step, samples, augment, full)) for step in range(samples))
    return pixels / (samples * math.prod(full))


@dataclass
class EpochMark:
    """One trained epoch on the clock: when its accuracy was there to deliver."""

    epoch: int
    seconds_cum: float  # training so far
    # The initialisation, the training so far and one evaluation of the test split with the recipe's TTA (the
    # other epochs' evaluations only monitor).
    delivered_seconds: float
    delivered_score: float  # the test accuracy with the recipe's TTA; a multi-label model's mAP (`Scores.headline`)


@dataclass
class BenchRow(RunOutcome):
    """A run's outcome with its timings."""

    seed: int
    timeline: list[EpochMark]
    time_to: dict[str, float | None]  # delivered seconds to each accuracy mark ("0.90"); None: not reached
    train_time_to: dict[str, float | None]  # training seconds to each mark
    delivered_seconds: float  # every epoch trained, and the kept epoch's evaluation
    images_per_s: float
    gflops: float | None  # None: no epoch trained on images (the head on cached features alone)
    precision: str
    fraction_of_peak: float | None  # of the dense peak of the precision it ran in
    peak_rss_mb: float


def summarise(run: ChildRun, seed: int, flops_per_image: float, peaks: dict[str, float]) -> BenchRow:
    """A run's timings and time-to-accuracy marks, and the accuracy of the epoch it kept."""
    history = run.history
    initialisation = history[0].get("init_seconds", 0.0)
    timeline, seconds = [], 0.0
    for metrics in history:
        seconds += metrics["seconds"]
        delivered = initialisation + seconds + metrics.get("test_seconds", 0.0)
        timeline.append(EpochMark(metrics["epoch"], seconds, delivered, run.scores_of(metrics).headline[1]))

    def first(clock: str, mark: float) -> float | None:
        return next((getattr(e, clock) for e in timeline if e.delivered_score >= mark), None)

    images = sum(m["images_per_s"] * m["seconds"] for m in history)
    # The FLOPs per image are the whole network's: a head phase's epochs, on cached features, are left out.
    on_images = [m for m in history if m.get("phase") != "head"]
    image_seconds = sum(m["seconds"] for m in on_images)
    image_flops = flops_per_image * sum(m["images_per_s"] * m["seconds"] for m in on_images)
    gflops = image_flops / image_seconds / 1e9 if image_seconds else None
    precision = history[-1].get("precision", "fp32")
    outcome = run.outcome()
    return BenchRow(
        **outcome.fields(),
        seed=seed,
        timeline=timeline,
        time_to={f"{mark:.2f}": first("delivered_seconds", mark) for mark in MARKS},
        train_time_to={f"{mark:.2f}": first("seconds_cum", mark) for mark in MARKS},
        delivered_seconds=initialisation + seconds + history[outcome.kept_epoch - 1].get("test_seconds", 0.0),
        images_per_s=images / seconds,
        gflops=gflops,
        precision=precision,
        fraction_of_peak=None if gflops is None else gflops / peaks[f"{precision}_peak_gflops"],
        peak_rss_mb=run.peak_rss_mb,
    )


@dataclass
class BenchResult:
    """What `cnnlab bench --json` prints: the machine, each run, and each recipe over its seeds and against each
    baseline."""

    machine: dict[str, Any]
    train_flags: list[str]
    data: dict[str, Any]
    rows: list[BenchRow]
    recipes: list[str]
    baselines: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {
            "machine": self.machine,
            "train_flags": self.train_flags,
            "data": self.data,
            "results": [row.to_dict() for row in self.rows],
            "across_seeds": across_seeds(self.rows),
            "ratios": ratios(self.rows, self.recipes, self.baselines),
        }


def with_seeds(entry: str, seeds: int) -> tuple[str, int]:
    """A recipe entry and its number of runs: "fast94:3" -> ("fast94", 3); "fast70" -> ("fast70", `seeds`)."""
    name, _, count = entry.partition(":")
    if not count:
        return name, seeds
    if not count.isdigit() or int(count) < 1:
        raise CnnlabError(f"{entry!r}: the runs after ':' must be a whole number of at least 1, e.g. fast94:3")
    return name, int(count)


def bench(
    recipes: Sequence[str],
    data: DataConfig,
    out: Path,
    compare: Sequence[str] = (),
    seeds: int = 1,
    epochs: float | None = None,
    device: str = "auto",
    train_flags: Sequence[str] = (),
    progress: Callable[[str], object] = print,
) -> BenchResult:
    """Run every recipe (and each `compare` recipe) `seeds` times on `device` (seeded 0..N-1; an entry
    "name:N" runs N times), each with `train_flags` added to its `cnnlab train` command; the result is what
    `--json` prints, with each recipe's times as ratios to each baseline's."""
    if not recipes:
        raise CnnlabError("no recipe to time: name one or more with --recipe")
    machine = this_machine()
    progress(f"machine: {machine.describe()}")
    torch_device = resolve_device(device)
    peaks = dense_peaks(torch_device, machine)
    progress(format_peaks(peaks))
    dataset = load_dataset(data)  # also fills the cache, so that no timed run pays for decoding
    shape = dataset.image_shape
    train_flags = ["--device", device, *train_flags]
    timed, baselines = ([with_seeds(entry, seeds) for entry in entries] for entries in (recipes, compare))
    machine_facts = {**machine.to_dict(), "cpu_count": os.cpu_count(), "device": str(torch_device), **peaks}
    result = BenchResult(
        machine_facts, train_flags, asdict(data), [], [name for name, _ in timed], [name for name, _ in baselines]
    )
    for recipe, runs in [*baselines, *timed]:
        flops = training_flops_per_image(
            resolve_run_config({"train": {"recipe": recipe}}).train, shape, len(dataset.classes)
        )
        for seed in range(runs):
            progress(f"training {recipe} (seed {seed})")
            train = {"recipe": recipe, "seed": seed, **({"epochs": epochs} if epochs is not None else {})}
            config = resolve_run_config(
                {"data": asdict(data), "train": train, "out": str(out / f"{recipe}-seed{seed}")}
            )
            result.rows.append(summarise(train_in_child(config, train_flags), seed, flops, peaks))
            progress(format_result(result.rows[-1]))
            # After every run, so that a long benchmark cut short keeps what it measured.
            write_text(out / "bench.json", json.dumps(result.to_dict(), indent=2))
    return result


def across_seeds(rows: list[BenchRow]) -> list[dict[str, Any]]:
    """Mean and standard deviation of each recipe's delivered accuracy (a multi-label model's mAP: "metric" says
    which) and training time over its seeds."""
    summaries = []
    for recipe in dict.fromkeys(row.recipe for row in rows):
        runs = [row for row in rows if row.recipe == recipe]
        metric = runs[0].scores.headline[0]
        columns = {
            "delivered_map" if metric == "mAP" else "delivered_accuracy": [row.scores.headline[1] for row in runs],
            "seconds": [row.train_seconds for row in runs],
            "delivered_seconds": [row.delivered_seconds for row in runs],
        }
        figures = {name: torch.tensor(values, dtype=torch.float64) for name, values in columns.items()}
        summaries.append(
            {"recipe": recipe, "seeds": len(runs), "metric": metric}
            | {f"{name}_mean": values.mean().item() for name, values in figures.items()}
            # The sample standard deviation; 0.0 for a single run, which has no spread to measure.
            | {f"{name}_std": values.std().item() if len(runs) > 1 else 0.0 for name, values in figures.items()}
            | {"peak_rss_mb_max": max(row.peak_rss_mb for row in runs)}
        )
    return summaries


def ratios(rows: list[BenchRow], recipes: Sequence[str], baselines: Sequence[str]) -> list[dict[str, Any]]:
    """Each recipe's mean delivered seconds over a baseline's, and its mean delivered seconds to each accuracy
    mark over the baseline's to the same mark, where every run of both reached it (None where one did not)."""

    def mean(values: list[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return sum(known) / len(known) if known and len(known) == len(values) else None

    def ratio(ours: float | None, theirs: float | None) -> float | None:
        return ours / theirs if ours is not None and theirs else None

    runs = {name: [row for row in rows if row.recipe == name] for name in (*recipes, *baselines)}
    table = []
    for recipe in recipes:
        for baseline in baselines:
            delivered = [mean([row.delivered_seconds for row in runs[name]]) for name in (recipe, baseline)]
            marks = {}
            for key in (f"{mark:.2f}" for mark in MARKS):
                ours, theirs = (mean([row.time_to[key] for row in runs[name]]) for name in (recipe, baseline))
                marks[key] = ratio(ours, theirs)
            table.append({"recipe": recipe, "baseline": baseline, "delivered": ratio(*delivered), "time_to": marks})
    return table


def format_ratio(row: dict[str, Any]) -> str:
    marks = ", ".join(f"to {float(mark):.0%} {ratio:.3f}x" for mark, ratio in row["time_to"].items() if ratio)
    delivered = "-" if row["delivered"] is None else f"{row['delivered']:.3f}x"
    return f"{row['recipe']} / {row['baseline']}: delivered {delivered}" + (f"; {marks}" if marks else "")


def format_peaks(peaks: dict[str, float]) -> str:
    measured = [name for name in DTYPES if f"{name}_peak_gflops" in peaks]
    return "peaks: " + ", ".join(
        f"{name} {peaks[f'{name}_peak_gflops']:,.0f} GFLOP/s (matmul {peaks[f'{name}_matmul_gflops']:,.0f}, "
        f"3x3 conv {peaks[f'{name}_conv_gflops']:,.0f})"
        for name in measured
    )


def format_result(row: BenchRow) -> str:
    marks = "  ".join(
        f"{float(mark):.0%}@{'-' if seconds is None else f'{seconds:.0f}s'}" for mark, seconds in row.time_to.items()
    )
    return (
        f"{row.recipe:>14} seed {row.seed}: {row.scores.describe()} (epoch {row.kept_epoch}) "
        f"in {row.train_seconds:.1f}s of training ({row.delivered_seconds:.1f}s delivered), "
        f"{row.images_per_s:,.0f} img/s, {_compute(row)}, peak RSS {row.peak_rss_mb:,.0f} MB  {marks}"
    )


def _compute(row: BenchRow) -> str:
    if row.gflops is None or row.fraction_of_peak is None:
        return "GFLOP/s not counted (the head trained on cached features)"
    return f"{row.gflops:.0f} GFLOP/s ({row.fraction_of_peak:.0%} of the {row.precision} peak)"
