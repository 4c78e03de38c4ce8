"""Multi-label data end to end: read from each label-file shape, carved so every label reaches every split, trained
with a sigmoid per class, decided at thresholds chosen on validation, scored as scikit-learn scores label sets, and
answered by evaluate, predict, serve, export and the report."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import accuracy_score, average_precision_score, f1_score, hamming_loss
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.compare import ComparisonRow, comparison_markdown
from cnnlab.data import DataConfig, load_dataset
from cnnlab.data.stratify import iterative_stratification
from cnnlab.doctor.labels import label_set_issues
from cnnlab.errors import ConfigError
from cnnlab.models import load_model
from cnnlab.models.inference import Logits, Scores, averaged_views, scores_of_splits
from cnnlab.models.label_sets import UNCHOSEN, choose_thresholds
from cnnlab.tracking.catalog import find_runs
from cnnlab.train.parts import ClassificationLoss, loss_weights
from tests.conftest import served

COLOURS = ("blue", "green", "red")  # the classes, as label files give them: sorted
SIZE = 16


def scene(labels: tuple[int, ...], seed: int) -> np.ndarray:
    """A 16x16 image on dark noise with a bright bar of colour k, in a place of its own, for each label k."""
    image = np.random.default_rng(seed).integers(0, 50, (SIZE, SIZE, 3), dtype=np.uint8)
    for k in labels:
        image[:, 5 * k : 5 * k + 4, k] = 255
    return image


def label_sets(count: int, seed: int = 0) -> list[tuple[int, ...]]:
    """Seeded label sets of 0 to 3 of the colours, most with one."""
    rng = np.random.default_rng(seed)
    sets = []
    for _ in range(count):
        size = rng.choice([0, 1, 1, 1, 2, 2, 3])
        sets.append(tuple(sorted(rng.choice(3, size, replace=False).tolist())))
    return sets


def write_scenes(folder, count=90, seed=0):
    """Images 0.png .. in `folder`, and their label sets."""
    folder.mkdir(parents=True, exist_ok=True)
    sets = label_sets(count, seed)
    for i, labels in enumerate(sets):
        Image.fromarray(scene(labels, seed * 1000 + i)).save(folder / f"{i}.png")
    return sets


def shapes(sets):
    """The same labels in four label-file shapes."""
    names = [[COLOURS[k] for k in labels] for labels in sets]
    one_hot = (
        "file,"
        + ",".join(COLOURS)
        + "\n"
        + "".join(
            f"{i}.png," + ",".join("1" if k in labels else "0" for k in range(3)) + "\n"
            for i, labels in enumerate(sets)
        )
    )
    in_cells = "image,tags\n" + "".join(f'{i}.png,"{" ".join(n)}"\n' for i, n in enumerate(names))
    # The long form cannot say "none of them": those images are in a row with an empty label.
    long_form = "path,label\n" + "".join(
        "".join(f"{i}.png,{name}\n" for name in n) or f"{i}.png,\n" for i, n in enumerate(names)
    )
    as_json = json.dumps({f"{i}.png": n for i, n in enumerate(names)})
    return {"one_hot.csv": one_hot, "cells.csv": in_cells, "long.csv": long_form, "labels.json": as_json}


@pytest.fixture(scope="session")
def scenes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scenes")
    sets = write_scenes(root / "images")
    for name, text in shapes(sets).items():
        (root / name).write_text(text)
    return root, sets


def test_every_label_file_shape_gives_the_same_multi_hot_labels_and_says_so(scenes):
    root, sets = scenes
    loaded = {
        name: load_dataset(DataConfig(data=str(root / "images"), labels=str(root / name), split_seed=1))
        for name in ("one_hot.csv", "cells.csv", "long.csv", "labels.json")
    }
    first = loaded["one_hot.csv"]
    assert first.multi_label and first.classes == COLOURS and first.train.labels.dtype == np.uint8
    expected = {f"{i}.png": [int(k in labels) for k in range(3)] for i, labels in enumerate(sets)}
    for dataset in loaded.values():
        for split in dataset.splits().values():
            assert split.labels.shape == (len(split), 3)
            assert {name: row.tolist() for name, row in zip(split.names, split.labels, strict=True)} == {
                name: expected[name] for name in split.names
            }
        assert np.array_equal(dataset.test.names, first.test.names)  # the same carve from every shape
    assert "multi-label" in first.layout and "multi-label: a sigmoid per class" in "\n".join(first.summary())


def test_multi_label_asked_for_makes_single_labels_sets_of_one(tmp_path):
    sets = [(i % 3,) for i in range(30)]
    folder = tmp_path / "images"
    write_scenes(folder, 0)
    for i, labels in enumerate(sets):
        Image.fromarray(scene(labels, i)).save(folder / f"{i}.png")
    (tmp_path / "l.csv").write_text("path,label\n" + "".join(f"{i}.png,{COLOURS[s[0]]}\n" for i, s in enumerate(sets)))
    single = load_dataset(DataConfig(data=str(folder), labels=str(tmp_path / "l.csv")))
    multi = load_dataset(DataConfig(data=str(folder), labels=str(tmp_path / "l.csv"), multi_label=True))
    assert not single.multi_label and multi.multi_label
    assert np.array_equal(np.eye(3, dtype=np.uint8)[single.train.labels], multi.train.labels)


def test_iterative_stratification_brings_every_rare_label_into_the_held_out_part():
    rng = np.random.default_rng(0)
    targets = (rng.random((400, 6)) < [0.5, 0.3, 0.2, 0.1, 0.02, 0.01]).astype(np.uint8)
    held = iterative_stratification(targets, 0.25, seed=3)
    assert np.array_equal(held, iterative_stratification(targets, 0.25, seed=3))  # seeded
    assert abs(held.sum() - 100) <= 2
    for k in range(6):  # each label's share of held-out images is its share of the whole, within one image
        assert abs(targets[held, k].sum() - 0.25 * targets[:, k].sum()) <= 1, k


def test_the_multi_label_loss_is_binary_cross_entropy_with_positive_weights_and_smoothing():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 0.2, 1.5], [0.1, -2.0, 0.3]])
    labels = torch.tensor([[1, 0, 1], [0, 0, 1], [0, 1, 0]], dtype=torch.uint8)
    weights = loss_weights(labels.numpy(), 3, "auto")  # (images without it) / (images with it)
    assert weights is not None and weights.tolist() == pytest.approx([2.0, 2.0, 0.5])
    loss = ClassificationLoss(torch.tensor([1.0, 2.0, 0.5]), 0.1, multi_label=True)
    targets = labels.float() * 0.9 + 0.05
    by_hand = -(
        torch.tensor([1.0, 2.0, 0.5]) * targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)
    ).sum(1)
    assert loss.per_image(logits, labels) == pytest.approx(by_hand.tolist(), rel=1e-5)
    assert float(loss.mean(logits, labels)) == pytest.approx(float(by_hand.mean()), rel=1e-5)
    assert int(loss.correct(logits, labels)) == 1  # at 0.5, the first image's set is right, the others' are not
    for never_or_always in ([[1, 0], [1, 0]], [[1, 1], [1, 0]]):
        with pytest.raises(ConfigError, match="class_weights"):
            loss_weights(np.array(never_or_always, dtype=np.uint8), 2, "auto")


def test_thresholds_maximise_each_labels_f1_and_scores_are_scikit_learns():
    rng = np.random.default_rng(1)
    targets = (rng.random((200, 4)) < 0.3).astype(np.uint8)
    targets[:, 3] = 0  # a label the validation split never shows
    chances = np.clip(targets * 0.35 + rng.random((200, 4)) * 0.65, 0, 1)
    thresholds = choose_thresholds(chances, targets)
    assert thresholds[3] == UNCHOSEN
    for k in range(3):
        best = max(f1_score(targets[:, k], chances[:, k] >= cut) for cut in np.unique(chances[:, k]))
        assert f1_score(targets[:, k], chances[:, k] >= thresholds[k]) == pytest.approx(best)
    logits = torch.logit(torch.from_numpy(chances).float(), eps=1e-6)
    scores = Scores.of(Logits.seen_once(logits), targets, thresholds)
    decided = (torch.sigmoid(logits).numpy() >= thresholds).astype(int)
    assert scores.delivered_accuracy == pytest.approx(accuracy_score(targets, decided))  # exact match
    assert scores.hamming_loss == pytest.approx(hamming_loss(targets, decided))
    assert scores.micro_f1 == pytest.approx(f1_score(targets, decided, average="micro", zero_division=0))
    assert scores.macro_f1 == pytest.approx(f1_score(targets, decided, average="macro", zero_division=0))
    shown = torch.sigmoid(logits).numpy()[:, :3]
    assert scores.delivered_map == pytest.approx(average_precision_score(targets[:, :3], shown, average="macro"))
    assert scores.headline[0] == "mAP" and "exact match" in scores.describe()
    split_scores = scores_of_splits({"test": (Logits.seen_once(logits), targets)})
    assert split_scores["thresholds"] == [UNCHOSEN] * 4  # no validation split: 0.5, and recorded


@pytest.fixture(scope="session")
def multilabel_run(tmp_path_factory):
    """A tutorial-cnn trained for 5 epochs on 160 scenes of 16x16, a fifth of train held out to choose the
    thresholds on: a real multi-label model in seconds. Returns the run folder and the command's output."""
    root = tmp_path_factory.mktemp("multilabel")
    sets = write_scenes(root / "images", count=160, seed=1)
    (root / "labels.csv").write_text(shapes(sets)["cells.csv"])
    args = ["train", "--model", "tutorial-cnn", "--data", str(root / "images"), "--labels", str(root / "labels.csv")]
    trained = CliRunner().invoke(app, [*args, "--val-fraction", "0.2", "--epochs", "5", "--out", str(root / "run")])
    assert trained.exit_code == 0, trained.output
    return root / "run", trained.output


