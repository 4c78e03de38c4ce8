from __future__ import annotations

import json
import tomllib
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from cnnlab.config import load_toml, to_toml
from cnnlab.data import DataConfig, load_dataset
from cnnlab.errors import CnnlabError
from cnnlab.evaluate import evaluate
from cnnlab.models import load_model
from cnnlab.recipes import resolve_run_config
from cnnlab.train import fit, resume
from cnnlab.train.hooks import WeightAveraging
from cnnlab.train.optim import LOOKAHEAD_START_EPOCH, lookahead_decay
from cnnlab.train.reporter import LineReporter


def digits_config(out, **train):
    return resolve_run_config(
        {"data": {"dataset": "digits"}, "train": {"model": "tutorial-cnn", **train}, "out": str(out)}
    )


def test_recipes_reproduce_the_tutorial_and_flags_override_them():
    cnn = resolve_run_config({"train": {"model": "tutorial-cnn"}}).train
    assert (cnn.optim.optimizer, cnn.optim.lr, cnn.optim.adam_eps, cnn.optim.batch_size, cnn.optim.epochs) == (
        "adam",
        1e-3,
        1e-7,
        32,
        10,
    )
    mlp = resolve_run_config({"train": {"model": "tutorial-mlp"}}).train
    assert (mlp.optim.optimizer, mlp.optim.lr, mlp.optim.batch_size, mlp.optim.epochs) == ("sgd", 0.01, 32, 5)
    assert resolve_run_config({"train": {"model": "tutorial-mlp"}}, {"train": {"epochs": 2}}).train.optim.epochs == 2


@pytest.mark.parametrize(
    ("model", "recipe", "optimizer"),
    [
        ("fast-tiny", "fast70", "sgd"),
        ("fast-small", "fast70", "sgd"),
        ("fast-mid", "fast90", "muon"),
        ("fast", "fast94", "muon"),
    ],
)
def test_a_bare_model_trains_with_its_family_recipe(model, recipe, optimizer):
    config = resolve_run_config({"train": {"model": model}}).train
    assert (config.model, config.recipe, config.optim.optimizer) == (model, recipe, optimizer)
    assert config.inference.tta != "none"


def test_config_refuses_unknown_keys_and_wrong_types():
    with pytest.raises(CnnlabError, match="unknown key"):
        resolve_run_config({"train": {"learning_rate": 0.1}})
    with pytest.raises(CnnlabError, match="epochs must be float"):
        resolve_run_config({"train": {"epochs": "ten"}})


def test_tutorial_cnn_learns_digits_to_95_percent(tmp_path):
    result = fit(digits_config(tmp_path / "run"), reporter=LineReporter())
    assert result.history[-1]["test_plain_accuracy"] >= 0.95


def test_run_folder_holds_everything_and_the_model_rebuilds_from_two_files(tmp_path):
    run = tmp_path / "run"
    fit(digits_config(run, epochs=2), reporter=LineReporter())
    assert {p.name for p in run.iterdir()} >= {
        "config.toml",
        "metrics.jsonl",
        "checkpoint.pt",
        "model.safetensors",
        "model.json",
    }
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2]
    assert {
        "epoch",
        "train_loss",
        "train_accuracy",
        "test_plain_loss",
        "test_plain_accuracy",
        "lr",
        "seconds",
        "images_per_s",
    } <= set(lines[0])

    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("model.safetensors", "model.json"):
        (alone / name).write_bytes((run / name).read_bytes())
    rebuilt = load_model(alone / "model.safetensors")
    assert rebuilt.info.classes == [str(d) for d in range(10)] and rebuilt.info.input_shape == (1, 32, 32)
    dataset = load_dataset(DataConfig(dataset="digits"))
    assert evaluate(rebuilt, dataset.test).scores.delivered_accuracy == pytest.approx(
        lines[-1]["test_plain_accuracy"], abs=1e-6
    )


def test_validation_metrics_are_logged_when_a_validation_split_is_asked_for(tmp_path):
    config = resolve_run_config(
        {
            "data": {"dataset": "digits", "image_size": 12, "val_fraction": 0.1},
            "train": {"model": "tutorial-cnn", "epochs": 1},
            "out": str(tmp_path / "run"),
        }
    )
    assert {"val_plain_loss", "val_plain_accuracy"} <= set(fit(config, reporter=LineReporter()).history[0])


def test_lookahead_pulls_the_weights_every_five_steps_and_ends_on_the_average():
    """As airbench94: between averagings and at an epoch's end the weights are left as trained; the last step
    puts them on the average (copied back, the current weights not blended in)."""
    model = torch.nn.Linear(1, 1, bias=False)
    phase = SimpleNamespace(averages_weights=True, total_steps=12, lookahead=None)
    hook, average = WeightAveraging(model), None
    for step in range(1, 13):
        with torch.no_grad():
            model.weight.add_(1.0)  # a training step
        trained = model.weight.item()
        hook.after_step(SimpleNamespace(phase=phase, epoch=LOOKAHEAD_START_EPOCH, global_step=step))
        if step == 5:
            average = trained  # the average starts from the weights of the first averaging step
        elif step == 10:
            average += (trained - average) * (1 - lookahead_decay(10, 12))
        if step in (5, 10, 12):
            assert model.weight.item() == pytest.approx(average)
        else:
            assert model.weight.item() == trained
    assert average < 12.0  # the last two steps were dropped for the average


