"""Training: `fit(RunConfig)` trains a registered model and writes a run folder; `resume` continues one.

A run folder holds config.toml, metrics.jsonl (a JSON line per epoch), checkpoint.pt (rewritten
atomically at each epoch end) and, once finished, model.safetensors with model.json.

Launched by torchrun, the same calls train data-parallel (see `distributed`): every process trains, the
main one alone writes the run folder.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from cnnlab.atomic import WriteError, append_line, remove_temporaries, write_text
from cnnlab.config import RunConfig, TrainConfig, build, load_toml, to_toml
from cnnlab.data import Dataset, load_dataset
from cnnlab.data.augment import alternating_flips, mirror, random_flips, random_shifts, translate
from cnnlab.data.transforms import Normalization, to_input
from cnnlab.errors import CnnlabError, first_line
from cnnlab.machine import DTYPES, Precision, resolve_device, resolve_precision, synchronize, this_machine
from cnnlab.models import ModelInfo, TrainedModel, create_model, save_model
from cnnlab.models.files import INFO_FILE, WEIGHTS_FILE, package_version
from cnnlab.models.inference import loss_and_accuracy, predict_logits
from cnnlab.train.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from cnnlab.train.distributed import (
    Ranks,
    check_restartable,
    joined,
    lost_contact,
    restarted_by_torchrun,
    with_sync_bn,
)
from cnnlab.train.optim import (
    LOOKAHEAD_EVERY,
    LOOKAHEAD_START_EPOCH,
    Lookahead,
    lookahead_decay,
    make_optimizer,
    make_schedule,
)
from cnnlab.train.progress import LineReporter, Reporter, default_reporter
from cnnlab.train.runtime import keep_freed_memory

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
_REPORT_EVERY = 25  # steps between progress-bar updates; each update reads the loss back from the device


@dataclass
class TrainingResult:
    model: TrainedModel
    history: list[dict[str, Any]]
    run_dir: Path
    dataset: Dataset  # the data it was trained on, already loaded: reports reuse it instead of decoding again
    is_main: bool = True  # False in the processes of a distributed run that write nothing


def fit(config: RunConfig, dataset: Dataset | None = None, reporter: Reporter | None = None) -> TrainingResult:
    """Train `config.train.model` on `dataset` (loaded from `config.data` when not given).

    A process that torchrun restarted after a failure resumes the run in `config.out` instead."""
    if restarted_by_torchrun() and config.out and (Path(config.out).expanduser() / CHECKPOINT_FILE).is_file():
        return resume(Path(config.out).expanduser(), dataset=dataset, reporter=reporter)
    check_restartable(config.out)
    with joined(resolve_device(config.train.device)) as ranks:
        run_dir = ranks.from_main(lambda: _new_run_dir(config))
        dataset = dataset if dataset is not None else load_dataset(config.data)
        precision = resolve_precision(config.train.precision, ranks.device)
        if ranks.is_main:
            write_run_config(run_dir, config, precision)
        return _train(config, precision, dataset, run_dir, reporter or default_reporter(), None, ranks)


def resume(
    run_dir: Path, epochs: float | None = None, dataset: Dataset | None = None, reporter: Reporter | None = None
) -> TrainingResult:
    """Continue an interrupted run from its last checkpoint; only the number of epochs may change."""
    if not run_dir.is_dir():
        raise CnnlabError(f"{run_dir}: no such run folder to resume")
    config = read_run_config(run_dir)
    checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE)
    _check_same_run(config, checkpoint, run_dir)
    if epochs is not None:
        config.train.epochs = epochs
    with joined(resolve_device(config.train.device)) as ranks:
        # Re-resolved: a run checkpointed on a machine with native bf16 continues in fp32 on one without.
        precision = resolve_precision(config.train.precision, ranks.device)
        if epochs is not None and ranks.is_main:
            write_run_config(run_dir, config, precision)
        dataset = dataset if dataset is not None else load_dataset(config.data)
        return _train(config, precision, dataset, run_dir, reporter or default_reporter(), checkpoint, ranks)


def write_run_config(run_dir: Path, config: RunConfig, precision: Precision) -> None:
    """config.toml: the resolved config, headed by a comment with the precision it resolved to here."""
    header = f"# precision {config.train.precision} ran as {precision} on {this_machine().describe()}\n"
    write_text(run_dir / CONFIG_FILE, header + to_toml(config))


def read_run_config(run_dir: Path) -> RunConfig:
    return build(RunConfig, load_toml(run_dir / CONFIG_FILE), str(run_dir / CONFIG_FILE))


def default_run_dir(config: RunConfig) -> Path:
    """runs/<model>-<data>-<time>, numbered when that name is taken."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path("runs") / f"{config.train.model}-{config.data.label}-{stamp}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = run_dir.with_name(f"{config.train.model}-{config.data.label}-{stamp}-{suffix}")
    return run_dir