def test_training_scores_label_sets_and_keeps_thresholds_chosen_on_validation(multilabel_run):
    run, output = multilabel_run
    assert "multi-label: a sigmoid per class" in output and "test mAP" in output and "exact match" in output
    model = load_model(run)
    kept = model.info.metrics
    assert model.info.multi_label and model.info.thresholds == kept["thresholds"] and len(kept["thresholds"]) == 3
    assert kept["test_delivered_map"] > 0.9 and kept["test_hamming_loss"] < 0.1
    header, *rows = (run / "data.csv").read_text().splitlines()
    assert header == "path,labels,split" and any(";" in row for row in rows)  # images with two or three labels
    assert (run / "report.html").is_file()  # the report of a multi-label run is written as any other


def test_evaluate_reports_each_labels_average_precision_and_threshold(multilabel_run):
    run, _ = multilabel_run
    result = CliRunner().invoke(app, ["evaluate", str(run), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    thresholds = load_model(run).info.thresholds
    assert [report["per_class"][name]["threshold"] for name in COLOURS] == pytest.approx(thresholds)
    assert {"average_precision", "support", "f1-score"} <= set(report["per_class"]["red"])
    assert report["delivered_map"] == pytest.approx(load_model(run).info.metrics["test_delivered_map"], abs=1e-6)
    assert report["balanced_accuracy"] is None and "micro avg" in report


def test_predict_serve_and_export_answer_every_label_at_its_threshold(multilabel_run, tmp_path):
    run, _ = multilabel_run
    both = tmp_path / "both.png"
    Image.fromarray(scene((0, 2), 5)).save(both)  # blue and red
    result = CliRunner().invoke(app, ["predict", str(run), str(both), "--json"])
    assert result.exit_code == 0, result.output
    (prediction,) = json.loads(result.output)
    assert sorted(name for name, _ in prediction["labels"]) == ["blue", "red"] and len(prediction["top"]) == 3
    with served(run) as url:
        answer = httpx.post(f"{url}/predict", files={"file": ("both.png", both.read_bytes(), "image/png")}).json()
        described = httpx.get(f"{url}/model").json()
    assert [label["class"] for label in answer["predictions"][0]["labels"]] == [n for n, _ in prediction["labels"]]
    assert described["metric"] == "mAP" and set(described["thresholds"]) == set(COLOURS)
    exported = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "m.onnx")])
    assert exported.exit_code == 0, exported.output
    onnx = CliRunner().invoke(app, ["predict", str(tmp_path / "m.onnx"), str(both), "--json"])
    (exported_answer,) = json.loads(onnx.output)
    assert [name for name, _ in exported_answer["labels"]] == [name for name, _ in prediction["labels"]]
    assert [p for _, p in exported_answer["labels"]] == pytest.approx([p for _, p in prediction["labels"]], abs=1e-4)
    int8 = CliRunner().invoke(app, ["export", str(run), "--int8", "--out", str(tmp_path / "q.onnx")])
    assert int8.exit_code == 0 and "test mAP" in int8.output and "the same label set on" in int8.output, int8.output


