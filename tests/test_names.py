"""One name for each score in every file cnnlab writes, the previous release's files still read, a run's phases
planned from its config, and a recipe's every value with where it comes from."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.models import load_model
from cnnlab.models.inference import Scores
from cnnlab.recipes import recipe_explained, resolve_run_config
from cnnlab.run_dir import metrics_in_current_names
from cnnlab.serve.app import create_app
from cnnlab.train.plan import PhasePlan, plan_phases
from tests.conftest import write_image_folder

runner = CliRunner()

# How the release before this one named a split's scores and the training accuracy.
PREVIOUS_NAMES = {
    "train_accuracy": "train_acc",
    "test_plain_loss": "test_loss",
    "test_plain_accuracy": "test_acc",
    "test_delivered_accuracy": "test_delivered_acc",
}


def as_previous_release(line: dict) -> dict:
    return {PREVIOUS_NAMES.get(key, key): value for key, value in line.items()}


@pytest.fixture(scope="module")
def previous_release_run(trained_run, tmp_path_factory):
    """The trained digits run, its files rewritten as the previous release wrote them: the old score names in
    metrics.jsonl and model.json, and model.json's `tta` and `tta_below` beside its other keys."""
    run = tmp_path_factory.mktemp("old") / "runs" / "digits-cnn"
    shutil.copytree(trained_run, run)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(as_previous_release(line)) + "\n" for line in lines))
    info = json.loads((run / "model.json").read_text())
    inference = info.pop("inference")
    info |= {"metrics": as_previous_release(info["metrics"]), **inference}
    (run / "model.json").write_text(json.dumps(info))
    return run


def test_every_file_names_the_delivered_and_plain_accuracy_alike(trained_run):
    recorded = Scores.from_metrics(load_model(trained_run).info.metrics, "test")
    assert recorded is not None
    line = json.loads((trained_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"train_accuracy", "test_plain_accuracy", "test_delivered_accuracy"} <= set(line)
    assert not {key for key in line if key.endswith("_acc") or key == "accuracy"}
    evaluated = json.loads(runner.invoke(app, ["evaluate", str(trained_run), "--json"]).stdout)
    listed = json.loads(runner.invoke(app, ["runs", str(trained_run), "--json"]).stdout)[0]
    described = TestClient(create_app(load_model(trained_run))).get("/model").json()
    assert evaluated["delivered_accuracy"] == pytest.approx(recorded.delivered_accuracy, abs=1e-6)
    assert listed["delivered_accuracy"] == described["test_delivered_accuracy"] == recorded.delivered_accuracy
    assert listed["plain_accuracy"] == described["test_plain_accuracy"] == recorded.plain_accuracy
    assert "accuracy" not in evaluated and "test_accuracy" not in described


def test_a_run_folder_of_the_previous_release_evaluates_predicts_serves_and_lists(previous_release_run, tmp_path):
    run = previous_release_run
    listed = runner.invoke(app, ["runs", str(run.parent), "--json"])
    assert listed.exit_code == 0, listed.output
    (row,) = json.loads(listed.stdout)
    model = load_model(run)
    assert model.info.inference.tta == "none" and model.info.metrics["test_plain_accuracy"] == row["plain_accuracy"]
    assert row["delivered_accuracy"] == model.info.metrics["test_delivered_accuracy"] > 0.5
    evaluated = runner.invoke(app, ["evaluate", str(run), "--json"])
    assert evaluated.exit_code == 0 and json.loads(evaluated.stdout)["delivered_accuracy"] > 0.5, evaluated.output
    write_image_folder(tmp_path / "images", per_class=2, size=12, split=False)
    predicted = runner.invoke(app, ["predict", str(run), str(tmp_path / "images"), "--json"])
    assert predicted.exit_code == 0, predicted.output
    assert TestClient(create_app(model)).get("/model").json()["test_delivered_accuracy"] == row["delivered_accuracy"]


def test_metrics_lines_of_the_oldest_release_are_read_with_the_models_views():
    oldest = {"epoch": 1, "test_loss": 0.5, "test_acc": 0.8, "test_acc_tta": 0.85, "train_acc": 0.7}
    current = metrics_in_current_names(oldest, tta="flip")
    scores = Scores.from_metrics(current, "test")
    assert scores is not None and (scores.tta, scores.plain_accuracy, scores.delivered_accuracy) == ("flip", 0.8, 0.85)
    assert current["train_accuracy"] == 0.7 and scores.tta_share == 1.0
    without_tta = Scores.from_metrics(metrics_in_current_names({"test_loss": 0.5, "test_acc": 0.8}), "test")
    assert without_tta == Scores("none", 0.5, 0.8, 0.5, 0.8, 0.0)


@pytest.mark.parametrize(
    ("train", "plan"),
    [
        ({"recipe": "fast94"}, [PhasePlan("images", 10)]),
        ({"recipe": "finetune"}, [PhasePlan("head", 60)]),
        ({"recipe": "finetune", "unfreeze_epochs": 2.5}, [PhasePlan("head", 60), PhasePlan("unfreeze", 2.5)]),
    ],
)
def test_a_runs_phases_are_planned_from_its_config_before_it_trains(train, plan):
    assert plan_phases(resolve_run_config({"train": train}).train) == plan


def test_a_recipe_shows_every_value_it_trains_with_and_where_it_comes_from():
    values = {value.key: value for value in recipe_explained("fast94")}
    assert (values["train.optim.lr"].value, values["train.optim.lr"].source) == (0.828, "recipe")
    assert (values["train.optim.patience"].value, values["train.optim.patience"].source) == (0, "default")
    assert values["train.family.whiten_bias_epochs"].source == "recipe"  # the Muon recipes freeze it
    assert values["train.optim.momentum"].source == "recipe"  # shared by the speed-run recipes
    finetune = {value.key: value.source for value in recipe_explained("finetune")}
    assert finetune["train.optim.patience"] == "recipe" and finetune["train.system.seed"] == "default"
    shown = runner.invoke(app, ["recipes", "fast94"])
    assert shown.exit_code == 0 and "train.optim.select_share" in shown.output and "0.67" in shown.output
    listed = runner.invoke(app, ["recipes"])
    assert all(name in listed.output for name in ("tutorial-cnn", "fast70", "fast94", "finetune"))
    unknown = runner.invoke(app, ["recipes", "fast99"])
    assert unknown.exit_code == 2 and unknown.output.startswith("error: unknown recipe 'fast99'")
