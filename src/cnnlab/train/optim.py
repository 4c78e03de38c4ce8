"""Optimisers, learning-rate schedules and weight averaging, built from a TrainConfig."""

from __future__ import annotations

import torch
from torch import nn

from cnnlab.config import TrainConfig

LOOKAHEAD_START_EPOCH = 4  # 1-based: the first three epochs move fast, unaveraged
LOOKAHEAD_EVERY = 5  # steps between averagings
LOOKAHEAD_DECAY = 0.95  # per step; raised to the power (progress ** 3) so averaging strengthens late


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD or Adam; BatchNorm biases get `bias_lr_scale` times the learning rate with the same decay per step."""
    norm_biases = {id(m.bias) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    biases = [p for p in trainable if id(p) in norm_biases]
    others = [p for p in trainable if id(p) not in norm_biases]
    scale = config.bias_lr_scale
    groups = [
        {"params": others, "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": biases, "lr": config.lr * scale, "weight_decay": config.weight_decay / scale},
    ]
    groups = [group for group in groups if group["params"]]
    # Fused kernels update every parameter in one call: fewer passes over memory than the default loop.
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=config.momentum, nesterov=config.nesterov, fused=True)
    return torch.optim.Adam(groups, eps=config.adam_eps, fused=True)


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int):
    """A per-step multiplier of each group's learning rate."""
    if config.schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    peak = max(1, round(config.peak_fraction * total_steps))

    def triangle(step: int) -> float:
        if step <= peak:
            return config.lr_start + (1 - config.lr_start) * step / peak
        return 1 + (config.lr_end - 1) * min(1.0, (step - peak) / max(1, total_steps - peak))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, triangle)


class Lookahead:
    """An exponential moving average of the weights (and BatchNorm statistics) that is copied back into
    the network each time it is updated: the network keeps exploring from the averaged point."""

    def __init__(self, model: nn.Module):
        self.average = {name: value.detach().clone() for name, value in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        for name, value in model.state_dict().items():
            if value.is_floating_point():
                self.average[name].lerp_(value, 1 - decay)
                value.copy_(self.average[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.average

    @classmethod
    def from_state_dict(cls, model: nn.Module, state: dict[str, torch.Tensor]) -> Lookahead:
        lookahead = cls(model)
        lookahead.average = {name: tensor.clone() for name, tensor in state.items()}
        return lookahead


def lookahead_decay(step: int, total_steps: int) -> float:
    return LOOKAHEAD_DECAY**LOOKAHEAD_EVERY * (step / total_steps) ** 3
