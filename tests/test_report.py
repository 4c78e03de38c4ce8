"""Figures, the HTML reports, and explanations (Grad-CAM, feature maps, filters)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cnnlab import figures
from cnnlab.cli import app
from cnnlab.data import Dataset, Split
from cnnlab.data.dataset import ImageShape
from cnnlab.data.transforms import Normalization
from cnnlab.errors import CnnlabError
from cnnlab.evaluate import evaluate
from cnnlab.explain import explain
from cnnlab.models import MODELS, ModelInfo, TrainedModel, create_model, load_model
from cnnlab.recipes import resolve_run_config
from cnnlab.report import write_run_report
from cnnlab.train import fit
from cnnlab.train.reporter import LineReporter
from tests.conftest import ARTIFACTS

runner = CliRunner()
UNIT = Normalization((0.0,) * 3, (1.0,) * 3)


def assert_real_png(path: Path, min_size: tuple[int, int] = (200, 150)) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= min_size[0] and image.height >= min_size[1]
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 10, f"{path} is nearly a single colour"


FIGURES = (
    "training_curves",
    "per_class_scores",
    "confusion_matrix",
    "sample_predictions",
    "worst_mistakes_gradcam",
    "confidently_wrong",
)


def test_run_report_leads_with_the_answer_and_is_self_contained(trained_run):
    page = write_run_report(trained_run).path.read_text()
    for name in FIGURES:
        assert_real_png(trained_run / f"{name}.png")
    assert page.count('src="data:image/png;base64,') == len(FIGURES)
    assert not re.search(r'(src|href)="(?!data:)', page), "the page must not load anything from outside"
    assert "<script" not in page and "macro avg" in page and "Metrics per epoch" in page
    accuracy = json.loads((trained_run / "model.json").read_text())["metrics"]["test_delivered_accuracy"]
    title = re.search(r"<h1>(.*?)</h1>", page).group(1)
    assert title == f"tutorial-cnn on digits: {accuracy:.2%} test accuracy"
    headings = re.findall(r"<h2>(.*?)</h2>", page)
    assert headings == [
        "Summary",
        "Training",
        "Per class (test)",
        "Confusion matrix",
        "Examples",
        "Worst mistakes",
        "Configuration",
    ]
    summary = page[page.index("<h2>Summary</h2>") : page.index("<h2>Training</h2>")]
    for fact in ("test accuracy (delivered)", "balanced accuracy", "training", "machine", "recipe"):
        assert f"<th>{fact}</th>" in summary


def test_figures_scale_with_the_number_of_classes(tmp_path):
    small = figures.save(figures.confusion_heatmaps(np.array([[5, 1], [2, 7]]), ["cat", "dog"]), tmp_path / "a.png")
    classes = [f"class {i}" for i in range(20)]
    large = figures.save(figures.confusion_heatmaps(np.eye(20, dtype=int) * 9, classes), tmp_path / "b.png")
    assert_real_png(small, (900, 400))
    with Image.open(small) as a, Image.open(large) as b:
        assert b.width > a.width and b.height > a.height


def test_data_show_writes_a_grid_and_counts(tmp_path):
    out = tmp_path / "samples.png"
    result = runner.invoke(app, ["data", "show", "--dataset", "digits", "--per-class", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert_real_png(out)
    assert_real_png(tmp_path / "samples_counts.png")
    assert "train" in result.output and "test" in result.output and "1,437" in result.output


def test_explain_writes_gradcam_feature_maps_and_filters(trained_run, tmp_path):
    image = tmp_path / "seven.png"
    Image.fromarray(np.kron(np.eye(4, dtype=np.uint8) * 255, np.ones((3, 3), np.uint8))).save(image)
    result = runner.invoke(app, ["explain", str(trained_run), str(image), "--class", "7", "--out", str(tmp_path / "x")])
    assert result.exit_code == 0, result.output
    produced = sorted(p.name for p in (tmp_path / "x").glob("*.png"))
    assert produced == ["feature_maps_conv1.png", "feature_maps_conv2.png", "filters.png", "gradcam.png"]
    for name in produced:
        assert_real_png(tmp_path / "x" / name, (150, 100))
    assert "explained 7" in result.output


def test_explain_refuses_models_without_conv_layers(tmp_path):
    config = resolve_run_config(
        {
            "data": {"dataset": "digits", "image_size": 8},
            "train": {"model": "tutorial-mlp", "epochs": 1},
            "out": str(tmp_path / "mlp"),
        }
    )
    fit(config, reporter=LineReporter())
    with pytest.raises(CnnlabError, match="no convolutional layers"):
        explain(load_model(tmp_path / "mlp"), np.zeros((8, 8, 1), np.uint8))


def squares_dataset(count: int, seed: int, size: int = 32, side: int = 8) -> tuple[Split, np.ndarray]:
    """Class = the quadrant holding a bright textured square. The other quadrants hold dim squares or
    nothing at random, so that only the bright square itself tells the class. Also returns its masks."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, (count, size, size, 1), dtype=np.uint8)
    labels = rng.integers(0, 4, count)
    masks = np.zeros((count, size, size), bool)
    half = size // 2
    for i, label in enumerate(labels):
        for quadrant in range(4):
            top = (quadrant // 2) * half + rng.integers(0, half - side + 1)
            left = (quadrant % 2) * half + rng.integers(0, half - side + 1)
            square = (slice(top, top + side), slice(left, left + side))
            if quadrant == label:
                images[i][square] = rng.integers(180, 256, (side, side, 1))
                masks[i][square] = True
            elif rng.random() < 0.5:
                images[i][square] = rng.integers(90, 130, (side, side, 1))
    return Split(images, labels.astype(np.int64)), masks


def test_gradcam_points_at_the_square_that_decides_the_class(tmp_path):
    train, _ = squares_dataset(1200, seed=0, side=10)
    test, masks = squares_dataset(100, seed=1, side=10)
    dataset = Dataset("squares", ("top-left", "top-right", "bottom-left", "bottom-right"), train, test)
    config = resolve_run_config({"train": {"model": "tutorial-cnn", "epochs": 6}, "out": str(tmp_path / "run")})
    model = fit(config, dataset, reporter=LineReporter()).model
    assert evaluate(model, test).scores.delivered_accuracy > 0.95
    hits = 0
    for image, mask in zip(test.images, masks, strict=True):
        heat = explain(model, image).heat
        hits += mask[np.unravel_index(heat.argmax(), heat.shape)]
    assert hits >= 90


@pytest.mark.parametrize(("device", "width", "height"), [("laptop", 1366, 768), ("phone", 390, 844)])
def test_report_html_reads_at_laptop_and_phone_widths_in_headless_chromium(
    trained_run, browser_page, device, width, height
):
    """In real Chromium: every image loads, nothing errors, the page is never wider than the screen, and the
    accuracy and the summary table are on the first screen."""
    browser_page.set_viewport_size({"width": width, "height": height})
    browser_page.goto(write_run_report(trained_run).path.as_uri())
    widths = browser_page.eval_on_selector_all("img", "images => images.map(i => i.complete ? i.naturalWidth : 0)")
    browser_page.screenshot(path=str(ARTIFACTS / f"run-report-{device}.png"), full_page=True)
    assert len(widths) == len(FIGURES) and all(width > 0 for width in widths)
    assert browser_page.evaluate("document.documentElement.scrollWidth") <= width
    assert "test accuracy" in browser_page.inner_text("h1")
    summary = browser_page.locator("table.facts").bounding_box()
    assert summary is not None and summary["y"] < height
    assert browser_page.errors == []


@pytest.mark.parametrize("name", [name for name in MODELS if name != "tutorial-mlp"])
def test_explain_works_for_every_conv_model_in_the_registry(name):
    shape = ImageShape(3, 16, 16)
    model = TrainedModel(create_model(name, shape, 4).eval(), ModelInfo(name, list("abcd"), shape, UNIT))
    explanation = explain(model, np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert explanation.heat.shape == (16, 16) and explanation.heat.min() >= 0 and explanation.heat.max() <= 1
    assert explanation.first_filters.shape[-1] == 3 and len(explanation.feature_maps) >= 2


def test_a_report_needs_only_the_model_files(trained_run, tmp_path):
    """A model folder copied without its run's config.toml, metrics and sessions still gets its report."""
    for name in ("model.json", "model.safetensors"):
        (tmp_path / name).write_bytes((trained_run / name).read_bytes())
    page = write_run_report(tmp_path).path.read_text()
    assert "<h2>Summary</h2>" in page and "unknown machine" in page
