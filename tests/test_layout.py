"""The seams that the next capabilities build on: batch loaders, model families, the run folder, the CLI's flags."""

from __future__ import annotations

import dataclasses
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import SECTIONS, AugmentConfig, DataConfig, InferenceConfig, RunConfig, TrainConfig
from cnnlab.data import Dataset, Split, load_dataset
from cnnlab.data import transforms as transforms_module
from cnnlab.data.augment import random_crop_boxes, resized_crops
from cnnlab.data.disk_images import DiskImages
from cnnlab.data.images import to_array
from cnnlab.data.loader import EVALUATION_PIXELS, Batch, InMemory, OnDisk, TrainBatches, disk_copy
from cnnlab.data.transforms import channel_statistics
from cnnlab.errors import CnnlabError
from cnnlab.models import MODELS, create_model, load_model, registry
from cnnlab.models.families.fast import FastNet
from cnnlab.models.inference import Scores, in_order, predict_and_score
from cnnlab.recipes import RECIPES, resolve_run_config
from cnnlab.run_dir import RunDir
from cnnlab.train import fit, resume
from cnnlab.train import parts as parts_module
from cnnlab.train.reporter import LineReporter

from .conftest import write_image_folder


def pixels(count: int = 37, size: int = 6, seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    return Split(rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8), rng.integers(0, 3, count))


def epoch_batches(batches: TrainBatches, epoch: int, done: int = 0) -> list[tuple[int, np.ndarray, np.ndarray]]:
    steps = batches.steps_per_epoch
    return [(step, b.images.numpy(), b.labels.numpy()) for step, b in batches.epoch(epoch, steps, done)]


def same(first: list, second: list) -> bool:
    return len(first) == len(second) and all(
        a[0] == b[0] and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
        for a, b in zip(first, second, strict=True)
    )


def loader(split: Split, source, rank: int = 0, world_size: int = 1) -> TrainBatches:
    return TrainBatches(
        split,
        source,
        AugmentConfig(flip="alternating", translate=2),
        batch_size=8,
        seed=3,
        rank=rank,
        world_size=world_size,
    )


def test_the_memmap_loader_gives_the_in_memory_loaders_batches_bit_for_bit(tmp_path):
    split = pixels()
    in_memory = loader(split, InMemory(split, torch.device("cpu")))
    on_disk = loader(split, OnDisk(DiskImages(disk_copy(split, tmp_path)), split.labels, torch.device("cpu")))
    for epoch in (1, 2):  # alternating flips differ between odd and even epochs
        assert same(epoch_batches(in_memory, epoch), epoch_batches(on_disk, epoch))
    assert disk_copy(split, tmp_path) == next((tmp_path / "arrays").iterdir())  # written once, by content


def test_images_on_disk_read_as_the_array_they_hold(tmp_path):
    images = pixels(50, 6).images
    path = tmp_path / "images.npy"
    np.save(path, images)
    on_disk = DiskImages(path)
    assert on_disk.shape == images.shape and len(on_disk) == 50
    assert np.array_equal(np.asarray(on_disk), images)
    wanted = np.array([7, 3, 4, 5, 40, 8, 0])  # unordered, with a run of consecutive rows
    assert np.array_equal(on_disk[wanted], images[wanted]) and np.array_equal(on_disk[9], images[9])
    view = on_disk[10:30].take(np.array([5, 1, 2]), axis=0)  # views of views stay on disk
    assert isinstance(view, DiskImages) and np.array_equal(np.asarray(view), images[10:30][[5, 1, 2]])
    assert np.array_equal(np.concatenate([b.numpy() for b in in_order(on_disk, 16)]), images)
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 1)
    with pytest.raises(CnnlabError, match="truncated"):
        DiskImages(path)