def test_the_report_shows_labels_curves_and_misses_in_a_real_browser(multilabel_run, browser_page):
    run, _ = multilabel_run
    browser_page.goto((run / "report.html").as_uri())
    assert "test mAP" in browser_page.inner_text("h1")
    headings = browser_page.locator("h2").all_inner_texts()
    assert "Per class (test)" in headings and "Label co-occurrence (test)" in headings
    assert browser_page.locator("th", has_text="average precision").is_visible()
    assert browser_page.locator("td", has_text="micro avg").is_visible()
    loaded = browser_page.evaluate("[...document.images].every(image => image.complete && image.naturalWidth > 0)")
    assert loaded and browser_page.locator("img[alt='precision recall']").count() == 1
    assert browser_page.errors == []


def test_one_against_the_rest_confident_learning_finds_labels_dropped_and_given_wrongly():
    """Synthetic probabilities of a 90%-sure model on 1,000 images of 4 labels, 30 dropped and 30 added."""
    rng = np.random.default_rng(0)
    true = (rng.random((1000, 4)) < 0.3).astype(np.uint8)
    probabilities = np.where(true == 1, 0.9, 0.1) + rng.uniform(-0.08, 0.08, true.shape)
    given = true.copy()
    carried, absent = np.argwhere(true == 1), np.argwhere(true == 0)
    dropped = carried[rng.choice(len(carried), 30, replace=False)]
    added = absent[rng.choice(len(absent), 30, replace=False)]
    given[tuple(dropped.T)], given[tuple(added.T)] = 0, 1
    issues = label_set_issues(probabilities, given)
    suspects = set(zip(issues.rows.tolist(), issues.classes.tolist(), strict=True))
    planted = {tuple(pair) for pair in [*dropped.tolist(), *added.tolist()]}
    # The calibrated joint's estimate of each class's errors runs a few short: most planted, few others.
    assert len(suspects & planted) >= 45 and len(suspects - planted) <= 10
    said = dict(zip(zip(issues.rows.tolist(), issues.classes.tolist(), strict=True), issues.given, strict=True))
    assert all(said[tuple(pair)] for pair in added.tolist() if tuple(pair) in said)  # given wrongly
    assert not any(said[tuple(pair)] for pair in dropped.tolist() if tuple(pair) in said)  # missing
    assert np.all(np.diff(issues.self_confidence) >= 0)


