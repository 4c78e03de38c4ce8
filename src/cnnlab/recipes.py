"""Named training recipes: the TrainConfig values that reproduce a published result.

A recipe only sets defaults; a TOML file and CLI flags override any of its values. When only a model
is named, its registered default recipe applies (the fast nets train with their speed-run recipe).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from cnnlab.config import SECTIONS, RunConfig, TrainConfig, build, merge, sectioned
from cnnlab.errors import CnnlabError
from cnnlab.models import model_spec

# The speed-run recipes follow airbench94's training, restated for PyTorch's batch-mean loss: its
# "lr 11.5 per 1024 examples" with Nesterov momentum 0.85 is lr 1.5 at batch 1024 (scaled linearly with
# the batch), and its decay of 0.2% of each weight per step is weight_decay 0.00133 at that lr.
_SPEED_RUN: dict[str, Any] = {
    "optimizer": "sgd",
    "momentum": 0.85,
    "nesterov": True,
    "weight_decay": 0.00133,
    "schedule": "triangle",
    "peak_fraction": 0.23,
    "lr_start": 0.2,
    "lr_end": 0.07,
    "label_smoothing": 0.2,
    "bias_lr_scale": 64.0,
    "lookahead": True,
    "whiten_bias_epochs": 3,
    "normalize": "standardize",
    "flip": "alternating",
    "translate": 2,
    "tta": "flip-translate",
}

# airbench94_muon's training (Jordan, 2024): Muon for the convolution filters (its orthogonalised update
# needs no batch scaling), Nesterov SGD for the head and BatchNorm biases, batch 2000, a linear decay from
# the first step and no weight averaging. Its head is parametrised as weight / 256 with unit-std weights;
# ours is weight / 9 with uniform(±1/16) weights: the same initial function, so its head learning rate
# 0.67 per example (summed loss) becomes 0.67 * 2000 * (9/256)**2 = 1.656 here, and its decay of 0.4% of
# each weight per step is weight_decay 0.004 / 1.656.
_MUON_RUN: dict[str, Any] = {
    **_SPEED_RUN,
    "optimizer": "muon",
    "muon_lr": 0.24,
    "muon_momentum": 0.6,
    "lr": 1.656,
    "weight_decay": 0.002415,
    "batch_size": 2000,
    "peak_fraction": 0.0,
    "lr_start": 1.0,
    "lr_end": 0.0,
    "lookahead": False,
    # Training the whitening bias makes the first block compute its input gradient: a few % more time.
    "whiten_bias_epochs": 0,
}

RECIPES: dict[str, dict[str, Any]] = {
    # The Keras tutorial's MLP: SGD with Keras' default learning rate, 5 epochs (~47-49% on CIFAR-10). The
    # tutorial models train in fp32, as Keras does, so that they reproduce its figures on every machine.
    "tutorial-mlp": {
        "model": "tutorial-mlp",
        "optimizer": "sgd",
        "lr": 0.01,
        "batch_size": 32,
        "epochs": 5,
        "precision": "fp32",
    },
    # The Keras tutorial's CNN: Adam with Keras' defaults, 10 epochs (~70% on CIFAR-10).
    "tutorial-cnn": {
        "model": "tutorial-cnn",
        "optimizer": "adam",
        "lr": 1e-3,
        "adam_eps": 1e-7,
        "batch_size": 32,
        "epochs": 10,
        "precision": "fp32",
    },
    # Toward 70% in seconds: the thin net with the linear stem (its first convolution reads the 12 whitened
    # directions, not 24 signed GELUs of them) for three quarters of an epoch in small batches (more steps for
    # the same FLOPs), seen small at first (progressive resizing: early steps cost a fraction of a full-size
    # one), unshifted (translation only slows a run this short), a frozen whitening bias (training it makes the
    # first block compute its input gradient), and flip TTA only for the images it is unsure of. BENCHMARKS.md
    # has what each choice is worth.
    "fast70": {
        **_SPEED_RUN,
        "model": "fast-tiny-linear",
        "batch_size": 128,
        "lr": 0.35,
        "epochs": 0.75,
        "lookahead": False,
        "whiten_bias_epochs": 0,
        "translate": 0,
        "low_res": 20,
        "low_res_share": 0.67,
        "tta": "flip",
        "tta_below": 0.5,
    },
    # Toward 90%: Muon on a narrower middle block, seen at 20 px rising to 32 over the first half of the steps,
    # five epochs of the two thirds of the images with the highest losses (the cost of 3.4 full epochs), the
    # test-time views only for the images it is unsure of, and batch 1500.
    "fast90": {
        **_MUON_RUN,
        "model": "fast-mid",
        "epochs": 5,
        "select_share": 0.67,
        "batch_size": 1500,
        "lr": 1.656 * 0.75,
        "low_res": 20,
        "low_res_share": 0.5,
        "tta_below": 0.7,
    },
    # airbench94's network with Muon (named for the 94% that network reaches on the original CIFAR-10), ten
    # epochs of the two thirds of the images with the highest losses, the first half of the steps at 28 px
    # (a 28 px step costs about three quarters of a full-size one; over more of the steps it costs accuracy),
    # and the test-time views only for the images it is unsure of. Batch 1000: more steps for the same images,
    # and a smaller batch's fresh tensors cost less to allocate; the SGD learning rates follow the batch
    # linearly, Muon's needs no scaling.
    "fast94": {
        **_MUON_RUN,
        "model": "fast",
        "epochs": 10,
        "select_share": 0.67,
        "batch_size": 1000,
        "lr": 1.656 * 0.5,
        "low_res": 28,
        "low_res_share": 0.5,
        "tta_below": 0.7,
    },
    # Fine-tuning a pretrained network on photos, fast on a CPU: its body runs once per image, then the
    # classifier trains on those features (Adam, label smoothing); a validation split (10% of train when the
    # data has none) stops it after 5 epochs without improvement, keeping the best epoch.
    "finetune": {
        "model": "efficientnet-lite0",
        "head_only": True,
        "optimizer": "adam",
        "lr": 3e-3,
        "adam_eps": 1e-8,
        "weight_decay": 1e-4,
        "batch_size": 64,
        "epochs": 60,
        "schedule": "constant",
        "label_smoothing": 0.1,
        "patience": 8,
        "flip": "random",  # for --unfreeze-epochs: the whole network then sees the images themselves
    },
    # airbench94's own recipe (Nesterov SGD, triangular schedule, lookahead), kept to compare against.
    "airbench94": {**_SPEED_RUN, "model": "fast", "batch_size": 1024, "lr": 1.5, "epochs": 10},
}


def recipe_values(name: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise CnnlabError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def resolve_run_config(*layers: dict[str, Any]) -> RunConfig:
    """Merge config layers (later wins) over the recipe they name, or the recipe named like their model."""
    layered: dict[str, Any] = {}
    for layer in layers:  # each [train] by sections first, so that a flat key and its section's merge as one
        layered = merge(layered, {**layer, "train": sectioned(layer["train"])} if "train" in layer else layer)
    train = layered.get("train", {})
    name = train.get("recipe") or model_spec(train.get("model", TrainConfig.model)).default_recipe
    recipe = {"train": sectioned({**recipe_values(name), "recipe": name})} if name else {}
    # A recipe's family settings are for the model it names; another family's model takes its other settings.
    model = model_spec(train.get("model") or recipe.get("train", {}).get("model", TrainConfig.model))
    takes = {field.name for field in dataclasses.fields(model.settings)}
    if "family" in recipe.get("train", {}):
        recipe["train"]["family"] = {key: value for key, value in recipe["train"]["family"].items() if key in takes}
    config = build(RunConfig, merge(recipe, layered), "config")
    model.family_settings(config.train.family)  # refuses keys the family does not take
    # Photos are brought to the size the model is made for, not to the most common photo size.
    input_size = model_spec(config.train.model).input_size
    if config.data.data and config.data.image_size is None and input_size is not None:
        config.data.image_size = input_size
    return config


Source = Literal["recipe", "default", "family"]  # the recipe's own value, the config's default, the family's


@dataclass(frozen=True)
class RecipeValue:
    key: str  # as a config file has it: "train.optim.lr"
    value: Any
    source: Source


def recipe_explained(name: str) -> list[RecipeValue]:
    """Every value recipe `name` trains with, and where it comes from: the recipe (with the settings it shares
    with other recipes), the config's defaults, or the model family's own defaults."""
    train = resolve_run_config({"train": {"recipe": name}}).train
    given = sectioned(recipe_values(name))
    values = [RecipeValue("train.model", train.model, "recipe")]
    for section in SECTIONS:
        chosen = given.get(section, {})
        for field in dataclasses.fields(getattr(train, section)):
            source: Source = "recipe" if field.name in chosen else "default"
            values.append(
                RecipeValue(f"train.{section}.{field.name}", getattr(train.__dict__[section], field.name), source)
            )
    family = model_spec(train.model).family_settings(train.family)
    for field in dataclasses.fields(family):
        origin: Source = "recipe" if field.name in train.family else "family"
        values.append(RecipeValue(f"train.family.{field.name}", getattr(family, field.name), origin))
    return values