def _new_run_dir(config: RunConfig) -> Path:
    if config.out:
        run_dir = Path(config.out).expanduser()
        if not run_dir.parent.is_dir():
            raise CnnlabError(f"{run_dir.parent}: the output folder's parent does not exist")
        if (run_dir / CHECKPOINT_FILE).exists():
            raise CnnlabError(f"{run_dir}: already holds a run; use --resume {run_dir} or another --out")
    else:
        run_dir = default_run_dir(config)
    try:
        run_dir.mkdir(parents=not config.out, exist_ok=True)
        (run_dir / ".write-test").touch()
        (run_dir / ".write-test").unlink()
    except OSError as error:
        raise CnnlabError(f"{run_dir}: cannot write the run folder ({error.strerror})") from None
    return run_dir


def _train(
    config: RunConfig,
    precision: Precision,
    dataset: Dataset,
    run_dir: Path,
    reporter: Reporter,
    checkpoint: dict[str, Any] | None,
    ranks: Ranks,
) -> TrainingResult:
    settings = config.train
    if settings.batch_size < ranks.world_size or settings.epochs < 0:
        raise CnnlabError(
            f"--batch-size (the global batch) must be at least the number of processes ({ranks.world_size}), "
            "and --epochs at least 0"
        )
    if not ranks.is_main:
        reporter = LineReporter(Console(quiet=True))
    keep_freed_memory()
    trainer = Trainer(settings, precision, dataset, ranks)
    reporter.message(f"precision {precision} ({settings.precision}; {this_machine().describe()})")
    intact = None  # the last checkpoint on disk, as "epoch E" or "epoch E step S"
    if checkpoint is not None:
        _check_compatible(checkpoint, dataset, trainer.input_shape, run_dir)
        trainer.load_state_dict(checkpoint)
        partial = checkpoint.get("partial_epoch")
        intact = f"epoch {partial['epoch']} step {partial['step']}" if partial else f"epoch {checkpoint['epoch']}"
    else:
        trainer.init_from_data()

    def save(epoch: int, step: int) -> None:
        nonlocal intact
        if not all(torch.isfinite(p).all() for p in trainer.model.parameters()):
            raise NonFiniteLoss(f"non-finite weights at epoch {epoch} step {step}; the last checkpoint is kept")
        state = trainer.state_dict()  # on every process: it sums the epoch's running totals over them
        if ranks.is_main:
            extra = {"classes": list(dataset.classes), "input_shape": list(trainer.input_shape)}
            save_checkpoint(run_dir / CHECKPOINT_FILE, {**state, **extra, "config": dataclasses.asdict(config)})
            whole_epoch = step == trainer.steps_in_epoch(epoch)
            intact = f"epoch {epoch}" if whole_epoch else f"epoch {epoch} step {step}"

    def after_step(epoch: int, step: int) -> None:
        # Every process stops at the same step, so that the checkpoint's collectives line up.
        if ranks.any(stop.signal is not None):
            save(epoch, step)
            raise TrainingStopped(stop.signal or signal.SIGTERM, run_dir, epoch, step)
        if settings.checkpoint_every and trainer.global_step(epoch, step) % settings.checkpoint_every == 0:
            save(epoch, step)

    try:
        if ranks.is_main:
            remove_temporaries(run_dir, CHECKPOINT_FILE, METRICS_FILE, WEIGHTS_FILE, INFO_FILE)
            # The metrics log is rebuilt from the checkpoint, dropping any epoch logged after it was written.
            write_text(run_dir / METRICS_FILE, "".join(json.dumps(metrics) + "\n" for metrics in trainer.history))
        with StopOnSignal() as stop:
            for epoch in range(len(trainer.history) + 1, math.ceil(settings.epochs) + 1):
                reporter.epoch_started(epoch, settings.epochs, trainer.steps_in_epoch(epoch))
                metrics = trainer.train_epoch(epoch, reporter, after_step)
                save(epoch, trainer.steps_in_epoch(epoch))
                if ranks.is_main:
                    append_line(run_dir / METRICS_FILE, json.dumps(metrics))
                reporter.epoch_done(metrics)
        info = _model_info(config, precision, dataset, trainer)
        if ranks.is_main:
            save_model(trainer.model, info, run_dir)
    except WriteError as error:
        kept = f"the checkpoint of {intact} in {run_dir} is intact" if intact else "no checkpoint was written yet"
        then = f"; once there is room: cnnlab train --resume {run_dir}" if intact else ""
        raise WriteError(error.path, error.reason, f"{kept}{then}") from None
    except Exception as error:
        if lost_contact(error, ranks):
            raise CnnlabError(
                f"rank {ranks.rank}: another process of this run stopped ({first_line(error).split('. ')[0]}); "
                f"the last checkpoint in {run_dir} is intact: cnnlab train --resume {run_dir}"
            ) from None
        raise
    finally:
        reporter.stop()
    return TrainingResult(TrainedModel(trainer.model.eval(), info), trainer.history, run_dir, dataset, ranks.is_main)