def test_the_doctor_suggests_the_missing_label_and_train_excludes_what_it_flags(tmp_path):
    sets = write_scenes(tmp_path / "images", count=120, seed=2)
    wrong = [i for i, labels in enumerate(sets) if labels == (2,)][:4]  # red alone, its red dropped
    noisy = [() if i in wrong else labels for i, labels in enumerate(sets)]
    (tmp_path / "labels.csv").write_text(shapes(noisy)["one_hot.csv"])
    data = ["--data", str(tmp_path / "images"), "--labels", str(tmp_path / "labels.csv")]
    runner = CliRunner()
    doctored = runner.invoke(app, ["doctor", *data, "--label-model", "embeddings", "--out", str(tmp_path / "d"), "-q"])
    assert doctored.exit_code == 0, doctored.output
    findings = json.loads((tmp_path / "d" / "doctor.json").read_text())["findings"]
    suspects = [f for f in findings if f["kind"] == "label"]
    missing = {f["image"]["path"] for f in suspects[: 2 * len(wrong)] if "red missing" in f["detail"]}
    assert len(missing & {f"{i}.png" for i in wrong}) >= 3, suspects[: 2 * len(wrong)]  # most, on 16 px images
    assert all(f["suggested"] == "red" for f in suspects if f["image"]["path"] in missing)
    out = tmp_path / "run"
    args = ["--model", "tutorial-cnn", "--epochs", "1", "--no-report", "--out", str(out)]
    trained = runner.invoke(app, ["train", *data, *args, "--exclude", f"{tmp_path / 'd' / 'doctor.json'}:label"])
    assert trained.exit_code == 0 and "images left out" in trained.output, trained.output
    flagged = {f["image"]["path"] for f in suspects if f["image"]["split"] == "train"}
    kept = [line.split(",")[0] for line in (out / "data.csv").read_text().splitlines()[1:] if line.endswith(",train")]
    assert flagged and not flagged & set(kept)  # the test split stays whole


