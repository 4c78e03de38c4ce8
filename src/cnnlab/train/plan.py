"""A run's plan: the phases it trains in, known from its config before anything trains.

    images                 every model trained from scratch, and fine-tuning of the whole network
    head, then unfreeze    fine-tuning: the classifier on cached features, then (with unfreeze_epochs) everything

Where a phase starts is known only as the run goes (early stopping may end the one before early), so the plan
says what and how long; the engine builds each phase when the one before has ended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from cnnlab.config import TrainConfig

PhaseKind = Literal["images", "head", "unfreeze"]


@dataclass(frozen=True)
class PhasePlan:
    kind: PhaseKind
    epochs: float  # may be fractional: the last epoch then trains part of its steps


def plan_phases(settings: TrainConfig) -> list[PhasePlan]:
    """The phases `settings` trains in, in order."""
    finetune = settings.finetune
    if not finetune.head_only:
        return [PhasePlan("images", settings.optim.epochs)]
    unfreeze = [PhasePlan("unfreeze", finetune.unfreeze_epochs)] if finetune.unfreeze_epochs else []
    return [PhasePlan("head", settings.optim.epochs), *unfreeze]