def _model_info(config: RunConfig, precision: Precision, dataset: Dataset, trainer: Trainer) -> ModelInfo:
    normalization = trainer.normalization
    return ModelInfo(
        architecture=config.train.model,
        classes=list(dataset.classes),
        input_shape=list(trainer.input_shape),
        normalization={"mean": list(normalization.mean), "std": list(normalization.std)},
        tta=config.train.tta,
        precision=precision,
        metrics=trainer.history[-1] if trainer.history else {},
        config=dataclasses.asdict(config),
        cnnlab_version=package_version(),
    )


class Trainer:
    """The state of one training run, and one epoch of it at a time."""

    def __init__(self, settings: TrainConfig, precision: Precision, dataset: Dataset, ranks: Ranks):
        self.settings, self.dataset, self.ranks = settings, dataset, ranks
        self.precision = precision
        self.bf16 = precision == "bf16"  # autocast for the forward pass and evaluation
        self.device = device = ranks.device
        height, width, channels = dataset.image_shape
        self.input_shape = (channels, height, width)
        model = create_model(settings.model, self.input_shape, len(dataset.classes), seed=settings.seed)
        self.model = with_sync_bn(model, settings.sync_bn, ranks).to(device)
        if settings.compile and self.bf16 and device.type == "cpu":
            raise CnnlabError(
                "--compile with bf16 on the CPU gives non-finite gradients with this torch's inductor (seen with "
                "torch 2.13 on the fast nets); add --precision fp32, or train without --compile"
            )
        # The training forward, compiled when asked: it shares the model's parameters, which are what is saved.
        self.compiled = torch.compile(self.model) if settings.compile else self.model
        self.normalization = channel_statistics(dataset.train.images, settings.normalize)
        self.images = torch.from_numpy(dataset.train.images).to(device)  # (N, H, W, C) uint8, all in memory
        self.labels = torch.from_numpy(dataset.train.labels).to(device)
        self.steps_per_epoch = -(-len(self.labels) // settings.batch_size)
        self.total_steps = math.ceil(self.steps_per_epoch * settings.epochs)
        self.optimizer = make_optimizer(self.model, settings, DTYPES[precision])
        self.schedule = make_schedule(self.optimizer, settings, self.total_steps)
        self.random = torch.Generator().manual_seed(settings.seed + 1)  # data order and augmentation
        # A fixed random half of the images, mirrored on odd epochs (the other half on even ones).
        self.flip_half = torch.rand(len(self.labels), generator=torch.Generator().manual_seed(settings.seed + 2)) < 0.5
        self.lookahead: Lookahead | None = None
        self.history: list[dict[str, Any]] = []
        self.partial: dict[str, Any] | None = None  # the epoch in progress, for mid-epoch checkpoints

    def init_from_data(self) -> None:
        """Data-dependent initialisation (the fast family's whitening layer), from up to 5,000 images."""
        init = getattr(self.model, "init_from_data", None)
        if init is not None:
            sample = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(self.settings.seed))[
                :5000
            ]
            init(to_input(self.images[sample.to(self.device)], self.normalization))

    def train_epoch(
        self, epoch: int, reporter: Reporter, after_step: Callable[[int, int], None] = lambda epoch, step: None
    ) -> dict[str, Any]:
        """Train one epoch, or finish the one a mid-epoch checkpoint stopped in; `after_step(epoch, step)` runs
        after every step with the trainer's state complete (it may checkpoint, or raise to stop)."""
        settings, model = self.settings, self.model
        model.train()
        whiten = getattr(model, "whiten", None)
        if whiten is not None:
            whiten.bias.requires_grad_(epoch <= settings.whiten_bias_epochs)
        forward = self.ranks.wrap(self.compiled)  # after the line above: DDP must see which parameters learn
        partial = self.partial if self.partial is not None and self.partial["epoch"] == epoch else None
        order_state = partial["order_state"] if partial else self.random.get_state()
        current_state = self.random.get_state()
        self.random.set_state(order_state)
        order = torch.randperm(len(self.labels), generator=self.random).to(self.device)
        if partial:  # the permutation is redrawn; augmentation continues from where it stopped
            self.random.set_state(current_state)
        flips = alternating_flips(self.flip_half, epoch).to(self.device) if settings.flip == "alternating" else None
        done = partial["step"] if partial else 0
        # The running totals are this process's; a checkpoint holds their sum, which one process carries on.
        carried = partial if partial and self.ranks.is_main else None
        loss_sum = torch.tensor(carried["loss_sum"] if carried else 0.0, device=self.device)
        correct = torch.tensor(carried["correct"] if carried else 0, device=self.device)
        seen = carried["seen"] if carried else 0
        started = time.perf_counter() - (partial["seconds"] if partial else 0.0)
        starts = range(0, len(order), settings.batch_size)[: self.steps_in_epoch(epoch)]
        for step, start in enumerate(starts, start=1):
            if step <= done:
                continue
            batch = order[start : start + settings.batch_size]  # the global batch
            # Augmentation is drawn for the whole global batch, so the generator moves the same way
            # whatever the number of processes, and each process applies its shard's share.
            flip_mask = flips[batch] if flips is not None else None
            if settings.flip == "random":
                flip_mask = random_flips(len(batch), self.random)
            shifts = random_shifts(len(batch), settings.translate, self.random) if settings.translate else None
            mine = self.ranks.shard(len(batch))
            count = mine.stop - mine.start
            if count == 0:  # fewer images than processes: DDP still needs this process's step, worth nothing
                mine = slice(0, 1)
            images, labels = self.images[batch[mine]], self.labels[batch[mine]]  # (b, H, W, C) uint8, (b,)
            if flip_mask is not None:
                images = mirror(images, flip_mask[mine])
            if shifts is not None:
                images = translate(images, shifts[mine])
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                logits = forward(to_input(images, self.normalization))
                summed = F.cross_entropy(
                    logits.float(), labels, label_smoothing=settings.label_smoothing, reduction="sum"
                )
            # DDP averages the processes' gradients: scaled so, the step is that of the global batch's mean loss.
            loss = summed * (self.ranks.world_size / len(batch) if count else 0.0)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch} step {step}; the last checkpoint is kept")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.schedule is not None:
                self.schedule.step()
            self._average_weights(epoch, self.global_step(epoch, step))
            if count:
                loss_sum += summed.detach()
                correct += (logits.detach().argmax(1) == labels).sum()
                seen += count
            self.partial = {
                "epoch": epoch,
                "step": step,
                "order_state": order_state,
                "loss_sum": loss_sum,
                "correct": correct,
                "seen": seen,
                "seconds": time.perf_counter() - started,
            }
            if step % _REPORT_EVERY == 0:  # this process's share: close enough for a progress bar
                elapsed = time.perf_counter() - started
                speed = seen * self.ranks.world_size / elapsed
                reporter.steps_done(step, loss_sum.item() / max(seen, 1), correct.item() / max(seen, 1), speed)
            after_step(epoch, step)
        self.partial = None
        if self.lookahead is not None:
            self.lookahead.update(model, decay=1.0)  # end the epoch on the averaged weights
        self.ranks.copy_buffers_from_main(model)
        loss_sum, correct, seen = self._summed(loss_sum, correct, seen)
        synchronize(self.device)
        seconds = time.perf_counter() - started

        metrics: dict[str, Any] = {"epoch": epoch, "train_loss": loss_sum / seen, "train_acc": correct / seen}
        metrics |= self.evaluate()
        metrics |= {"lr": self.optimizer.param_groups[0]["lr"], "seconds": seconds, "images_per_s": seen / seconds}
        metrics["precision"] = self.precision
        self.history.append(metrics)
        return metrics

    def _summed(self, loss_sum: torch.Tensor, correct: torch.Tensor, seen: int) -> tuple[float, int, int]:
        """An epoch's running totals summed over the processes."""
        totals = torch.tensor([float(loss_sum), float(correct), float(seen)], dtype=torch.float64, device=self.device)
        loss, right, count = self.ranks.sum(totals).tolist()
        return loss, int(right), int(count)

    def global_step(self, epoch: int, step: int) -> int:
        return (epoch - 1) * self.steps_per_epoch + step

    def steps_in_epoch(self, epoch: int) -> int:
        """All steps of an epoch, or fewer in a fractional last epoch."""
        return min(self.steps_per_epoch, self.total_steps - (epoch - 1) * self.steps_per_epoch)

    def _average_weights(self, epoch: int, step: int) -> None:
        if not self.settings.lookahead or epoch < LOOKAHEAD_START_EPOCH or step % LOOKAHEAD_EVERY:
            return
        if self.lookahead is None:
            self.lookahead = Lookahead(self.model)
        else:
            self.lookahead.update(self.model, lookahead_decay(step, self.total_steps))

    def evaluate(self) -> dict[str, float]:
        """Loss and accuracy on validation and test; on test also with the recipe's TTA, if it has one."""
        metrics = {}
        test = self.dataset.test
        for name, split in (("val", self.dataset.val), ("test", test)):
            if split is not None:
                logits = self._logits(split.images, "none")
                metrics[f"{name}_loss"], metrics[f"{name}_acc"] = loss_and_accuracy(logits, split.labels)
        if self.settings.tta != "none":
            metrics["test_acc_tta"] = loss_and_accuracy(self._logits(test.images, self.settings.tta), test.labels)[1]
        return metrics

    def _logits(self, images: np.ndarray, tta: str) -> torch.Tensor:
        """Every image's logits, each process computing its shard of them."""
        mine = self.ranks.shard(len(images))
        logits = predict_logits(self.model, images[mine], self.normalization, self.device, tta, self.bf16)
        return self.ranks.gather_rows(logits, len(images))

    def state_dict(self) -> dict[str, Any]:
        """The run's state, the same on every process (the epoch's running totals are summed over them)."""
        partial = None
        if self.partial is not None:
            totals = self._summed(self.partial["loss_sum"], self.partial["correct"], self.partial["seen"])
            partial = {**self.partial, **dict(zip(("loss_sum", "correct", "seen"), totals, strict=True))}
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict() if self.schedule is not None else None,
            "lookahead": self.lookahead.state_dict() if self.lookahead is not None else None,
            "data_order": self.random.get_state(),
            "global_rng": global_rng_states(),
            "epoch": len(self.history),
            "history": self.history,
            "partial_epoch": partial,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.schedule is not None and state.get("schedule") is not None:
            self.schedule.load_state_dict(state["schedule"])
        if state.get("lookahead") is not None:
            self.lookahead = Lookahead.from_state_dict(self.model, state["lookahead"])
        self.random.set_state(state["data_order"])
        if state.get("global_rng") is not None:
            restore_global_rng_states(state["global_rng"])
        self.history = state["history"]
        self.partial = state.get("partial_epoch")