def test_an_image_folder_stays_on_disk_and_trains_as_from_memory(tmp_path):
    write_image_folder(tmp_path / "photos", classes=3, per_class=12, size=16, split=False)
    Path(tmp_path / "photos" / "class1" / "broken.png").write_bytes(b"not an image")

    def trained(loader_kind: str) -> tuple[Dataset, dict[str, torch.Tensor]]:
        train = {"recipe": "fast70", "batch_size": 16, "epochs": 1, "loader": loader_kind}
        data = {"data": str(tmp_path / "photos"), "cache_dir": str(tmp_path / "cache")}
        config = resolve_run_config({"data": data, "train": train, "out": str(tmp_path / loader_kind)})
        result = fit(config, reporter=LineReporter())
        return result.dataset, load_file(str(tmp_path / loader_kind / RunDir.WEIGHTS))

    (dataset, memory), (_, disk) = trained("memory"), trained("disk")
    assert memory.keys() == disk.keys() and all(torch.equal(memory[name], disk[name]) for name in memory)
    assert isinstance(dataset.train.images, DiskImages) and isinstance(dataset.test.images, DiskImages)
    files = sorted((tmp_path / "photos").rglob("*.png"))
    size = dataset.image_shape.size  # the family's input size, 32
    decoded = {to_array(Image.open(f), size, 3).tobytes(): f.parent.name for f in files if f.name != "broken.png"}
    seen = [
        (image.tobytes(), dataset.classes[label])
        for split in (dataset.train, dataset.test)
        for image, label in zip(np.asarray(split.images), split.labels, strict=True)
    ]
    assert len(seen) == len(decoded) == 36 and all(decoded[pixels] == name for pixels, name in seen)
    (images_file,) = (tmp_path / "cache" / "decoded").glob("*.images.npy")
    images_file.write_bytes(images_file.read_bytes()[:-5])  # a damaged cache entry is decoded again
    assert len(load_dataset(DataConfig(data=str(tmp_path / "photos"), cache_dir=str(tmp_path / "cache"))).train) == 28


