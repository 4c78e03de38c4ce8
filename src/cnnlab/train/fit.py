"""Training: `fit(RunConfig)` trains a registered model and writes a run folder; `resume` continues one.

A run folder holds config.toml, metrics.jsonl (a JSON line per epoch), checkpoint.pt (rewritten
atomically at each epoch end) and, once finished, model.safetensors with model.json.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnlab.config import RunConfig, TrainConfig, build, load_toml, to_toml
from cnnlab.data import Dataset, load_dataset
from cnnlab.data.transforms import Normalization, to_input
from cnnlab.errors import CnnlabError
from cnnlab.models import ModelInfo, TrainedModel, create_model, save_model
from cnnlab.models.files import package_version
from cnnlab.models.inference import loss_and_accuracy, predict_logits
from cnnlab.train.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from cnnlab.train.progress import Reporter, default_reporter
from cnnlab.train.runtime import keep_freed_memory

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
_REPORT_EVERY = 25  # steps between progress-bar updates; each update reads the loss back from the device


@dataclass
class TrainingResult:
    model: TrainedModel
    history: list[dict[str, Any]]
    run_dir: Path


def fit(config: RunConfig, dataset: Dataset | None = None, reporter: Reporter | None = None) -> TrainingResult:
    """Train `config.train.model` on `dataset` (loaded from `config.data` when not given)."""
    run_dir = _new_run_dir(config)
    dataset = dataset if dataset is not None else load_dataset(config.data)
    (run_dir / CONFIG_FILE).write_text(to_toml(config))
    return _train(config, dataset, run_dir, reporter or default_reporter(), checkpoint=None)


def resume(
    run_dir: Path, epochs: int | None = None, dataset: Dataset | None = None, reporter: Reporter | None = None
) -> TrainingResult:
    """Continue an interrupted run from its last checkpoint; only the number of epochs may change."""
    if not run_dir.is_dir():
        raise CnnlabError(f"{run_dir}: no such run folder to resume")
    config = read_run_config(run_dir)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE)
    if epochs is not None:
        config.train.epochs = epochs
        (run_dir / CONFIG_FILE).write_text(to_toml(config))
    dataset = dataset if dataset is not None else load_dataset(config.data)
    return _train(config, dataset, run_dir, reporter or default_reporter(), checkpoint)


def read_run_config(run_dir: Path) -> RunConfig:
    return build(RunConfig, load_toml(run_dir / CONFIG_FILE), str(run_dir / CONFIG_FILE))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CnnlabError(f"unknown device {name!r}; use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CnnlabError("--device cuda asked for, but this torch sees no CUDA GPU")
    return device


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    # fused kernels update every parameter in one call: fewer passes over memory than the default loop.
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
            fused=True,
        )
    return torch.optim.Adam(
        model.parameters(), lr=config.lr, eps=config.adam_eps, weight_decay=config.weight_decay, fused=True
    )


def _new_run_dir(config: RunConfig) -> Path:
    if config.out:
        run_dir = Path(config.out).expanduser()
        if not run_dir.parent.is_dir():
            raise CnnlabError(f"{run_dir.parent}: the output folder's parent does not exist")
        if (run_dir / CHECKPOINT_FILE).exists():
            raise CnnlabError(f"{run_dir}: already holds a run; use --resume {run_dir} or another --out")
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path("runs") / f"{config.train.model}-{config.data.label}-{stamp}"
        suffix = 1
        while run_dir.exists():
            suffix += 1
            run_dir = run_dir.with_name(f"{config.train.model}-{config.data.label}-{stamp}-{suffix}")
    try:
        run_dir.mkdir(parents=not config.out, exist_ok=True)
        (run_dir / ".write-test").touch()
        (run_dir / ".write-test").unlink()
    except OSError as error:
        raise CnnlabError(f"{run_dir}: cannot write the run folder ({error.strerror})") from None
    return run_dir


def _train(
    config: RunConfig, dataset: Dataset, run_dir: Path, reporter: Reporter, checkpoint: dict[str, Any] | None
) -> TrainingResult:
    settings = config.train
    if settings.batch_size < 1 or settings.epochs < 0:
        raise CnnlabError("--batch-size must be at least 1 and --epochs at least 0")
    device = resolve_device(settings.device)
    keep_freed_memory()
    height, width, channels = dataset.image_shape
    input_shape = (channels, height, width)
    model = create_model(settings.model, input_shape, len(dataset.classes), seed=settings.seed).to(device)
    optimizer = make_optimizer(model, settings)
    normalization = Normalization.unit(channels)
    data_order = torch.Generator().manual_seed(settings.seed + 1)  # independent of the weight-init stream
    history: list[dict[str, Any]] = []
    if checkpoint is not None:
        _check_compatible(checkpoint, dataset, input_shape, run_dir)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        data_order.set_state(checkpoint["data_order"])
        history = checkpoint["history"]
    # The metrics log is rebuilt from the checkpoint, dropping any epoch logged after it was written.
    with open(run_dir / METRICS_FILE, "w") as log:
        log.writelines(json.dumps(metrics) + "\n" for metrics in history)

    images = torch.from_numpy(dataset.train.images).to(device)  # (N, H, W, C) uint8, whole split in memory
    labels = torch.from_numpy(dataset.train.labels).to(device)
    try:
        for epoch in range(len(history) + 1, settings.epochs + 1):
            steps = -(-len(labels) // settings.batch_size)
            reporter.epoch_started(epoch, settings.epochs, steps)
            order = torch.randperm(len(labels), generator=data_order).to(device)
            seconds, train_loss, train_acc = _train_epoch(
                model, optimizer, images, labels, order, settings.batch_size, normalization, reporter
            )
            metrics: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc}
            for split_name, split in (("val", dataset.val), ("test", dataset.test)):
                if split is not None:
                    logits = predict_logits(model, split.images, normalization, device)
                    metrics[f"{split_name}_loss"], metrics[f"{split_name}_acc"] = loss_and_accuracy(
                        logits, split.labels
                    )
            metrics |= {
                "lr": optimizer.param_groups[0]["lr"],
                "seconds": seconds,
                "images_per_s": len(labels) / seconds,
            }
            history.append(metrics)
            save_checkpoint(
                run_dir / CHECKPOINT_FILE,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch,
                    "history": history,
                    "data_order": data_order.get_state(),
                    "classes": list(dataset.classes),
                    "input_shape": list(input_shape),
                    "config": dataclasses.asdict(config),
                },
            )
            with open(run_dir / METRICS_FILE, "a") as log:
                log.write(json.dumps(metrics) + "\n")
            reporter.epoch_done(metrics)
    finally:
        reporter.stop()

    info = ModelInfo(
        architecture=settings.model,
        classes=list(dataset.classes),
        input_shape=list(input_shape),
        normalization={"mean": list(normalization.mean), "std": list(normalization.std)},
        metrics=history[-1] if history else {},
        config=dataclasses.asdict(config),
        cnnlab_version=package_version(),
    )
    save_model(model, info, run_dir)
    return TrainingResult(TrainedModel(model.eval(), info), history, run_dir)


def _train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    order: torch.Tensor,
    batch_size: int,
    normalization: Normalization,
    reporter: Reporter,
) -> tuple[float, float, float]:
    """One pass over the shuffled training split; returns (seconds, mean loss, accuracy)."""
    model.train()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    seen = 0
    started = time.perf_counter()
    for step, start in enumerate(range(0, len(order), batch_size), start=1):
        batch = order[start : start + batch_size]
        x, y = to_input(images[batch], normalization), labels[batch]  # (B, C, H, W) float, (B,)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(batch)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(batch)
        if step % _REPORT_EVERY == 0:
            elapsed = time.perf_counter() - started
            reporter.steps_done(step, loss_sum.item() / seen, correct.item() / seen, seen / elapsed)
    seconds = time.perf_counter() - started
    return seconds, loss_sum.item() / seen, correct.item() / seen


def _check_compatible(
    checkpoint: dict[str, Any], dataset: Dataset, input_shape: tuple[int, ...], run_dir: Path
) -> None:
    if checkpoint.get("classes") != list(dataset.classes) or checkpoint.get("input_shape") != list(input_shape):
        raise CnnlabError(
            f"{run_dir}: the checkpoint was trained on classes {checkpoint.get('classes')} at input "
            f"{checkpoint.get('input_shape')}, but the data now gives {list(dataset.classes)} at {list(input_shape)}"
        )