class NonFiniteLoss(CnnlabError):
    pass


class TrainingStopped(CnnlabError):
    """Training was asked to stop by a signal and saved a checkpoint first; exits 128 + the signal number."""

    def __init__(self, signal_number: int, run_dir: Path, epoch: int, step: int):
        name = signal.Signals(signal_number).name
        super().__init__(
            f"stopped by {name} at epoch {epoch} step {step}; checkpoint saved, continue with: "
            f"cnnlab train --resume {run_dir}"
        )
        self.exit_code = 128 + signal_number


class StopOnSignal:
    """While active, SIGINT and SIGTERM only set `signal`: training stops at the next step boundary, after
    saving, instead of dying mid-step. Outside the main thread (where handlers cannot be set) it does nothing."""

    def __init__(self):
        self.signal: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self.previous[number] = signal.signal(number, self._handle)
        return self

    def _handle(self, number: int, _frame: Any) -> None:
        self.signal = number

    def __exit__(self, *_exc: object) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)


def global_rng_states() -> dict[str, Any]:
    """Python's, numpy's and torch's global generators, as plain lists and tensors (loadable with weights_only).

    Training draws only from its own seeded generator; these are kept so that any code that does use the
    global ones (a custom model's dropout, say) also resumes exactly."""
    name, keys, position, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [name, keys.tolist(), position, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }


def restore_global_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    name, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


def channel_statistics(images: np.ndarray, mode: str) -> Normalization:
    """Per-channel mean and std of (N, H, W, C) uint8 images on the [0, 1] scale, or the unit normalisation."""
    channels = images.shape[-1]
    if mode == "unit":
        return Normalization.unit(channels)
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for start in range(0, len(images), 4096):  # chunks bound the float copy's memory
        chunk = images[start : start + 4096].reshape(-1, channels).astype(np.float64) / 255.0
        total += chunk.sum(0)
        squares += (chunk**2).sum(0)
    count = images.size // channels
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-12))
    return Normalization(tuple(mean.tolist()), tuple(std.tolist()))


def _check_same_run(config: RunConfig, checkpoint: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume when config.toml no longer describes the checkpointed run (epochs may change)."""
    saved = checkpoint.get("config", {})
    current = dataclasses.asdict(config)
    conflicts = [
        f"{section}.{key}"
        for section in ("data", "train")
        for key in sorted(set(saved.get(section, {})) | set(current[section]))
        if key != "epochs" and saved.get(section, {}).get(key) != current[section].get(key)
    ]
    if conflicts:
        raise CnnlabError(
            f"{run_dir}: {CONFIG_FILE} differs from the checkpointed run in {', '.join(conflicts)}; "
            "only epochs may change on resume"
        )


def _check_compatible(
    checkpoint: dict[str, Any], dataset: Dataset, input_shape: tuple[int, ...], run_dir: Path
) -> None:
    if checkpoint.get("classes") != list(dataset.classes) or checkpoint.get("input_shape") != list(input_shape):
        raise CnnlabError(
            f"{run_dir}: the checkpoint was trained on classes {checkpoint.get('classes')} at input "
            f"{checkpoint.get('input_shape')}, but the data now gives {list(dataset.classes)} at {list(input_shape)}"
        )