def test_test_time_views_of_a_multi_label_model_average_probabilities():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    x = torch.randn(5, 3, 4, 4)
    averaged = averaged_views(model, x, model(x), "flip", multi_label=True)
    expected = (torch.sigmoid(model(x)) + torch.sigmoid(model(x.flip(-1)))) / 2
    assert torch.allclose(torch.sigmoid(averaged), expected, atol=1e-5)
    softmax_model = averaged_views(model, x, model(x), "flip")  # a single-label model averages logits
    assert torch.allclose(softmax_model, (model(x) + model(x.flip(-1))) / 2, atol=1e-6)


def test_the_serve_page_shows_every_label_answered_in_chromium(multilabel_run, browser_page, tmp_path):
    run, _ = multilabel_run
    both = tmp_path / "both.png"
    Image.fromarray(scene((0, 2), 5)).save(both)  # blue and red
    with served(run) as url:
        browser_page.goto(url)
        browser_page.wait_for_function("document.getElementById('about').textContent.includes('mAP')")
        browser_page.set_input_files("#file", str(both))
        browser_page.wait_for_function("document.getElementById('prediction').textContent.includes('%')")
        shown = browser_page.text_content("#prediction")
    assert "red (" in shown and "blue (" in shown and "green" not in shown, shown
    assert browser_page.errors == []


def test_runs_and_compare_tables_name_the_metric_they_show(multilabel_run):
    run, _ = multilabel_run
    (summary,) = [found for found in find_runs(run.parent) if found.name == "run"]
    assert (
        summary.headline.startswith("mAP ")
        and summary.delivered_map == load_model(run).info.metrics["test_delivered_map"]
    )
    scores = Scores.from_metrics(load_model(run).info.metrics, "test")
    row = ComparisonRow("tutorial-cnn", None, 5, 5, scores, 1.0, str(run), 0.9, 1000, 0.2)
    header = comparison_markdown([row], "scenes").splitlines()[2]
    assert "test mAP (delivered)" in header and "exact match" in header and "accuracy" not in header


def test_data_show_draws_each_class_from_the_images_that_carry_it(scenes, tmp_path):
    root, _ = scenes
    args = ["data", "show", "--data", str(root / "images"), "--labels", str(root / "long.csv")]
    shown = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "grid.png")])
    assert shown.exit_code == 0, shown.output
    assert (tmp_path / "grid.png").is_file() and "multi-label" in shown.output
