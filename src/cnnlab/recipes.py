"""Named training recipes: the TrainConfig values that reproduce a published result.

A recipe only sets defaults; a TOML file and CLI flags override any of its values. When only a model
is named, the recipe of the same name (if there is one) applies.
"""

from __future__ import annotations

from typing import Any

from cnnlab.config import RunConfig, TrainConfig, build, merge
from cnnlab.errors import CnnlabError

RECIPES: dict[str, dict[str, Any]] = {
    # The Keras tutorial's MLP: SGD with Keras' default learning rate, 5 epochs (~47-49% on CIFAR-10).
    "tutorial-mlp": {"model": "tutorial-mlp", "optimizer": "sgd", "lr": 0.01, "batch_size": 32, "epochs": 5},
    # The Keras tutorial's CNN: Adam with Keras' defaults, 10 epochs (~70% on CIFAR-10).
    "tutorial-cnn": {
        "model": "tutorial-cnn",
        "optimizer": "adam",
        "lr": 1e-3,
        "adam_eps": 1e-7,
        "batch_size": 32,
        "epochs": 10,
    },
}


def recipe_values(name: str) -> dict[str, Any]:
    if name not in RECIPES:
        raise CnnlabError(f"unknown recipe {name!r}; known recipes: {', '.join(sorted(RECIPES))}")
    return RECIPES[name]


def resolve_run_config(*layers: dict[str, Any]) -> RunConfig:
    """Merge config layers (later wins) over the recipe they name, or the recipe named like their model."""
    layered: dict[str, Any] = {}
    for layer in layers:
        layered = merge(layered, layer)
    train = layered.get("train", {})
    name = train.get("recipe") or train.get("model", TrainConfig.model)
    if train.get("recipe") is None and name not in RECIPES:
        return build(RunConfig, layered, "config")
    recipe = {"train": {**recipe_values(name), "recipe": name}}
    return build(RunConfig, merge(recipe, layered), "config")
