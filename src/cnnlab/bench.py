"""Time-to-accuracy benchmark: train recipes side by side and report how fast each reaches each mark.

Each run is a separate `cnnlab train` process, so that its peak memory is its own and no run warms
the caches of the next; the runs are measured in the same session, one after the other, so their
ratios are comparable. Training seconds exclude the per-epoch evaluations.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from cnnlab.config import DataConfig
from cnnlab.data import load_dataset
from cnnlab.errors import CnnlabError
from cnnlab.models import create_model
from cnnlab.recipes import resolve_run_config

MARKS = (0.70, 0.80, 0.90, 0.93, 0.94)


def matmul_peaks(size: int = 4096, repeats: int = 3) -> dict[str, float]:
    """This machine's fp32 and bf16 matmul throughput in GFLOP/s (best of `repeats`)."""
    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        torch.mm(a, b)
        best = min(_timed(lambda a=a, b=b: torch.mm(a, b)) for _ in range(repeats))
        peaks[f"{name}_matmul_gflops"] = 2 * size**3 / best / 1e9
    return peaks


def _timed(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def training_flops_per_image(model_name: str, input_shape: tuple[int, int, int], classes: int) -> float:
    """Forward FLOPs of one image times 3: the backward pass costs about twice the forward."""
    model = create_model(model_name, input_shape, classes)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape))
    return 3.0 * counter.get_total_flops()


def run_recipe(recipe: str, data: DataConfig, out: Path, seed: int, epochs: float | None) -> dict[str, Any]:
    """Train one recipe in a child process; return its per-epoch history and peak RSS."""
    command = [sys.executable, "-m", "cnnlab", "train", "--recipe", recipe, "--out", str(out), "--seed", str(seed)]
    command += ["--no-report", "-q"]
    command += ["--dataset", data.dataset] if data.dataset else ["--data", str(data.data)]
    if data.cache_dir:
        command += ["--cache-dir", data.cache_dir]
    if epochs is not None:
        command += ["--epochs", str(epochs)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise CnnlabError(f"benchmark run of {recipe} failed: {output.strip().splitlines()[-1] if output else status}")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"history": history, "peak_rss_mb": usage.ru_maxrss / 1024}  # Linux reports KiB


def summarise(recipe: str, seed: int, run: dict[str, Any], flops_per_image: float, peaks: dict[str, float]) -> dict:
    history = run["history"]
    uses_tta = "test_acc_tta" in history[0]
    epochs, seconds = [], 0.0
    for metrics in history:
        seconds += metrics["seconds"]
        epochs.append(
            {
                "epoch": metrics["epoch"],
                "seconds_cum": seconds,
                "test_acc": metrics["test_acc"],
                "test_acc_tta": metrics.get("test_acc_tta"),
            }
        )
    delivered = "test_acc_tta" if uses_tta else "test_acc"
    time_to = {f"{mark:.2f}": next((e["seconds_cum"] for e in epochs if e[delivered] >= mark), None) for mark in MARKS}
    images = sum(m["images_per_s"] * m["seconds"] for m in history)
    gflops = flops_per_image * images / seconds / 1e9
    return {
        "recipe": recipe,
        "seed": seed,
        "epochs": epochs,
        "time_to": time_to,
        "final_accuracy": history[-1]["test_acc"],
        "final_accuracy_tta": history[-1].get("test_acc_tta"),
        "train_seconds": seconds,
        "images_per_s": images / seconds,
        "gflops": gflops,
        "fraction_of_bf16_peak": gflops / peaks["bf16_matmul_gflops"],
        "fraction_of_fp32_peak": gflops / peaks["fp32_matmul_gflops"],
        "peak_rss_mb": run["peak_rss_mb"],
    }


def bench(
    recipes: list[str],
    data: DataConfig,
    out: Path,
    compare: list[str] = (),
    seeds: int = 1,
    epochs: float | None = None,
    progress=print,
) -> dict[str, Any]:
    """Run every recipe (and each `compare` recipe) `seeds` times; the result is what `--json` prints."""
    dataset = load_dataset(data)  # also fills the cache, so that no timed run pays for decoding
    height, width, channels = dataset.image_shape
    peaks = matmul_peaks()
    progress(f"matmul peaks: {peaks['fp32_matmul_gflops']:.0f} GFLOP/s fp32, {peaks['bf16_matmul_gflops']:.0f} bf16")
    results = []
    for recipe in [*compare, *recipes]:
        model = resolve_run_config({"train": {"recipe": recipe}}).train.model
        flops = training_flops_per_image(model, (channels, height, width), len(dataset.classes))
        for seed in range(seeds):
            progress(f"training {recipe} (seed {seed})")
            run = run_recipe(recipe, data, out / f"{recipe}-seed{seed}", seed, epochs)
            results.append(summarise(recipe, seed, run, flops, peaks))
            progress(format_result(results[-1]))
    machine = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform()}
    summary = {
        "machine": {**machine, **peaks},
        "data": asdict(data),
        "results": results,
        "across_seeds": across_seeds(results) if seeds > 1 else [],
    }
    (out / "bench.json").write_text(json.dumps(summary, indent=2))
    return summary


def across_seeds(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation of each recipe's delivered accuracy and training time over its seeds."""
    summaries = []
    for recipe in dict.fromkeys(r["recipe"] for r in results):
        runs = [r for r in results if r["recipe"] == recipe]
        accuracy = torch.tensor([r["final_accuracy_tta"] or r["final_accuracy"] for r in runs], dtype=torch.float64)
        seconds = torch.tensor([r["train_seconds"] for r in runs], dtype=torch.float64)
        summaries.append(
            {
                "recipe": recipe,
                "seeds": len(runs),
                "accuracy_mean": accuracy.mean().item(),
                "accuracy_std": accuracy.std().item(),
                "seconds_mean": seconds.mean().item(),
                "seconds_std": seconds.std().item(),
                "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs),
            }
        )
    return summaries


def format_result(result: dict[str, Any]) -> str:
    marks = "  ".join(
        f"{float(mark):.0%}@{'-' if seconds is None else f'{seconds:.0f}s'}"
        for mark, seconds in result["time_to"].items()
    )
    tta = result["final_accuracy_tta"]
    return (
        f"{result['recipe']:>14} seed {result['seed']}: {result['final_accuracy']:.2%}"
        f"{'' if tta is None else f' ({tta:.2%} TTA)'} in {result['train_seconds']:.1f}s, "
        f"{result['images_per_s']:,.0f} img/s, {result['gflops']:.0f} GFLOP/s "
        f"({result['fraction_of_bf16_peak']:.0%} of bf16 peak), peak RSS {result['peak_rss_mb']:,.0f} MB  {marks}"
    )
