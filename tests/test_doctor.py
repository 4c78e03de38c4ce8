"""cnnlab doctor: label issues, copies and leakage, odd images, its files, and training without what it flags."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import DataConfig, DoctorConfig
from cnnlab.data import load_dataset
from cnnlab.data.dataset import concatenate_images
from cnnlab.data.exclude import parse_exclude
from cnnlab.doctor import Kind, examine, trained
from cnnlab.doctor import embeddings as embeddings_module
from cnnlab.doctor.copies import near_exact_copies
from cnnlab.doctor.duplicates import nearest_neighbours
from cnnlab.doctor.embeddings import embed, pixel_digests
from cnnlab.doctor.labels import confident_learning, suspicion
from cnnlab.doctor.report import write_diagnosis
from cnnlab.doctor.stages import Stages
from cnnlab.errors import ConfigError
from cnnlab.models import load_model

from .conftest import ARTIFACTS, pattern_image, write_cifar10_archive, write_image_folder

runner = CliRunner()


def scene(label: int, seed: int, size: int = 32) -> np.ndarray:
    """A distinct picture per seed (random colours, smoothly varying) with its class's mark: a brighter bar
    whose position is the class."""
    rng = np.random.default_rng(seed)
    colours = Image.fromarray(rng.integers(0, 200, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
    image = np.asarray(colours).astype(np.int64)
    third = size // 3
    image[label * third : (label + 1) * third, third : 2 * third] += 120
    return image.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def troubled(tmp_path_factory):
    """A 3-class folder of 20 train and 8 test pictures per class, with what the doctor should find: a class-0
    picture filed under class 1, a train picture copied exactly into test and another shifted by 2 pixels, a
    black frame, a grey picture."""
    root = tmp_path_factory.mktemp("troubled") / "data"
    for label in range(3):
        for split, count in (("train", 20), ("test", 8)):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                Image.fromarray(scene(label, seed=label * 100 + i + (50 if split == "test" else 0))).save(
                    folder / f"{i:03d}.png"
                )
    Image.fromarray(scene(0, seed=999)).save(root / "train" / "class1" / "misfiled.png")
    shutil.copy(root / "train" / "class2" / "003.png", root / "test" / "class2" / "leaked.png")
    shifted = np.roll(scene(1, seed=105), 2, axis=1)
    Image.fromarray(shifted).save(root / "test" / "class1" / "shifted.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "train" / "class0" / "black.png")
    grey = scene(1, seed=998).mean(2, keepdims=True).repeat(3, 2).astype(np.uint8)
    Image.fromarray(grey).save(root / "train" / "class1" / "grey.png")
    return root


@pytest.fixture(scope="module")
def diagnosed(troubled, tmp_path_factory):
    dataset = load_dataset(DataConfig(data=str(troubled)))
    diagnosis = examine(dataset, DoctorConfig(label_model="embeddings"), tmp_path_factory.mktemp("cache"))
    return dataset, diagnosis


def paths(diagnosis, kind):
    return [finding.image.path for finding in diagnosis.of_kind(kind)]


def test_the_misfiled_image_is_a_suspected_label_error_with_its_true_class_suggested(diagnosed):
    _, diagnosis = diagnosed
    suspected = {finding.image.path: finding.suggested for finding in diagnosis.of_kind(Kind.LABEL)}
    assert suspected["train/class1/misfiled.png"] == "class0"


def test_an_exact_copy_of_a_train_image_in_test_is_a_leak(diagnosed):
    _, diagnosis = diagnosed
    leaks = {finding.image.path: finding for finding in diagnosis.of_kind(Kind.LEAK)}
    assert leaks["test/class2/leaked.png"].other.path == "train/class2/003.png"
    assert leaks["test/class2/leaked.png"].score == 1.0
    assert leaks["test/class1/shifted.png"].other.path == "train/class1/005.png"
    assert diagnosis.leakage.leaked == len(leaks) == 2 and diagnosis.leakage.test_images == 26


def test_odd_images_say_why(diagnosed):
    _, diagnosis = diagnosed
    odd = {finding.image.path: finding.detail for finding in diagnosis.of_kind(Kind.ODD)}
    assert "nearly constant" in odd["train/class0/black.png"] and "very dark" in odd["train/class0/black.png"]
    assert "grayscale" in odd["train/class1/grey.png"]


def test_the_files_hold_every_finding(diagnosed, tmp_path):
    dataset, diagnosis = diagnosed
    files = write_diagnosis(diagnosis, dataset, tmp_path)
    report = json.loads(files.json.read_text())
    assert (
        len(report["findings"])
        == len(diagnosis.findings)
        == report["counts"]["label"] + sum(report["counts"][kind] for kind in ("duplicate", "leak", "outlier", "odd"))
    )
    rows = list(csv.DictReader(files.csv.open()))
    assert len(rows) == len(diagnosis.findings)
    assert {"kind", "split", "index", "path", "label", "score", "suggested"} <= set(rows[0])
    assert report["fingerprints"].keys() == {"train", "test"}


def test_the_report_renders_in_headless_chromium(diagnosed, tmp_path, browser_page):
    dataset, diagnosis = diagnosed
    files = write_diagnosis(diagnosis, dataset, tmp_path)
    browser_page.goto(files.html.as_uri())
    widths = browser_page.eval_on_selector_all("img", "images => images.map(i => i.complete ? i.naturalWidth : 0)")
    browser_page.screenshot(path=str(ARTIFACTS / "doctor-report.png"), full_page=True)
    assert len(widths) >= len(diagnosis.of_kind(Kind.ODD)) and all(width > 0 for width in widths)
    assert "misfiled.png" in browser_page.inner_text("body")
    assert browser_page.errors == []


def test_train_exclude_leaves_the_flagged_train_images_out_and_says_so(troubled, tmp_path):
    doctored = runner.invoke(
        app, ["doctor", "--data", str(troubled), "--label-model", "embeddings", "--out", str(tmp_path / "doctor"), "-q"]
    )
    assert doctored.exit_code == 0, doctored.output
    report = json.loads((tmp_path / "doctor" / "doctor.json").read_text())
    flagged = {
        f["image"]["index"]
        for f in report["findings"]
        if f["kind"] in ("label", "odd") and f["image"]["split"] == "train"
    }
    spec = f"{tmp_path / 'doctor' / 'doctor.json'}:label,odd"
    trained = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(troubled),
            "--model",
            "tutorial-cnn",
            "--epochs",
            "1",
            "--exclude",
            spec,
            "--out",
            str(tmp_path / "run"),
            "-q",
        ],
    )
    assert trained.exit_code == 0, trained.output
    assert f"{len(flagged)} images left out ({len(flagged)} of training)" in trained.output
    whole, kept = (
        load_dataset(DataConfig(data=str(troubled))),
        load_dataset(DataConfig(data=str(troubled), exclude=spec)),
    )
    assert len(whole.train) - len(kept.train) == len(flagged) and len(kept.test) == len(whole.test)
    assert "train/class1/misfiled.png" not in kept.train.names.tolist()
    assert load_model(tmp_path / "run").info.config["data"]["exclude"] == spec
    assert "trained without the images" in (tmp_path / "run" / "report.html").read_text()

    # The run's test accuracy with and without the test images that have a copy in train.
    again = runner.invoke(
        app,
        [
            "doctor",
            "--data",
            str(troubled),
            "--label-model",
            "embeddings",
            "--run",
            str(tmp_path / "run"),
            "--out",
            str(tmp_path / "again"),
            "-q",
        ],
    )
    assert again.exit_code == 0, again.output
    leakage = json.loads((tmp_path / "again" / "doctor.json").read_text())["leakage"]
    model = load_model(tmp_path / "run")
    right = model.probabilities(np.asarray(whole.test.images)).argmax(1) == whole.test.labels
    leaked = [whole.test.names.tolist().index(path) for path in ("test/class2/leaked.png", "test/class1/shifted.png")]
    assert leakage["leaked"] == 2 and leakage["delivered_accuracy"] == pytest.approx(right.mean())
    assert leakage["delivered_accuracy_without_copies"] == pytest.approx(np.delete(right, leaked).mean())
    assert f"{leakage['delivered_accuracy']:.4f} on all of them" in again.output


def test_a_doctor_json_of_other_data_is_refused_in_one_line(troubled, tmp_path):
    doctored = runner.invoke(
        app, ["doctor", "--data", str(troubled), "--label-model", "embeddings", "--out", str(tmp_path), "-q"]
    )
    assert doctored.exit_code == 0, doctored.output
    other = write_image_folder(tmp_path / "other", classes=3, per_class=5, size=16)
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(other),
            "--exclude",
            str(tmp_path / "doctor.json"),
            "--epochs",
            "1",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 2
    assert "examined other data" in result.output and len(result.output.strip().splitlines()) == 1


def test_exclude_kinds_are_checked():
    assert parse_exclude("d/doctor.json:label,leak")[1] == ("label", "leak")
    assert parse_exclude("doctor.json")[1] == ("label", "duplicate", "leak", "outlier", "odd")
    with pytest.raises(ConfigError, match="unknown kind 'labels'"):
        parse_exclude("doctor.json:labels")


def test_confident_learning_finds_flipped_labels_among_sure_predictions():
    """Synthetic probabilities of a 90%-sure model on 2,000 images of 4 classes with 40 labels flipped."""
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, 2000)
    probabilities = rng.dirichlet(np.ones(4), 2000) * 0.1
    probabilities[np.arange(2000), true] += 0.9
    given = true.copy()
    flipped = rng.choice(2000, 40, replace=False)
    given[flipped] = (true[flipped] + rng.integers(1, 4, 40)) % 4
    issues = confident_learning(probabilities, given)
    found = set(issues.issues.tolist())
    # The calibrated joint estimates how many of each label's images are flipped, and that many of the least
    # sure are suspected: as the estimate is off by a few per class, most of the flipped and a few others.
    assert len(found & set(flipped.tolist())) >= 34 and len(found - set(flipped.tolist())) <= 10
    assert (issues.suggested == true[issues.issues])[np.isin(issues.issues, flipped)].all()
    assert np.all(np.diff(issues.suspicion) <= 0)
    joint = issues.confident_joint
    assert np.array_equal(joint.sum(1), np.bincount(given, minlength=4))
    assert 34 <= joint.sum() - np.trace(joint) <= 50


def test_the_rankings_differ_where_they_should():
    """Image 0 is given class 0 and could be any other class; image 1 is given class 0 and is most probably class
    1. Self-confidence looks at p(given) alone and puts image 0 first; the margin puts image 1, the clearer
    error, first."""
    probabilities = np.array([[0.25, 0.25, 0.5], [0.3, 0.7, 0.0], [0.9, 0.05, 0.05], [0.05, 0.9, 0.05]])
    given = np.array([0, 0, 0, 1])
    np.testing.assert_allclose(suspicion(probabilities, given, "self-confidence"), [0.75, 0.7, 0.1, 0.1])
    np.testing.assert_allclose(suspicion(probabilities, given, "margin"), [0.25, 0.4, -0.85, -0.85])


def test_nearest_neighbours_match_the_full_similarity_matrix():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(2500, 16)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    found = nearest_neighbours(embeddings)
    full = embeddings @ embeddings.T
    np.fill_diagonal(full, -2)
    np.testing.assert_array_equal(found.indices, np.argsort(-full, axis=1)[:, : found.indices.shape[1]])
    np.testing.assert_allclose(found.similarities, -np.sort(-full, axis=1)[:, : found.indices.shape[1]], atol=1e-5)


def test_the_measured_copies_keep_the_image_recognisable():
    image = pattern_image(2, 32, seed=3)
    made = near_exact_copies(image)
    assert set(made) == {"jpeg-75", "resized", "shifted", "brightened"}
    for copy in made.values():
        assert copy.shape == image.shape and copy.dtype == np.uint8
        assert np.abs(copy.astype(int) - image).mean() < 40
    np.testing.assert_array_equal(made["shifted"][2:, 2:], image[:-2, :-2])


def test_embeddings_are_cached_by_their_pixels_whatever_their_order(tmp_path, monkeypatch):
    images = np.stack([scene(i % 3, seed=i) for i in range(12)])
    first = embed(images[:8], pixel_digests(images[:8]), tmp_path)
    assert np.allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    computed = []
    original = embeddings_module._compute
    monkeypatch.setattr(
        embeddings_module, "_compute", lambda pixels, *rest: computed.append(len(pixels)) or original(pixels, *rest)
    )
    order = np.array([11, 3, 0, 9, 5, 1, 10, 2, 4, 6, 7, 8])
    again = embed(images[order], pixel_digests(images[order]), tmp_path)
    assert computed == [4]  # only the four images not seen before
    np.testing.assert_allclose(again[[1, 2, 4, 5]], first[[3, 0, 5, 1]], atol=1e-6)


def test_exclusion_reaches_a_carved_validation_split_and_needs_the_same_split_flags(troubled, tmp_path):
    carved = DataConfig(data=str(troubled), val_fraction=0.25, split_seed=3)
    dataset = load_dataset(carved)
    diagnosis = examine(dataset, DoctorConfig(label_model="embeddings"), tmp_path / "cache")
    files = write_diagnosis(diagnosis, dataset, tmp_path)
    # A finding's image leaves, or, for a test image, the copy it has in another split.
    leaving = [f.other if f.image.split == "test" and f.other is not None else f.image for f in diagnosis.findings]
    flagged_val = {image.index for image in leaving if image.split == "val"}
    assert flagged_val
    kept = load_dataset(replace(carved, exclude=str(files.json)))
    assert len(dataset.val) - len(kept.val) == len(flagged_val) and len(kept.test) == len(dataset.test)
    with pytest.raises(ConfigError, match="examined other data"):
        load_dataset(replace(carved, split_seed=4, exclude=str(files.json)))


def test_a_cifar_archive_is_examined_by_index(tmp_path):
    archive = write_cifar10_archive(tmp_path / "cifar-10-python.tar.gz", per_batch=30)
    result = runner.invoke(
        app, ["doctor", "--data", str(archive), "--label-model", "embeddings", "--out", str(tmp_path / "doctor"), "-q"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "doctor" / "doctor.json").read_text())
    assert report["class_counts"].keys() == {"train", "test"} and sum(report["class_counts"]["train"]) == 150
    assert all(f["image"]["path"] is None and f["image"]["index"] >= 0 for f in report["findings"])


def test_the_trainings_get_the_strongest_recipe_the_budget_leaves_room_for(troubled, tmp_path, capsys, monkeypatch):
    """Each recipe is timed on three of its steps (about a second each here) before one is chosen."""
    dataset = load_dataset(DataConfig(data=str(troubled)))
    images = concatenate_images([split.images for split in dataset.splits().values()])
    given = np.concatenate([split.labels for split in dataset.splits().values()])
    for scratch in "abc":
        (tmp_path / scratch).mkdir()
    roomy = trained.choose_recipe(images, given, dataset, 3, 0, tmp_path / "a", seconds=3600.0)
    assert roomy.rung == trained.LADDER[0] and "of the 60.0 the budget leaves" in roomy.said
    assert 0 < roomy.estimate < 3600
    with monkeypatch.context() as patched:  # the strongest costs a second an image, the others nothing
        costs = {"fast94": trained.Probe(1.0, 0.0)}
        patched.setattr(trained, "_probe", lambda rung, *_: costs.get(rung.recipe, trained.Probe(0.0, 0.0)))
        tight = trained.choose_recipe(images, given, dataset, 3, 0, tmp_path / "b", seconds=10.0)
    assert tight.rung == trained.Rung("fast90") and tight.folds == 3 and "fast94 10 epochs x 2 folds" in tight.said
    with monkeypatch.context() as patched:  # fast94 fits in fewer epochs: as many as fit
        patched.setattr(trained, "_probe", lambda *_: trained.Probe(1e-3, 0.0))
        fitted = len(given) - len(given) // 3
        seconds = trained.ESTIMATE_MARGIN * 3 * 1e-3 * (fitted * 7.5 + trained.PREDICT_SHARE * len(given) / 3)
        fewer = trained.choose_recipe(images, given, dataset, 3, 0, tmp_path / "b", seconds=seconds)
    assert fewer.rung == trained.LADDER[0] and fewer.epochs == 7 and "fast94 7 epochs x 3 folds" in fewer.said
    none = trained.choose_recipe(images, given, dataset, 3, 0, tmp_path / "c", seconds=0.01)
    assert none.rung is None and "no training fits: the linear model alone" in none.said
    diagnosis = examine(dataset, DoctorConfig(label_model="training", budget=0.001), tmp_path / "cache", Stages())
    assert "a linear model on embeddings" in diagnosis.label_method and "no training fits" in diagnosis.label_method
    printed = capsys.readouterr().out
    assert "recipe chosen by timing its steps: 1 in" in printed and "peak RSS" in printed and "trainings" not in printed
    assert set(diagnosis.peak_mb) == set(diagnosis.seconds) and all(mb > 0 for mb in diagnosis.peak_mb.values())


def test_photos_are_fine_tuned_per_fold_when_the_budget_allows(tmp_path):
    """Photos (72 px here) climb their own ladder: the finetune recipe per fold (head, then 2 epochs of the
    whole network), pooled with the linear model on embeddings. About 15 s: three folds of efficientnet-lite0."""
    root = write_image_folder(tmp_path / "photos", classes=3, per_class=10, size=72)
    dataset = load_dataset(DataConfig(data=str(root)))
    assert trained.ladder_for(dataset.image_shape) == trained.PHOTOS
    diagnosis = examine(dataset, DoctorConfig(label_model="both", budget=60), tmp_path / "cache")
    assert "3-fold finetune trainings (finetune 3 epochs x 3 folds" in diagnosis.label_method
    assert "the log-linear pool of both" in diagnosis.label_method and diagnosis.label_agreement > 0.8