class Interrupt(Exception):
    pass


class InterruptAfter(LineReporter):
    """Simulates a crash right after an epoch's checkpoint was written."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def epoch_done(self, metrics):
        super().epoch_done(metrics)
        if metrics["epoch"] == self.epoch:
            raise Interrupt


@pytest.mark.parametrize(
    "train",
    [
        {"model": "tutorial-cnn"},
        {"model": "tutorial-mlp"},
        # the SGD speed-run recipe with every piece of state: schedule, lookahead (from epoch 4), bf16, augmentation
        # (color jitter too), sizes rising over all five epochs, 9 px to 12, and hard-example selection
        {
            **{"recipe": "airbench94", "model": "fast-tiny", "batch_size": 256, "whiten_bias_epochs": 1},
            **{"color_jitter": 0.1, "low_res": 9, "low_res_share": 1.0, "tta_below": 0.5, "select_share": 0.6},
        },
    ],
    ids=["tutorial-cnn", "tutorial-mlp", "fast"],
)
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, train):
    def config(out):
        return resolve_run_config(
            {
                "data": {"dataset": "digits", "image_size": 12},
                "train": {**train, "epochs": 5, "seed": 5},
                "out": str(out),
            }
        )

    whole = fit(config(tmp_path / "whole"), reporter=LineReporter())
    with pytest.raises(Interrupt):
        fit(config(tmp_path / "cut"), reporter=InterruptAfter(4))
    resumed = resume(tmp_path / "cut", reporter=LineReporter())

    def timeless(history):
        return [{k: v for k, v in m.items() if not k.endswith("seconds") and k != "images_per_s"} for m in history]

    assert timeless(resumed.history) == timeless(whole.history)
    a = load_file(str(tmp_path / "whole" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_resume_of_a_missing_folder_or_into_an_existing_run_is_refused(tmp_path):
    with pytest.raises(CnnlabError, match="no such run folder"):
        resume(tmp_path / "nothing")
    fit(
        digits_config(
            tmp_path / "run",
            epochs=1,
        ),
        reporter=LineReporter(),
    )
    with pytest.raises(CnnlabError, match="already holds a run"):
        fit(digits_config(tmp_path / "run", epochs=1), reporter=LineReporter())


def test_patience_in_the_image_loop_keeps_the_epoch_with_the_best_validation_loss(tmp_path):
    config = digits_config(tmp_path / "run", epochs=6, patience=2, lr=0.02)  # a high rate, so val loss wavers
    result = fit(config, reporter=LineReporter())
    info = load_model(tmp_path / "run").info
    losses = [metrics["val_plain_loss"] for metrics in result.history]
    best = info.metrics["best_epoch"]
    assert losses[best - 1] == min(losses) and info.metrics == result.history[best - 1] | {"best_epoch": best}
    kept = evaluate(load_model(tmp_path / "run"), result.dataset.test).scores.plain_accuracy
    assert kept == pytest.approx(result.history[best - 1]["test_plain_accuracy"])


def test_config_is_in_sections_and_a_flat_train_table_is_read_into_them(tmp_path):
    flat = tmp_path / "flat.toml"  # the form config files had before the sections, and flags and recipes still use
    flat.write_text('[train]\nmodel = "fast-tiny"\nlr = 0.3\ntta = "flip"\nseed = 4\nwhiten_bias_epochs = 2\n')
    nested = tmp_path / "nested.toml"
    nested.write_text(
        '[train]\nmodel = "fast-tiny"\n[train.optim]\nlr = 0.3\n[train.inference]\ntta = "flip"\n'
        "[train.system]\nseed = 4\n[train.family]\nwhiten_bias_epochs = 2\n"
    )
    a, b = (resolve_run_config(load_toml(path)) for path in (flat, nested))
    assert a == b and (a.train.optim.lr, a.train.inference.tta, a.train.system.seed) == (0.3, "flip", 4)
    assert a.train.family == {"whiten_bias_epochs": 2} and a.train.optim.optimizer == "sgd"  # fast70's, by sections
    assert resolve_run_config(tomllib.loads(to_toml(a))) == a  # written by sections, read back the same
    with pytest.raises(CnnlabError, match=r"train.family \(tutorial-cnn\): unknown key\(s\) whiten_bias_epochs"):
        resolve_run_config({"train": {"model": "tutorial-cnn", "whiten_bias_epochs": 2}})
    # A recipe's family settings stay with its family: fast70's whitening setting is not the tutorial CNN's.
    assert resolve_run_config({"train": {"recipe": "fast70", "model": "tutorial-cnn"}}).train.family == {}
