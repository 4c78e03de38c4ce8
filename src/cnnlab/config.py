"""Typed configuration that flows top-down: DataConfig and TrainConfig, bundled in RunConfig.

Values are resolved in one order: dataclass defaults < the model's recipe < a TOML file < CLI flags.
The resolved RunConfig is saved as `config.toml` in every run folder.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from cnnlab.errors import CnnlabError


@dataclass
class DataConfig:
    dataset: str | None = None  # a named dataset: "digits", "cifar10", "cifar100"
    data: str | None = None  # a path: image folder, .tar.gz/.zip of one, or a CIFAR python archive
    image_size: int | None = None  # pixels per side; None keeps the source's (most common) size
    val_fraction: float = 0.0  # share of train held out for validation (stratified)
    test_fraction: float = 0.2  # share held out for test when the source has no test split
    split_seed: int = 0  # seeds the validation and test splits, independent of the training seed
    cache_dir: str | None = None  # None: $CNNLAB_CACHE or ~/.cache/cnnlab
    strict: bool = False  # unreadable images are an error instead of being skipped

    @property
    def label(self) -> str:
        """A short name for run folders: the dataset name or the data path's stem."""
        if self.dataset:
            return self.dataset
        if self.data:
            name = Path(self.data).name
            for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
                name = name.removesuffix(suffix)
            return name or "data"
        return "data"


@dataclass
class TrainConfig:
    model: str = "tutorial-cnn"
    recipe: str | None = None  # None: the model's own recipe
    optimizer: Literal["sgd", "adam", "muon"] = "adam"  # muon: orthogonalised updates for conv filters, SGD else
    lr: float = 1e-3  # peak learning rate per step, for the batch-mean loss
    momentum: float = 0.0  # SGD only
    nesterov: bool = False  # SGD only
    weight_decay: float = 0.0  # L2 added to the gradient (torch's coupled form)
    adam_eps: float = 1e-7  # Keras' default, not torch's 1e-8
    muon_lr: float = 0.24  # Muon only: the filters' learning rate (the update is orthogonal: no batch scaling)
    muon_momentum: float = 0.6  # Muon only: the filters' Nesterov momentum
    batch_size: int = 32  # images per step, across all processes (the global batch)
    epochs: float = 10  # a fraction trains part of the last epoch; the schedule spans exactly that
    seed: int = 0  # seeds weight init, data order and augmentation
    device: str = "auto"  # "auto" picks cuda when present, else cpu
    # Schedule: "constant", or "triangle": linear from lr*lr_start up to lr at peak_fraction of all
    # steps, then linear down to lr*lr_end at the last step.
    schedule: Literal["constant", "triangle"] = "constant"
    peak_fraction: float = 0.23
    lr_start: float = 0.2
    lr_end: float = 0.07
    label_smoothing: float = 0.0
    bias_lr_scale: float = 1.0  # BatchNorm biases learn this much faster, with unchanged decay per step
    lookahead: bool = False  # average weights into an EMA every 5 steps from epoch 4, copied back each time
    whiten_bias_epochs: int = 0  # epochs during which the frozen whitening layer's bias still learns
    normalize: Literal["unit", "standardize"] = "unit"  # [0, 1] pixels, or per-channel mean 0 std 1
    flip: Literal["none", "random", "alternating"] = "none"  # alternating: each image flips every other epoch
    translate: int = 0  # random shift by up to this many pixels, reflect-padded
    tta: Literal["none", "flip", "flip-translate"] = "none"  # views averaged at evaluation
    # bf16 autocast for convolutions and matmuls; "auto": bf16 where this machine has it natively, fp32 else
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False  # torch.compile the training forward (its first steps pay for the compilation)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints, besides each epoch's end; 0: none
    sync_bn: bool = False  # distributed runs: BatchNorm statistics over the global batch, not each shard


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str | None = None  # run folder; None: runs/<model>-<dataset>-<timestamp>


def build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Make dataclass `cls` from `values`, refusing unknown keys and values of the wrong type."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CnnlabError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise CnnlabError(f"{where}: [{name}] must be a table")
            kwargs[name] = build(hint, value, f"{where} [{name}]")
        else:
            kwargs[name] = _checked(value, hint, f"{where}: {name}")
    return cls(**kwargs)


def _checked(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _checked(value, option, where)
            except CnnlabError as error:
                errors.append(str(error))
        raise CnnlabError(errors[0])
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise CnnlabError(f"{where} must be one of {', '.join(map(str, choices))}, not {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if (hint is int and isinstance(value, bool)) or not isinstance(value, hint):
        raise CnnlabError(f"{where} must be {hint.__name__}, not {type(value).__name__} {value!r}")
    return value


def load_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CnnlabError(f"{path}: config file not found")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise CnnlabError(f"{path}: not valid TOML ({error})") from None


def to_toml(config: RunConfig) -> str:
    """TOML text of a config; None values are left out, since TOML has no null."""

    def without_none(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: without_none(v) for k, v in value.items() if v is not None}
        return value

    return tomli_w.dumps(without_none(dataclasses.asdict(config)))


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge: tables merge key by key, other values replace."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
