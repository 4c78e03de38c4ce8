"""Typed configuration that flows top-down: DataConfig and TrainConfig, bundled in RunConfig.

TrainConfig names the model and holds the rest in sections, each read by the component it is named for:
`optim` (cnnlab.train.optim and the engine), `augment` (the batch loader), `inference` (evaluation and
prediction), `finetune` (the head and unfreeze phases), `system` (device, precision, checkpoints), and
`family`, the model family's own settings, which that family checks (`ModelSpec.settings`). Every setting's name
is unique, so flags, recipes and older config files give them flat under [train] (`sectioned`).

Values are resolved in one order: dataclass defaults < the model's recipe < a TOML file < CLI flags.
The resolved RunConfig is saved as `config.toml` in every run folder.
"""

from __future__ import annotations

import dataclasses
import operator
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import tomli_w

from cnnlab.errors import CnnlabError, ConfigError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


def setting(
    default: Any,
    help: str,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    at_most: float | None = None,
) -> Any:
    """A config field with its help text and the range of its values, said once: the CLI's flags and their
    help are built from it, and `check_ranges` refuses a value outside the range before anything runs."""
    bounds = {"above": above, "at_least": at_least, "below": below, "at_most": at_most}
    return field(default=default, metadata={"help": help, **{k: v for k, v in bounds.items() if v is not None}})


# A bound's name in `setting`: the comparison a value must pass against it, and how a message says it.
_BOUNDS: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "above": (operator.gt, "more than"),
    "at_least": (operator.ge, "at least"),
    "below": (operator.lt, "less than"),
    "at_most": (operator.le, "at most"),
}