def test_large_images_are_evaluated_and_initialised_from_in_bounded_pieces(tmp_path, monkeypatch):
    small, large = np.zeros((2500, 32, 32, 3), np.uint8), np.zeros((300, 224, 224, 3), np.uint8)
    assert [len(batch) for batch in in_order(small)] == [1000, 1000, 500]  # CIFAR-sized: as before
    assert {len(batch) for batch in list(in_order(large))[:-1]} == {EVALUATION_PIXELS // 224**2}
    seen = []
    name = RECIPES["fast70"]["model"]
    monkeypatch.setattr(FastNet, "init_from_data", lambda _, x: seen.append(len(x)))
    assert create_model(name, (3, 32, 32), 2).initialises_from_data
    monkeypatch.setattr(parts_module, "INIT_PIXELS", 10 * 64 * 64)
    write_image_folder(tmp_path / "photos", classes=2, per_class=20, size=64, split=False)
    config = resolve_run_config(
        {"data": {"data": str(tmp_path / "photos"), "image_size": 64}, "train": {"recipe": "fast70", "epochs": 0.01}}
    )
    fit(dataclasses.replace(config, out=str(tmp_path / "run")), reporter=LineReporter())
    assert seen == [10]  # the whitening sees INIT_PIXELS of images, not INIT_SAMPLE of them


def test_shards_of_two_processes_make_up_the_global_batch():
    split = pixels()
    whole = epoch_batches(loader(split, InMemory(split, torch.device("cpu"))), 1)
    shards = [epoch_batches(loader(split, InMemory(split, torch.device("cpu")), rank, 2), 1) for rank in (0, 1)]
    for (step, images, labels), first, second in zip(whole, *shards, strict=True):
        assert step == first[0] == second[0]
        assert np.array_equal(images, np.concatenate([first[1], second[1]]))
        assert np.array_equal(labels, np.concatenate([first[2], second[2]]))


def test_a_loader_restored_mid_epoch_continues_with_the_same_batches():
    split = pixels()
    uninterrupted = loader(split, InMemory(split, torch.device("cpu")))
    epoch_batches(uninterrupted, 1)
    expected = epoch_batches(uninterrupted, 2)
    interrupted = loader(split, InMemory(split, torch.device("cpu")))
    epoch_batches(interrupted, 1)
    steps = interrupted.epoch(2, interrupted.steps_per_epoch)
    next(steps), next(steps)  # two steps of epoch 2, then a checkpoint
    saved = interrupted.state_dict()
    restored = loader(split, InMemory(split, torch.device("cpu")))
    restored.load_state_dict(saved)
    assert same(epoch_batches(restored, 2, done=2), expected[2:])


def trained_epoch(batches: TrainBatches, number: int, loss_of, done: int = 0, steps: int | None = None) -> list[Batch]:
    """Steps done+1 .. `steps` (all by default) of epoch `number`, each batch's images recorded with the losses
    `loss_of(batch)` as a training step would record them."""
    trained = []
    for _, batch in batches.epoch(number, steps or batches.steps_per_epoch, done):
        batches.record_losses(batch.indices, loss_of(batch))
        trained.append(batch)
    return trained


def test_selection_trains_on_the_unseen_first_then_on_the_highest_last_losses():
    split = pixels(40)
    selecting = TrainBatches(
        split, InMemory(split, torch.device("cpu")), AugmentConfig(), batch_size=8, seed=3, select_share=0.5
    )
    assert selecting.steps_per_epoch == 3  # 20 images a selected epoch, in batches of 8

    def trained_on(epoch: int, losses: torch.Tensor) -> torch.Tensor:
        """The images of `epoch`, each recorded with its `losses` entry as the loss its step gave it."""
        return torch.cat([batch.indices for batch in trained_epoch(selecting, epoch, lambda b: losses[b.indices])])

    losses = torch.rand(40, generator=torch.Generator().manual_seed(1))
    first = trained_on(1, losses)
    second = trained_on(2, losses)
    assert len(first) == len(second) == 20 and set(first.tolist()) | set(second.tolist()) == set(range(40))
    third = trained_on(3, torch.zeros(40))  # then the 20 highest losses, recorded as 0 this time
    assert set(third.tolist()) == set(losses.topk(20).indices.tolist())
    fourth = trained_on(4, losses)  # so that the other 20 rank above them now
    assert set(fourth.tolist()) == set(range(40)) - set(third.tolist())
    # the whole split, as without selection, draws the same batches from the same generator
    everything = TrainBatches(
        split, InMemory(split, torch.device("cpu")), AugmentConfig(), batch_size=8, seed=3, select_share=1
    )
    plain = TrainBatches(split, InMemory(split, torch.device("cpu")), AugmentConfig(), batch_size=8, seed=3)
    assert same(epoch_batches(everything, 1), epoch_batches(plain, 1))


def test_a_selecting_loader_restored_mid_epoch_continues_with_the_same_batches():
    split = pixels(40)

    def selecting() -> TrainBatches:
        return TrainBatches(
            split,
            InMemory(split, torch.device("cpu")),
            AugmentConfig(translate=2),
            batch_size=8,
            seed=3,
            select_share=0.6,
        )

    def mean_pixel(batch: Batch) -> torch.Tensor:  # a loss for each image
        return batch.images.float().mean((1, 2, 3))

    def epoch(batches: TrainBatches, number: int, done: int = 0) -> list[torch.Tensor]:
        trained = trained_epoch(batches, number, mean_pixel, done)
        return [torch.cat([batch.indices, batch.images.flatten()]) for batch in trained]

    uninterrupted = selecting()
    epoch(uninterrupted, 1)
    expected = epoch(uninterrupted, 2)
    interrupted = selecting()
    epoch(interrupted, 1)
    trained_epoch(interrupted, 2, mean_pixel, steps=2)  # two steps of epoch 2, their losses recorded, then a checkpoint
    restored = selecting()
    restored.load_state_dict(interrupted.state_dict())
    resumed = epoch(restored, 2, done=2)
    assert len(resumed) == len(expected) - 2 and all(map(torch.equal, resumed, expected[2:]))
    assert torch.equal(restored.last_loss, uninterrupted.last_loss)


def test_training_from_the_memmap_gives_the_same_weights(tmp_path):
    def trained(loader_kind: str) -> dict[str, torch.Tensor]:
        train = {"recipe": "fast70", "batch_size": 256, "epochs": 1, "loader": loader_kind}
        config = resolve_run_config(
            {"data": {"dataset": "digits", "image_size": 16}, "train": train, "out": str(tmp_path / loader_kind)}
        )
        fit(config, reporter=LineReporter())
        return load_file(str(tmp_path / loader_kind / RunDir.WEIGHTS))

    memory, disk = trained("memory"), trained("disk")
    assert memory.keys() == disk.keys() and all(torch.equal(memory[name], disk[name]) for name in memory)


def test_normalisation_statistics_come_from_a_bounded_seeded_sample(monkeypatch):
    images = pixels(400, 8).images
    whole = channel_statistics(images, "standardize")
    monkeypatch.setattr(transforms_module, "STATISTICS_BYTES", 100 * images[0].nbytes)
    sampled = channel_statistics(images, "standardize")
    assert sampled == channel_statistics(images, "standardize")  # the same sample every time
    assert sampled != whole and np.allclose(sampled.mean, whole.mean, atol=0.02)
    assert np.allclose(sampled.std, whole.std, atol=0.02)


def test_every_family_says_its_recipe_its_grad_cam_layer_and_its_parameter_groups():
    for name, spec in MODELS.items():
        assert spec.default_recipe in RECIPES and resolve_run_config({"train": {"model": name}}).train.model == name
        model = create_model(name, (3, 32, 32), 10)
        layer = model.gradcam_layer()
        assert layer is None or any(layer is module for module in model.modules())
        groups = model.parameter_groups()
        grouped = [id(p) for p in groups.filters + groups.norm_biases + groups.others]
        assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad), name
    assert create_model("tutorial-mlp", (3, 32, 32), 10).gradcam_layer() is None
    assert not create_model("tutorial-cnn", (3, 32, 32), 10).initialises_from_data


