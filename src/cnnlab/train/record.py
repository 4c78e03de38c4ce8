"""What a run carries from step to step (`RunProgress`), and its checkpoints: collected from each component's own
`state_dict`, written on the main process, and restored bit for bit."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from cnnlab.config import RunConfig
from cnnlab.data.loader import TrainBatches
from cnnlab.errors import CnnlabError
from cnnlab.run_dir import RunDir, metrics_in_current_names
from cnnlab.train.distributed import Ranks
from cnnlab.train.early_stopping import EarlyStopping
from cnnlab.train.parts import Trainee
from cnnlab.train.rng import global_rng_states, restore_global_rng_states

if TYPE_CHECKING:
    from cnnlab.train.phases import Phase


class NonFiniteLoss(CnnlabError):
    pass


@dataclass
class PartialEpoch:
    """The epoch in progress, for mid-epoch checkpoints: its last finished step and this process's totals."""

    epoch: int
    step: int
    loss_sum: torch.Tensor  # summed cross-entropy of the images seen, on the device (read back only to report)
    correct: torch.Tensor
    seen: int
    seconds: float


@dataclass
class RunProgress:
    """Each trained epoch's metrics, the epoch in progress, and where the run is in its plan of phases."""

    history: list[dict[str, Any]] = field(default_factory=list)
    partial: PartialEpoch | None = None
    phase_index: int = 0  # into the plan
    phase_first_epoch: int = 1
    init_seconds: float = 0.0  # the data-dependent initialisation's, for the time a run takes to deliver

    def state_dict(self, ranks: Ranks) -> dict[str, Any]:
        """The same on every process: the epoch's running totals are summed over them."""
        partial = None
        if self.partial is not None:
            loss_sum, correct, seen = summed(ranks, self.partial.loss_sum, self.partial.correct, self.partial.seen)
            partial = {**dataclasses.asdict(self.partial), "loss_sum": loss_sum, "correct": correct, "seen": seen}
        return {
            "epoch": len(self.history),
            "history": self.history,
            "partial_epoch": partial,
            "phase_index": self.phase_index,
            "phase_first_epoch": self.phase_first_epoch,
        }

    def load_state_dict(self, state: dict[str, Any], ranks: Ranks) -> None:
        self.history = [metrics_in_current_names(line) for line in state["history"]]
        unfrozen_at = state.get("unfrozen_at")  # a checkpoint of the release before the plan: the unfreeze phase
        self.phase_index = state.get("phase_index", 0 if unfrozen_at is None else 1)
        self.phase_first_epoch = state.get("phase_first_epoch", (unfrozen_at or 0) + 1)
        partial = state["partial_epoch"]
        self.partial = None
        if partial is not None:
            # The sums a checkpoint holds are carried on by one process; the others start their share at zero.
            carried = ranks.is_main
            self.partial = PartialEpoch(
                partial["epoch"],
                partial["step"],
                torch.tensor(partial["loss_sum"] if carried else 0.0, device=ranks.device),
                torch.tensor(partial["correct"] if carried else 0, device=ranks.device),
                partial["seen"] if carried else 0,
                partial["seconds"],
            )


def summed(
    ranks: Ranks, loss_sum: torch.Tensor | float, correct: torch.Tensor | int, seen: int
) -> tuple[float, int, int]:
    """An epoch's running totals summed over the processes."""
    totals = torch.tensor([float(loss_sum), float(correct), float(seen)], dtype=torch.float64, device=ranks.device)
    loss, right, count = ranks.sum(totals).tolist()
    return loss, int(right), int(count)


class Checkpointer:
    """Writes the run's checkpoint from its components (every process takes part in the sums; the main one
    writes), and remembers the last one on disk, to say what a failure left intact."""

    def __init__(
        self,
        run_dir: RunDir,
        config: RunConfig,
        classes: list[str],
        trainee: Trainee,
        batches: TrainBatches,
        progress: RunProgress,
        stopping: EarlyStopping,
        ranks: Ranks,
    ):
        self.run_dir, self.config, self.classes, self.ranks = run_dir, config, classes, ranks
        self.trainee, self.batches, self.progress, self.stopping = trainee, batches, progress, stopping
        self.phase: Phase | None = None  # the phase in training, set as each starts
        self.intact: str | None = None  # the last checkpoint on disk, as "epoch E" or "epoch E step S"

    def save(self, epoch: int, step: int) -> None:
        model, phase = self.trainee.model, self.phase
        assert phase is not None, "checkpoints are written from a phase"
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise NonFiniteLoss(f"non-finite weights at epoch {epoch} step {step}; the last checkpoint is kept")
        state = {
            "model": model.state_dict(),
            **phase.state_dict(),
            "loader": self.batches.state_dict(),
            "global_rng": global_rng_states(),
            **self.progress.state_dict(self.ranks),  # on every process: it sums the epoch's totals over them
            "early_stopping": self.stopping.state_dict(),
        }
        if self.ranks.is_main:
            about = {"classes": self.classes, "input_shape": list(self.trainee.input_shape)}
            self.run_dir.save_checkpoint({**state, **about, "config": dataclasses.asdict(self.config)})
            finished = step == phase.steps_in_epoch(epoch)
            self.intact = f"epoch {epoch}" if finished else f"epoch {epoch} step {step}"

    def restore(self, checkpoint: dict[str, Any]) -> None:
        """Everything but the phase, which is built from the plan at the restored `progress.phase_index` and then
        loads its own part (`Phase.load_state_dict`)."""
        self.run_dir.check_compatible(checkpoint, self.classes, list(self.trainee.input_shape))
        self.trainee.model.load_state_dict(checkpoint["model"])
        self.batches.load_state_dict(checkpoint["loader"])
        restore_global_rng_states(checkpoint["global_rng"])
        self.progress.load_state_dict(checkpoint, self.ranks)
        self.stopping.load_state_dict(checkpoint["early_stopping"])
        partial = checkpoint["partial_epoch"]
        self.intact = f"epoch {partial['epoch']} step {partial['step']}" if partial else f"epoch {checkpoint['epoch']}"


def kept_metrics(history: list[dict[str, Any]], best_epoch: int | None) -> dict[str, Any]:
    """The metrics of the epoch whose weights the model has: the last, or the one early stopping kept."""
    if best_epoch is not None:
        return history[best_epoch - 1] | {"best_epoch": best_epoch}
    return history[-1] if history else {}
