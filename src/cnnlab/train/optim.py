"""Optimisers, learning-rate schedules and weight averaging, built from the config's optim section."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cnnlab.config import FinetuneConfig, OptimConfig
from cnnlab.errors import ConfigError
from cnnlab.models.registry import ParameterGroups

LOOKAHEAD_START_EPOCH = 4  # 1-based: the first three epochs move fast, unaveraged
LOOKAHEAD_EVERY = 5  # steps between averagings
# Per step. Each averaging keeps LOOKAHEAD_DECAY**LOOKAHEAD_EVERY * progress**3 of the average (progress: the
# share of all steps done), so the average follows the weights early on and holds more of its past late.
LOOKAHEAD_DECAY = 0.95
LAYER_GROUPS = 8  # learning-rate steps across a body being fine-tuned


def make_optimizer(
    model: nn.Module, groups: ParameterGroups, config: OptimConfig, matmul_dtype: torch.dtype = torch.float32
) -> torch.optim.Optimizer:
    """SGD, Adam or Muon over a model's parameter groups (its family says which are filters and norm biases).

    Normalisation biases get `bias_lr_scale` times the learning rate with the same decay per step. Muon takes
    the filter banks (at `muon_lr`) and updates the rest as Nesterov SGD does; it orthogonalises in
    `matmul_dtype` (bf16 where that is native, as the forward pass runs). SGD and Adam treat filters as the
    other weights."""
    muon = config.optimizer == "muon"
    position = {id(p): i for i, p in enumerate(model.parameters())}
    others = sorted(groups.others + ([] if muon else groups.filters), key=lambda p: position[id(p)])
    scale = config.bias_lr_scale
    param_groups: list[dict[str, Any]] = [
        {"params": others, "lr": config.lr, "weight_decay": config.weight_decay},
        {"params": groups.norm_biases, "lr": config.lr * scale, "weight_decay": config.weight_decay / scale},
    ]
    if muon and groups.filters:
        param_groups.append(
            {"params": groups.filters, "lr": config.muon_lr, "momentum": config.muon_momentum, "orthogonalize": True}
        )
    param_groups = [group for group in param_groups if group["params"]]
    if muon:
        return Muon(param_groups, momentum=config.momentum, nesterov=config.nesterov, matmul_dtype=matmul_dtype)
    return sgd_or_adam(param_groups, config)


def make_layerwise_optimizer(
    model: nn.Module, head: nn.Module, config: OptimConfig, finetune: FinetuneConfig
) -> torch.optim.Optimizer:
    """SGD or Adam over the whole network for fine-tuning it after its head (fastai's discriminative rates): the
    head learns at `unfreeze_lr`, and the body's parameters, in LAYER_GROUPS consecutive groups from input to
    output, at rates rising geometrically from `unfreeze_lr * layer_lr_ratio` towards it, so the early, generic
    layers move least."""
    if config.optimizer == "muon":
        raise ConfigError("train.unfreeze_epochs trains with adam or sgd, not muon", "train.optimizer")
    in_head = {id(p) for p in head.parameters()}
    body = [p for p in model.parameters() if id(p) not in in_head]
    chunk = -(-len(body) // LAYER_GROUPS)  # ceiling division: at most LAYER_GROUPS groups
    param_groups: list[dict[str, Any]] = [
        {
            "params": body[start : start + chunk],
            "lr": finetune.unfreeze_lr * finetune.layer_lr_ratio ** (1 - start / len(body)),
        }
        for start in range(0, len(body), chunk)
    ]
    param_groups.append({"params": list(head.parameters()), "lr": finetune.unfreeze_lr})
    for group in param_groups:
        group["weight_decay"] = config.weight_decay
    return sgd_or_adam(param_groups, config)


def sgd_or_adam(param_groups: list[dict[str, Any]], config: OptimConfig) -> torch.optim.Optimizer:
    """The config's SGD or Adam over `param_groups`. Fused kernels update every parameter in one call: fewer
    passes over memory than the default loop."""
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups, momentum=config.momentum, nesterov=config.nesterov, fused=True)
    return torch.optim.Adam(param_groups, eps=config.adam_eps, fused=True)


class Muon(torch.optim.Optimizer):
    """Momentum SGD whose update of each convolution filter bank is orthogonalised (Jordan et al., 2024).

    In groups with `orthogonalize`, the (Nesterov) momentum of a filter bank, seen as an (out, in*k*k)
    matrix, is replaced by the nearest matrix with all singular values near one, so every direction of
    the update moves at the same rate; the bank's weights are rescaled to a fixed norm before each
    step, which the BatchNorm after each convolution makes harmless. Other groups take plain SGD steps
    with coupled weight decay, as torch.optim.SGD does.
    """

    def __init__(self, groups: list[dict[str, Any]], momentum: float, nesterov: bool, matmul_dtype: torch.dtype):
        defaults = {"lr": 0.0, "momentum": momentum, "nesterov": nesterov, "weight_decay": 0.0, "orthogonalize": False}
        super().__init__(groups, defaults)
        self.matmul_dtype = matmul_dtype

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]  # no closure: one forward per step
        for group in self.param_groups:
            for weight in group["params"]:
                if weight.grad is None:
                    continue
                gradient = weight.grad
                if group["weight_decay"]:
                    gradient = gradient.add(weight, alpha=group["weight_decay"])
                buffer = self.state[weight].setdefault("momentum_buffer", torch.zeros_like(gradient))
                buffer.mul_(group["momentum"]).add_(gradient)
                update = gradient.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer
                if group["orthogonalize"]:
                    weight.mul_(len(weight) ** 0.5 / weight.norm())
                    matrix = update.reshape(len(update), -1)
                    update = orthogonalized(matrix, self.matmul_dtype).view_as(weight).to(weight.dtype)
                weight.add_(update, alpha=-group["lr"])


# A quintic Newton-Schulz iteration tuned for speed over exactness: three steps bring every singular value
# into roughly [0.7, 1.2], which trains as well as the exact orthogonal factor (Jordan et al., 2024).
_NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)
_NEWTON_SCHULZ_STEPS = 3


def orthogonalized(matrix: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An approximation of U V^T for matrix = U S V^T, computed in `dtype` with matmuls only."""
    a, b, c = _NEWTON_SCHULZ
    wide = matrix.shape[0] <= matrix.shape[1]
    x = (matrix if wide else matrix.T).to(dtype)  # (rows <= cols): the Gram matrix is the small one
    x = x / (x.norm() + 1e-7)  # every singular value <= 1, where the iteration converges
    for _ in range(_NEWTON_SCHULZ_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    result: torch.Tensor = x if wide else x.T
    return result


def make_schedule(
    optimizer: torch.optim.Optimizer, config: OptimConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
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