def test_a_new_family_is_one_file_and_its_hooks_are_called(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "MODELS", dict(MODELS))  # registered for this test alone
    runpy.run_path(str(Path(__file__).with_name("family_linear.py")))  # the file, as cnnlab.models imports one
    config = resolve_run_config(
        {
            "data": {"dataset": "digits", "image_size": 8},
            "train": {"model": "linear", "epochs": 2},
            "out": str(tmp_path),
        }
    )
    assert config.train.recipe == "tutorial-mlp" and config.train.optim.optimizer == "sgd"
    result = fit(config, reporter=LineReporter())
    model = result.model.module
    assert model.initialised_on[1:] == (1, 8, 8) and model.starts == [1, 2]
    assert load_model(tmp_path).module.layer.weight.shape == (10, 64)


def test_one_evaluation_path_gives_plain_and_delivered_scores(trained_run):
    trained = load_model(trained_run)
    model, norm = trained.module, trained.info.normalization
    test = load_dataset(DataConfig(dataset="digits", image_size=12)).test
    plain, _ = predict_and_score(model, in_order(test.images), test.labels, norm, torch.device("cpu"))
    views = InferenceConfig("flip-translate")
    both, logits = predict_and_score(model, in_order(test.images, 7), test.labels, norm, torch.device("cpu"), views)
    assert isinstance(both, Scores) and both.plain_accuracy == plain.plain_accuracy
    assert both.plain_loss == pytest.approx(plain.plain_loss)
    assert both.delivered_accuracy == pytest.approx((logits.delivered.argmax(1).numpy() == test.labels).mean())
    assert plain.plain_accuracy == pytest.approx(trained.info.metrics["test_plain_accuracy"])
    assert plain.plain_accuracy > 0.5
    entries = {f"test_{kind}_{score}" for kind in ("plain", "delivered") for score in ("loss", "accuracy")}
    entries |= {"test_tta", "test_tta_share"}
    assert set(both.metrics("test")) == set(plain.metrics("test")) == entries
    assert both.tta_share == 1.0 and plain.tta_share == 0.0
    recorded = plain.metrics("test")
    assert (recorded["test_delivered_accuracy"], recorded["test_tta"]) == (
        plain.plain_accuracy,
        "none",
    )  # delivered is plain
    assert Scores.from_metrics(both.metrics("test"), "test") == both  # read back as written


