"""Training: `fit(RunConfig)` trains a registered model into a run folder; `resume` continues one.

Launched by torchrun, the same calls train data-parallel (see `distributed`): every process trains, the
main one alone writes the run folder. A run's phases are planned in `plan` and built in `phases` from the
components in `parts`; the loop over them is in `engine`, what happens around the steps in `hooks`, and
what a run carries from step to step, with its checkpoints, in `record`.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from cnnlab.atomic import WriteError
from cnnlab.config import RunConfig, TrainConfig
from cnnlab.data import Dataset, load_dataset, validation_split
from cnnlab.data.cache import cache_root
from cnnlab.data.dataset import ImageShape
from cnnlab.errors import CnnlabError, ConfigError, first_line
from cnnlab.machine import DTYPES, Precision, memory_bytes, resolve_device, resolve_precision, this_machine
from cnnlab.models import TrainedModel, model_spec
from cnnlab.models.registry import least_step_bytes
from cnnlab.run_dir import RunDir
from cnnlab.tracking.loggers import Trackers, start_trackers
from cnnlab.train import engine
from cnnlab.train.distributed import Ranks, check_restartable, joined, lost_contact, restarted_by_torchrun
from cnnlab.train.early_stopping import EarlyStopping
from cnnlab.train.hooks import (
    Checkpoints,
    EarlyStop,
    FinalModel,
    HardExampleSelection,
    Hooks,
    KeepBest,
    MetricsLine,
    SignalStop,
    StepReport,
    TrackerLog,
    WeightAveraging,
)
from cnnlab.train.parts import TrainingParts, build_batches, build_loss, build_trainee, initialize
from cnnlab.train.phases import build_phase
from cnnlab.train.plan import plan_phases
from cnnlab.train.record import Checkpointer, RunProgress
from cnnlab.train.reporter import LineReporter, Reporter, default_reporter
from cnnlab.train.rng import reproducible
from cnnlab.train.runtime import keep_freed_memory
from cnnlab.train.signals import StopOnSignal


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
    if restarted_by_torchrun() and config.out and RunDir(Path(config.out).expanduser()).has_checkpoint:
        return resume(Path(config.out).expanduser(), dataset=dataset, reporter=reporter)
    check_restartable(config.out)
    config.check()
    with (
        joined(resolve_device(config.train.system.device)) as ranks,
        reproducible(config.train.system.seed, ranks.device),
        contextlib.ExitStack() as held,
    ):
        precision = resolve_precision(config.train.system.precision, ranks.device)
        check_step_fits(config, precision, ranks)
        run_dir = ranks.from_main(lambda: held.enter_context(RunDir.claim(config)))
        dataset = data_for(config, dataset)
        if ranks.is_main:
            run_dir.write_config(config, precision)
            run_dir.write_data(dataset)
            run_dir.record_session(precision)
        return _train(config, precision, dataset, run_dir, reporter or default_reporter(), None, ranks)


def resume(
    run_dir: Path, epochs: float | None = None, dataset: Dataset | None = None, reporter: Reporter | None = None
) -> TrainingResult:
    """Continue an interrupted run from its last checkpoint; only the number of epochs may change."""
    folder = RunDir.existing(run_dir)
    config = folder.read_config()
    checkpoint = folder.load_checkpoint()
    folder.check_same_run(config, checkpoint)
    if epochs is not None:
        config.train.optim.epochs = epochs
    config.check()
    with (
        joined(resolve_device(config.train.system.device)) as ranks,
        reproducible(config.train.system.seed, ranks.device),
        contextlib.ExitStack() as held,
    ):
        ranks.from_main(lambda: held.enter_context(folder.locked()))
        # Re-resolved: a run checkpointed on a machine with native bf16 continues in fp32 on one without.
        precision = resolve_precision(config.train.system.precision, ranks.device)
        if ranks.is_main:
            if epochs is not None:
                folder.write_config(config, precision)
            folder.record_session(precision)
        dataset = data_for(config, dataset)
        return _train(config, precision, dataset, folder, reporter or default_reporter(), checkpoint, ranks)


def data_for(config: RunConfig, dataset: Dataset | None) -> Dataset:
    """`config.data` loaded, or the `dataset` given, with the validation split early stopping watches."""
    needed = bool(config.train.optim.patience)
    if dataset is None:
        return load_dataset(config.data, needs_validation=needed)
    return dataset if dataset.val is not None else validation_split(dataset, config.data, needed)


def _train(
    config: RunConfig,
    precision: Precision,
    dataset: Dataset,
    run_dir: RunDir,
    reporter: Reporter,
    checkpoint: dict[str, Any] | None,
    ranks: Ranks,
) -> TrainingResult:
    """Train what is left of the run; a write failure or a lost process ends it with one line that says
    which checkpoint is intact."""
    settings = config.train
    check_settings(settings, ranks.world_size)
    reporter = reporter if ranks.is_main else LineReporter(Console(quiet=True))
    keep_freed_memory()
    cache = cache_root(config.data.cache_dir)
    trainee = build_trainee(settings, precision, dataset, ranks)
    parts = TrainingParts(
        trainee,
        build_batches(settings, dataset, ranks, cache),
        build_loss(settings.optim, dataset, ranks.device),
        dataset,
        ranks,
    )
    plan, progress, stopping = plan_phases(settings), RunProgress(), EarlyStopping(settings.optim.patience)
    for line in dataset.summary():
        reporter.message(line)
    reporter.message(f"precision {precision} ({settings.system.precision}; {this_machine().describe()})")
    trackers = start_trackers(config, run_dir, precision) if ranks.is_main else Trackers([])
    classes = list(dataset.classes)
    checkpointer = Checkpointer(run_dir, config, classes, trainee, parts.batches, progress, stopping, ranks)
    if checkpoint is not None:
        checkpointer.restore(checkpoint)
    else:
        progress.init_seconds = initialize(trainee, settings, dataset, ranks.device, cache)
    build = functools.partial(build_phase, parts=parts, settings=settings)
    phase = build(plan[progress.phase_index], progress.phase_first_epoch)
    if checkpoint is not None:
        phase.load_state_dict(checkpoint)
    final = FinalModel(config, trainee, classes, progress, stopping, run_dir, ranks)
    try:
        if ranks.is_main:
            run_dir.restart_metrics(progress.history)
        with StopOnSignal() as stop:
            hooks = training_hooks(settings, parts, checkpointer, stopping, trackers, reporter, stop, run_dir, final)
            engine.train(plan, phase, build, progress, hooks, reporter)
    except BaseException as error:
        trackers.stopped()
        _raise_as_one_line(error, checkpointer, run_dir, ranks)
        raise
    finally:
        trackers.close()
        reporter.stop()
    assert final.info is not None
    trained = TrainedModel(trainee.model.eval(), final.info)
    return TrainingResult(trained, progress.history, run_dir.path, dataset, ranks.is_main)


def training_hooks(
    settings: TrainConfig,
    parts: TrainingParts,
    checkpointer: Checkpointer,
    stopping: EarlyStopping,
    trackers: Trackers,
    reporter: Reporter,
    stop: StopOnSignal,
    run_dir: RunDir,
    final: FinalModel,
) -> Hooks:
    """The hooks of a run, in the order each event calls them."""
    model, ranks = parts.trainee.model, parts.ranks
    averaging = (WeightAveraging(model),) if settings.optim.lookahead else ()
    tracking = (TrackerLog(trackers, parts.batches.steps_per_epoch),) if trackers else ()  # nothing read back else
    return Hooks(
        HardExampleSelection(parts.batches, ranks),
        *averaging,
        EarlyStop(stopping, model),
        Checkpoints(checkpointer, settings.system.checkpoint_every),
        MetricsLine(run_dir, ranks),
        *tracking,
        StepReport(reporter, ranks.world_size),
        KeepBest(stopping, model, reporter),
        SignalStop(stop, checkpointer, ranks),
        final,
    )


def _raise_as_one_line(error: BaseException, checkpointer: Checkpointer, run_dir: RunDir, ranks: Ranks) -> None:
    """A write failure or a lost process as one line saying which checkpoint is intact; else nothing."""
    if isinstance(error, WriteError):
        intact = checkpointer.intact
        kept = f"the checkpoint of {intact} in {run_dir} is intact" if intact else "no checkpoint was written yet"
        failure = WriteError(error.path, error.reason, kept)
        raise (failure.resumable(run_dir.path) if intact else failure) from None
    if isinstance(error, Exception) and lost_contact(error, ranks):
        raise CnnlabError(
            f"rank {ranks.rank}: another process of this run stopped ({first_line(error).split('. ')[0]}); "
            f"the last checkpoint in {run_dir} is intact"
        ).resumable(run_dir.path, ranks.world_size) from None


def check_step_fits(config: RunConfig, precision: Precision, ranks: Ranks) -> None:
    """Refuse an image size at which one training step cannot fit in memory, before anything is loaded: the
    estimate is a lower bound (one channel, the input and each layer's output, weights and gradients)."""
    size = config.data.image_size
    if size is None:
        return
    settings = config.train
    shard = -(-settings.optim.batch_size // ranks.world_size)  # this process's images per step
    needed = least_step_bytes(settings.model, ImageShape(1, size, size), shard, DTYPES[precision].itemsize)
    available = memory_bytes(ranks.device)
    if needed > available:
        raise ConfigError(
            f"data.image_size {size}: one training step of {settings.model} on {shard} images of {size}x{size} "
            f"takes at least {needed / 1e9:,.1f} GB, more than the {available / 1e9:,.1f} GB of memory here; "
            "choose a smaller data.image_size or train.batch_size",
            "data.image_size",
            "train.batch_size",
        )


def check_settings(settings: TrainConfig, world_size: int) -> None:
    """Refuse, in one line naming the keys, settings that cannot train together (each one's own range is
    checked by `RunConfig.check`)."""
    if settings.optim.batch_size < world_size:
        raise ConfigError(
            f"train.batch_size (the global batch) must be at least the number of processes ({world_size})",
            "train.batch_size",
        )
    if settings.finetune.unfreeze_epochs and not settings.finetune.head_only:
        raise ConfigError(
            "train.unfreeze_epochs follows head-only training; set train.head_only (the finetune recipe does)",
            "train.unfreeze_epochs",
            "train.head_only",
        )
    smallest = model_spec(settings.model).min_input_size
    if settings.augment.low_res and settings.augment.low_res < smallest:
        raise ConfigError(
            f"train.low_res must be at least {settings.model}'s smallest input ({smallest} px), "
            f"not {settings.augment.low_res}",
            "train.low_res",
        )
    if settings.optim.select_share < 1 and settings.finetune.head_only:
        raise ConfigError(
            "train.select_share selects images for the whole network's steps, not for train.head_only",
            "train.select_share",
        )