def check_ranges(config: DataclassInstance, section: str) -> None:
    """Refuse, in one line naming the key, a value outside the range its field declares (None is unset)."""
    for item in dataclasses.fields(config):
        value = getattr(config, item.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_ranges(value, section or item.name)  # a section's keys are named train.key, as flat [train] has them
            continue
        if value is None:
            continue
        bounds = [(holds, words, item.metadata[key]) for key, (holds, words) in _BOUNDS.items() if key in item.metadata]
        if not all(holds(value, bound) for holds, _, bound in bounds):
            key = f"{section}.{item.name}" if section else item.name
            wanted = " and ".join(f"{words} {bound:g}" for _, words, bound in bounds)
            raise ConfigError(f"{key} must be {wanted}, not {value:g}", key)


@dataclass
class DataConfig:
    dataset: str | None = setting(None, "Named dataset: digits, cifar10 or cifar100.")
    data: str | None = setting(None, "Image folder, .tar.gz/.zip of one, or a CIFAR archive.")
    labels: str | None = setting(None, "Label file of the images in data: .csv, .tsv, .json or .jsonl (see README).")
    path_column: str | None = setting(None, "The label file's column of image paths (default: found by its name).")
    label_column: str | None = setting(None, "The label file's column of labels (default: found by its name).")
    class_names: str | None = setting(None, "Names for a label file's labels, as 1=cat,2=dog (else labels are names).")
    multi_label: bool = setting(False, "A sigmoid per class, as when an image has other than one label (chosen then).")
    image_size: int | None = setting(None, "Resize images to this many pixels a side (default: as stored).", at_least=1)
    val_fraction: float = setting(
        0.0,
        "Share of train held out for validation, stratified (0 to 1); 0: none, or 0.1 when train.patience needs "
        "one and the data has none.",
        at_least=0,
        below=1,
    )
    test_fraction: float = setting(0.2, "Test share when the data has no test split (0 to 1).", above=0, below=1)
    split_seed: int = setting(0, "Seed of the validation/test splits, independent of the training seed.")
    cache_dir: str | None = setting(None, "Cache folder (default $CNNLAB_CACHE or ~/.cache/cnnlab).")
    strict: bool = setting(False, "Unreadable images are an error instead of being skipped.")
    exclude: str | None = setting(
        None,
        "Train without the images a `cnnlab doctor` report flagged: doctor.json, or doctor.json:KIND,KIND (label, "
        "duplicate, leak, outlier, odd; default all). Train and validation images leave; the test split stays whole.",
    )

    @property
    def label(self) -> str:
        """A short name for run folders: the dataset name or the data path's stem."""
        name = self.dataset or Path(self.data or "data").name
        for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
            name = name.removesuffix(suffix)
        return name or "data"


@dataclass
class OptimConfig:
    """The optimizer, its learning-rate schedule, the loss and how long training lasts (`train.optim`)."""

    optimizer: Literal["sgd", "adam", "muon"] = setting(
        "adam", "muon: orthogonalised updates for conv filters, Nesterov SGD for the rest."
    )
    lr: float = setting(1e-3, "Peak learning rate per step, for the batch-mean loss.", above=0)
    momentum: float = setting(0.0, "SGD and muon: momentum of the other parameters.", at_least=0, below=1)
    nesterov: bool = setting(False, "SGD and muon: Nesterov momentum.")
    weight_decay: float = setting(0.0, "L2 weight decay added to the gradient (torch's coupled form).", at_least=0)
    adam_eps: float = setting(1e-7, "Adam epsilon (Keras' default, not torch's 1e-8).", above=0)
    muon_lr: float = setting(
        0.24, "Muon: the conv filters' learning rate (orthogonal update: no batch scaling).", above=0
    )
    muon_momentum: float = setting(0.6, "Muon: the conv filters' Nesterov momentum.", at_least=0, below=1)
    batch_size: int = setting(32, "Images per step, across all processes (the global batch).", at_least=1)
    epochs: float = setting(
        10, "Epochs; a fraction trains part of the last one, the schedule spanning exactly that.", above=0
    )
    schedule: Literal["constant", "triangle"] = setting(
        "constant", "triangle: linear from lr*lr_start up to lr at peak_fraction of the steps, then down to lr*lr_end."
    )
    peak_fraction: float = setting(0.23, "Triangle: share of all steps before the peak.", at_least=0, at_most=1)
    lr_start: float = setting(0.2, "Triangle: first learning rate, as a share of --lr.", at_least=0)
    lr_end: float = setting(0.07, "Triangle: last learning rate, as a share of --lr.", at_least=0)
    label_smoothing: float = setting(0.0, "Label smoothing of the cross-entropy loss (0 to 1).", at_least=0, below=1)
    class_weights: Literal["none", "auto"] = setting(
        "none", "auto: weigh each class's loss by (train images) / (classes x its train images), for unbalanced data."
    )
    bias_lr_scale: float = setting(
        1.0, "BatchNorm biases learn this many times faster, with the same decay per step.", above=0
    )
    lookahead: bool = setting(
        False, "Average weights into an EMA every 5 steps from epoch 4, copied back each time; training ends on it."
    )
    select_share: float = setting(
        1.0,
        "Hard-example selection: each epoch trains on this share of the train split, the images with the highest "
        "loss when last trained on (unseen ones first); 1: all.",
        above=0,
        at_most=1,
    )
    patience: int = setting(
        0,
        "Stop after this many epochs without a better validation loss, keeping the best epoch; 0: never.",
        at_least=0,
    )


@dataclass
class AugmentConfig:
    """How training images are normalised and augmented (`train.augment`)."""

    normalize: Literal["unit", "standardize"] = setting(
        "unit", "unit: pixels on [0, 1]; standardize: per-channel mean 0, std 1 (from a sample of train)."
    )
    flip: Literal["none", "random", "alternating"] = setting(
        "none", "Mirroring: random, or alternating (each image flips every other epoch)."
    )
    translate: int = setting(0, "Random shift by up to this many pixels, reflect-padded.", at_least=0)
    crop_area: float = setting(
        1.0,
        "Random-resized crops: each image cut to a random share of its area from this up to 1, resized back.",
        above=0,
        at_most=1,
    )
    color_jitter: float = setting(
        0.0,
        "Random brightness shift (in standard deviations) and contrast scale (1 +/- this) per image, up to this.",
        at_least=0,
    )
    low_res: int = setting(
        0,
        "Progressive resizing: the first steps see images downscaled to this many pixels (shorter side); 0: off.",
        at_least=0,
    )
    low_res_share: float = setting(
        0.5,
        "Progressive resizing: the share of the steps over which the size rises linearly to full, in 4 px steps.",
        above=0,
        at_most=1,
    )


@dataclass(frozen=True)
class InferenceConfig:
    """How the model answers: its test-time augmentation (`train.inference`), kept with the model."""

    tta: Literal["none", "flip", "flip-translate"] = setting("none", "Test-time views averaged at evaluation.")
    tta_below: float = setting(
        1.0,
        "Selective TTA: only images whose plain top-class probability is below this get the views; 1: all.",
        above=0,
        at_most=1,
    )


@dataclass
class FinetuneConfig:
    """Fine-tuning a pretrained model: its head alone, then the whole network (`train.finetune`)."""

    head_only: bool = setting(
        False, "Train only the classifier, on features the frozen pretrained body computes once per image."
    )
    unfreeze_epochs: float = setting(
        0,
        "After head_only: train the whole network this many epochs, BatchNorm statistics frozen (triangle schedule).",
        at_least=0,
    )
    unfreeze_lr: float = setting(1e-4, "Unfreeze phase: peak learning rate of the last layers.", above=0)
    layer_lr_ratio: float = setting(
        0.01,
        "Unfreeze phase: the first layer's learning rate as a share of the last's, rising geometrically.",
        above=0,
        at_most=1,
    )


@dataclass
class SystemConfig:
    """Where and how the run computes, and what it keeps on the way (`train.system`)."""

    seed: int = setting(0, "Seed of weight init, data order and augmentation.")
    device: str = setting("auto", "auto (cuda when present, else cpu), cpu or cuda.")
    precision: Literal["auto", "fp32", "bf16"] = setting(
        "auto", "bf16 autocast for convolutions and matmuls; auto: bf16 where this machine has it natively."
    )
    compile: bool = setting(False, "torch.compile the training forward (its first steps pay for compiling).")
    loader: Literal["auto", "memory", "disk"] = setting(
        "auto",
        "Where training batches come from: memory, or a uint8 .npy in the cache read batch by batch; auto: disk "
        "for an image folder larger than a quarter of this machine's memory.",
    )
    checkpoint_every: int = setting(0, "Steps between mid-epoch checkpoints (and one at each epoch's end).", at_least=0)
    log: Literal["none", "tensorboard", "mlflow", "tensorboard,mlflow"] = setting(
        "none", "Also log the run to TensorBoard (event files in the run folder) and/or MLflow ($MLFLOW_TRACKING_URI)."
    )
    sync_bn: bool = setting(False, "Distributed runs: BatchNorm statistics over the global batch, not each shard.")


@dataclass
class TrainConfig:
    """What to train and how, in sections, each read by the component it names; `family` holds the settings of
    the model's family (see `cnnlab models`), checked by that family."""

    model: str = setting("tutorial-cnn", "Model name; see `cnnlab models`.")
    recipe: str | None = setting(None, "Training recipe (default: the model's own).")
    weights: str | None = setting(
        None, "Start from this safetensors file's weights (a classifier of another size is left out)."
    )
    family: dict[str, Any] = field(default_factory=dict, metadata={"help": "The model family's own settings."})
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    system: SystemConfig = field(default_factory=SystemConfig)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    out: str | None = setting(None, "Run folder (default runs/<model>-<data>-<time>).")

    def check(self) -> None:
        """Refuse settings out of range, before anything is loaded or allocated."""
        check_ranges(self, "")


@dataclass
class DoctorConfig:
    """How `cnnlab doctor` examines a dataset."""

    folds: int = setting(3, "Folds of the cross-validation giving each image out-of-sample probabilities.", at_least=2)
    label_model: Literal["auto", "embeddings", "training", "both"] = setting(
        "auto",
        "What gives those probabilities: a linear model on pretrained embeddings, K-fold trainings of the strongest "
        "recipe the budget allows, or both (pooled, weighted to agree most with the given labels); auto: both "
        "where a recipe takes the images, else embeddings.",
    )
    budget: float = setting(15.0, "Minutes for the examination; the trainings get what the other steps leave.", above=0)
    seed: int = setting(0, "Seed of the folds, the trainings and the calibration sample.")
    run: str | None = setting(None, "A run folder whose test accuracy is reported with and without leaked images.")


SECTIONS: dict[str, type[DataclassInstance]] = {
    "optim": OptimConfig,
    "augment": AugmentConfig,
    "inference": InferenceConfig,
    "finetune": FinetuneConfig,
    "system": SystemConfig,
}
SECTION_OF = {key.name: name for name, section in SECTIONS.items() for key in dataclasses.fields(section)}
TOP_LEVEL = ("model", "recipe", "weights", "family", *SECTIONS)


def sectioned(train: dict[str, Any]) -> dict[str, Any]:
    """A [train] table with each setting in its section. The flat form, every key directly under [train] (as
    recipes, flags and config files written before the sections have it), is read by each key's section; a key
    of no section is the model family's (`family`), which its family checks."""
    tables: dict[str, Any] = {name: dict(train.get(name, {})) for name in ("family", *SECTIONS) if name in train}
    flat = {key: value for key, value in train.items() if key not in TOP_LEVEL}
    for key, value in flat.items():
        tables.setdefault(SECTION_OF.get(key, "family"), {})[key] = value
    return {key: value for key, value in train.items() if key in ("model", "recipe", "weights")} | tables


def build(cls: type[T], values: dict[str, Any], where: str) -> T:
    """Make dataclass `cls` from `values`, refusing unknown keys and values of the wrong type (a flat [train]
    table is read by sections first: see `sectioned`)."""
    if cls is TrainConfig:
        values = sectioned(values)
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CnnlabError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
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
    if origin is dict:
        if not isinstance(value, dict):
            raise CnnlabError(f"{where} must be a table, not {type(value).__name__} {value!r}")
        return dict(value)
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