def test_a_checkpoint_of_another_format_is_refused_in_one_line(tmp_path):
    config = resolve_run_config(
        {"data": {"dataset": "digits"}, "train": {"model": "tutorial-cnn", "epochs": 1}, "out": str(tmp_path / "run")}
    )
    fit(config, reporter=LineReporter())
    state = torch.load(tmp_path / "run" / RunDir.CHECKPOINT, weights_only=True)
    torch.save({**state, "format_version": 2}, tmp_path / "run" / RunDir.CHECKPOINT)
    with pytest.raises(CnnlabError, match="checkpoint format 2, and this cnnlab resumes format 3"):
        resume(tmp_path / "run", epochs=2)


def test_every_config_field_has_exactly_one_flag_carrying_its_help():
    commands = {command.name: command for command in typer.main.get_command(app).commands.values()}
    options = {param.name: param for param in commands["train"].params}
    families = {spec.settings for spec in MODELS.values()}
    for config in (DataConfig, TrainConfig, *SECTIONS.values(), *families):
        for field in dataclasses.fields(config):
            if field.name in ("family", *SECTIONS):  # [train]'s tables: their fields have the flags
                continue
            flag = "--" + field.name.replace("_", "-")
            assert options[field.name].opts == [flag], field.name
            assert options[field.name].help == field.metadata["help"], field.name
    out = next(field for field in dataclasses.fields(RunConfig) if field.name == "out")
    assert options["out"].help == out.metadata["help"]


def test_library_errors_name_config_keys_and_the_cli_says_them_as_flags(tmp_path):
    args = ["train", "--model", "tutorial-cnn", "--dataset", "digits", "--unfreeze-epochs", "1"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "error: --unfreeze-epochs follows head-only training; set --head-only" in result.output


def test_a_bare_model_on_the_command_line_trains_with_its_family_recipe(tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            "--model",
            "fast-tiny",
            "--dataset",
            "digits",
            "--epochs",
            "0.2",
            "--out",
            str(run),
            "-q",
            "--no-report",
        ],
    )
    assert result.exit_code == 0, result.output
    config = RunDir(run).read_config().train
    assert (config.recipe, config.optim.optimizer, config.inference.tta, config.augment.low_res) == (
        "fast70",
        "sgd",
        "flip",
        20,
    )


def test_importing_and_reporting_never_picks_a_matplotlib_backend(trained_run):
    code = (
        "import sys, cnnlab.cli, cnnlab.report; from pathlib import Path; "
        f"cnnlab.report.write_run_report(Path({str(trained_run)!r})); "
        "print('matplotlib.pyplot' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_random_resized_crops_are_seeded_batch_operations_and_the_whole_box_is_the_identity():
    images = torch.from_numpy(pixels(6, 8).images)
    assert torch.equal(resized_crops(images, torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 6)), images)
    ramp = torch.arange(8, dtype=torch.uint8).mul(30).view(1, 1, 8, 1).expand(2, 8, 8, 3).contiguous()
    left_half = resized_crops(ramp, torch.tensor([[1.0, 0.5, 0.0, 0.0], [1.0, 0.5, 0.0, 0.5]]))
    assert left_half[0].float().mean() < ramp[0].float().mean() < left_half[1].float().mean()
    boxes = random_crop_boxes(500, 0.35, torch.Generator().manual_seed(0))
    area = boxes[:, 0] * boxes[:, 1]
    assert area.min() >= 0.35 - 1e-6 and area.max() <= 1 and (boxes[:, 2] + boxes[:, 0] <= 1 + 1e-6).all()
    assert torch.equal(boxes, random_crop_boxes(500, 0.35, torch.Generator().manual_seed(0)))
    split = pixels()
    cropping = TrainBatches(
        split, InMemory(split, torch.device("cpu")), AugmentConfig(crop_area=0.5), batch_size=8, seed=3
    )
    assert epoch_batches(cropping, 1)[0][1].shape == (8, 6, 6, 3)
    with pytest.raises(CnnlabError, match=r"train\.crop_area must be more than 0 and at most 1"):
        resolve_run_config({"train": {"crop_area": 0.0}}).check()
