"""The speed-run pieces: batch augmentations, whitening init, TTA, schedules, and a tiny fast run."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cnnlab.bench import MARKS, format_ratio, format_result, mean_pixel_share, ratios, summarise, with_seeds
from cnnlab.config import InferenceConfig
from cnnlab.data.augment import (
    alternating_flips,
    jittered,
    mirror,
    random_jitter,
    random_shifts,
    resolution_at,
    translate,
)
from cnnlab.data.transforms import channel_statistics, downscaled
from cnnlab.errors import CnnlabError, ConfigError
from cnnlab.models import create_model
from cnnlab.models.families.fast import WHITEN_KERNEL
from cnnlab.models.inference import Scores, tta_logits, views
from cnnlab.recipes import resolve_run_config
from cnnlab.runs import ChildRun
from cnnlab.train import fit, phases
from cnnlab.train.fit import check_settings
from cnnlab.train.optim import Muon, make_optimizer, make_schedule, orthogonalized
from cnnlab.train.reporter import LineReporter


def images(count: int = 6, size: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randint(
        0, 256, (count, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_translate_matches_a_reflect_padded_crop_and_repeats_under_a_seed():
    batch, shift = images(), 2
    offsets = random_shifts(len(batch), shift, torch.Generator().manual_seed(7))
    assert offsets.abs().max() <= shift and torch.equal(
        offsets, random_shifts(len(batch), shift, torch.Generator().manual_seed(7))
    )
    out = translate(batch, offsets)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    padded = np.pad(batch.numpy(), ((0, 0), (shift, shift), (shift, shift), (0, 0)), mode="reflect")
    for i, (dy, dx) in enumerate(offsets.tolist()):
        expected = padded[i, shift + dy : shift + dy + 8, shift + dx : shift + dx + 8]
        np.testing.assert_array_equal(out[i].numpy(), expected)
    assert not torch.equal(out, translate(batch, random_shifts(len(batch), shift, torch.Generator().manual_seed(8))))


def test_mirror_flips_exactly_the_masked_images():
    batch = images()
    mask = torch.tensor([True, False, True, False, False, True])
    out = mirror(batch, mask)
    for i, flipped in enumerate(mask.tolist()):
        assert torch.equal(out[i], batch[i].flip(1) if flipped else batch[i])


def test_color_jitter_shifts_then_scales_each_image_within_its_range():
    draws = random_jitter(1000, 0.15, torch.Generator().manual_seed(3))
    assert torch.equal(draws, random_jitter(1000, 0.15, torch.Generator().manual_seed(3)))
    shift, scale = draws.unbind(1)
    assert shift.abs().max() <= 0.15 and (scale - 1).abs().max() <= 0.15 and shift.std() > 0.05
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 2, 2)
    out = jittered(x.clone(), torch.tensor([[0.1, 1.2], [-0.2, 0.9]]))
    torch.testing.assert_close(out, torch.stack([(x[0] + 0.1) * 1.2, (x[1] - 0.2) * 0.9]))


def test_alternating_flips_show_every_image_both_ways_over_two_epochs():
    base = torch.rand(100, generator=torch.Generator().manual_seed(0)) < 0.5
    odd, even = alternating_flips(base, 1), alternating_flips(base, 2)
    assert torch.equal(odd, ~even) and torch.equal(odd, alternating_flips(base, 3))


@pytest.mark.parametrize("name", ["fast-small", "fast-tiny-linear"])
def test_whitening_init_makes_the_patch_covariance_close_to_identity(name):
    model = create_model(name, (3, 16, 16), 10)
    mixing = torch.tensor([[1.0, 0.8, 0.6], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    data = torch.einsum("nchw,dc->ndhw", torch.randn(400, 3, 16, 16), mixing) * 3  # correlated channels
    model.init_from_data(data)
    half = 12  # the directions; after them, without the linear stem, the negated filters
    assert model.whiten.weight.shape[0] == (half if name == "fast-tiny-linear" else 2 * half)
    filters = model.whiten.weight[:half].reshape(half, -1)  # (12, C*k*k)
    patches = data.unfold(2, WHITEN_KERNEL, 1).unfold(3, WHITEN_KERNEL, 1).permute(0, 2, 3, 1, 4, 5).reshape(-1, 12)
    whitened = patches @ filters.T
    covariance = whitened.T @ whitened / len(whitened)
    torch.testing.assert_close(covariance, torch.eye(half), atol=0.02, rtol=0)
    if name == "fast-small":
        torch.testing.assert_close(model.whiten.weight[half:], -model.whiten.weight[:half])


def test_the_linear_stem_feeds_the_whitened_directions_to_the_first_block_as_they_are():
    model = create_model("fast-tiny-linear", (3, 16, 16), 10).eval()
    model.init_from_data(torch.randn(50, 3, 16, 16))
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda _, inputs: seen.append(inputs[0]))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        model(x)
        torch.testing.assert_close(seen[0], model.whiten(x))  # (4, 12, 15, 15): no GELU between
    assert seen[0].shape == (4, 12, 15, 15) and (seen[0] < 0).any()


def test_tta_is_the_weighted_mean_of_its_views():
    model = create_model("fast-small", (3, 16, 16), 10).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():

        def mirrored(v):
            return (model(v) + model(v.flip(-1))) / 2

        padded = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="reflect")
        expected = mirrored(x) / 2 + (mirrored(padded[..., :16, :16]) + mirrored(padded[..., 2:, 2:])) / 4
        torch.testing.assert_close(tta_logits(model, x, InferenceConfig("flip-translate")), expected)
        torch.testing.assert_close(tta_logits(model, x, InferenceConfig("flip")), mirrored(x))


def test_selective_tta_equals_full_tta_on_the_images_it_covers_and_the_plain_logits_elsewhere():
    model = create_model("fast-small", (3, 16, 16), 10).eval()
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(x)
        confidence = torch.softmax(plain, 1).amax(1)
        below = confidence.median().item()  # half the images are less sure than this
        one, delivered, viewed = views(model, x, InferenceConfig("flip-translate", below))
        full = tta_logits(model, x, InferenceConfig("flip-translate"))
        traced = tta_logits(model, x, InferenceConfig("flip-translate", below))  # what export computes
        sure_of_all = tta_logits(model, x, InferenceConfig("flip-translate", 0.0))
    assert torch.equal(viewed, confidence < below) and 0 < viewed.sum() < len(x)
    torch.testing.assert_close(one, plain)
    torch.testing.assert_close(delivered[viewed], full[viewed])
    assert torch.equal(delivered[~viewed], plain[~viewed])
    torch.testing.assert_close(traced, delivered)
    assert torch.equal(sure_of_all, plain)
    _, everything, all_viewed = views(model, x, InferenceConfig("flip-translate", 1.0))
    assert all_viewed.all()
    torch.testing.assert_close(everything, full)


def test_progressive_resizing_rises_from_the_low_size_to_full_size_in_steps_of_four_pixels():
    config = resolve_run_config({"train": {"recipe": "fast70", "low_res": 16, "low_res_share": 0.5}}).train.augment
    sizes = [resolution_at(step, 100, config, (32, 32)) for step in range(100)]
    sides = [height for height, _ in sizes]
    assert sides[0] == 16 and all(side == 32 for side in sides[50:]) and sides == sorted(sides)
    assert set(sides) == {16, 20, 24, 28, 32} and all(height == width for height, width in sizes)
    assert resolution_at(0, 100, config, (32, 48)) == (16, 24)  # the shorter side; the aspect ratio kept
    off = resolve_run_config({"train": {"recipe": "fast70", "low_res": 0}}).train.augment
    assert {resolution_at(step, 100, off, (32, 32)) for step in range(100)} == {(32, 32)}


@pytest.mark.parametrize(
    "wrong",
    [
        *({"low_res": 4}, {"low_res": 16, "low_res_share": 0.0}, {"tta_below": 0.0}, {"tta_below": 1.5}),
        *({"select_share": 0.0}, {"select_share": 1.5}, {"select_share": 0.5, "head_only": True}),
    ],
)
def test_sizes_and_thresholds_that_cannot_work_are_refused_naming_their_keys(wrong):
    config = resolve_run_config({"train": {"recipe": "fast70", **wrong}})
    with pytest.raises(ConfigError, match=f"train.{next(iter(wrong))}"):
        config.check()
        check_settings(config.train, world_size=1)


def test_triangle_schedule_rises_to_the_peak_then_falls_to_the_end_value():
    config = resolve_run_config({"train": {"recipe": "airbench94"}}).train.optim
    model = create_model("fast-tiny", (3, 16, 16), 10)
    optimizer = make_optimizer(model, model.parameter_groups(), config)
    schedule = make_schedule(optimizer, config, total_steps=100)
    factors = []
    for _ in range(100):
        factors.append(optimizer.param_groups[0]["lr"] / config.lr)
        optimizer.step()
        schedule.step()
    factors.append(optimizer.param_groups[0]["lr"] / config.lr)
    assert factors[0] == pytest.approx(config.lr_start) and max(factors) == pytest.approx(1.0)
    assert factors.index(max(factors)) == round(config.peak_fraction * 100) and factors[-1] == pytest.approx(
        config.lr_end
    )
    # BatchNorm biases learn faster, with the same decay per step
    biases = optimizer.param_groups[1]
    assert biases["lr"] / optimizer.param_groups[0]["lr"] == pytest.approx(config.bias_lr_scale)
    assert biases["lr"] * biases["weight_decay"] == pytest.approx(config.lr * factors[-1] * config.weight_decay)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_orthogonalized_updates_have_all_singular_values_near_one(dtype):
    for shape in ((64, 216), (300, 40)):  # wide and tall
        matrix = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * torch.logspace(-1, 0, shape[1])
        assert orthogonalized(matrix, dtype).dtype == dtype
        singular = torch.linalg.svdvals(orthogonalized(matrix, dtype).float())
        assert singular.min() > 0.5 and singular.max() < 1.5, singular
        # the same directions: U V^T of the input, up to the iteration's inexact singular values
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        approximation = orthogonalized(matrix, dtype).float().flatten()
        assert torch.nn.functional.cosine_similarity(approximation, (u @ vh).flatten(), 0) > 0.9


def test_muon_orthogonalises_the_filters_and_steps_the_rest_as_sgd():
    config = resolve_run_config({"train": {"recipe": "fast90", "optimizer": "muon", "momentum": 0.0}}).train.optim
    model = create_model("fast-tiny", (3, 16, 16), 10)
    optimizer = make_optimizer(model, model.parameter_groups(), config, torch.bfloat16)
    assert isinstance(optimizer, Muon)
    conv, head = model.blocks[0].conv1.weight, model.head.weight
    for parameter in model.parameters():
        parameter.grad = torch.randn_like(parameter) if parameter.requires_grad else None
    head_before, head_gradient = head.detach().clone(), head.grad.clone()
    conv_before, conv_gradient = conv.detach().clone(), conv.grad.clone()
    optimizer.step()
    # the head: a plain SGD step with coupled weight decay
    expected = head_before - config.lr * (head_gradient + config.weight_decay * head_before)
    torch.testing.assert_close(head.detach(), expected)
    # a filter bank: rescaled to norm sqrt(out channels), then moved by lr times its orthogonalised gradient
    rescaled = conv_before * len(conv) ** 0.5 / conv_before.norm()
    step = orthogonalized(conv_gradient.reshape(len(conv), -1), torch.bfloat16).float().view_as(conv)
    # (to one bf16 rounding of the orthogonalised step, whose last bit varies with the matmul's blocking)
    torch.testing.assert_close(conv.detach(), rescaled - config.muon_lr * step, atol=config.muon_lr / 2**6, rtol=0)


def test_channel_statistics_standardise_each_channel():
    pixels = np.stack([np.full((4, 4), v, np.uint8) for v in (0, 255)] * 5)[..., None].repeat(3, -1)
    norm = channel_statistics(pixels, "standardize")
    assert norm.mean == pytest.approx((0.5,) * 3) and norm.std == pytest.approx((0.5,) * 3)


def test_a_tiny_fast_run_on_digits_beats_90_percent(tmp_path, monkeypatch):
    config = resolve_run_config(
        {
            "data": {"dataset": "digits"},
            "train": {"recipe": "fast70", "epochs": 6, "batch_size": 128, "lr": 0.2, "low_res": 12, "tta_below": 0.5},
            "out": str(tmp_path / "run"),
        }
    )
    seen = []  # the input sizes the training steps see
    monkeypatch.setattr(phases, "downscaled", lambda x, size: seen.append(size) or downscaled(x, size))
    trims = []  # the heap handed back to the OS at each change of size, and around each epoch's evaluation
    monkeypatch.setattr(phases, "release_freed_memory", lambda: trims.append(len(seen)))
    result = fit(config, reporter=LineReporter())
    assert seen[0] == (12, 12) and seen[-1] == (32, 32) and seen == sorted(seen)
    assert len(trims) == len(set(seen)) - 1 + 2 * len(result.history)
    assert result.history[-1]["test_delivered_accuracy"] > 0.90
    assert 0 < result.history[-1]["test_tta_share"] < 1  # selective TTA: the less sure share of the test split
    first, last = result.history[0], result.history[-1]
    assert first["init_seconds"] > 0 and "init_seconds" not in last  # the whitening, timed once
    assert all(m["test_seconds"] > 0 for m in result.history)


def test_bench_counts_every_epoch_trained_and_reports_the_epoch_the_run_kept():
    def line(epoch, plain, delivered, **more):
        scores = Scores("flip", 1.0, plain, 1.0, delivered, 0.5).metrics("test")
        return {"epoch": epoch, "seconds": 10.0, "images_per_s": 100.0, "precision": "fp32", **scores, **more}

    history = [
        line(1, 0.6, 0.72, test_seconds=2.0, init_seconds=1.5),
        line(2, 0.8, 0.91, test_seconds=2.5),
        line(3, 0.7, 0.75, test_seconds=2.0),
    ]
    config = resolve_run_config({"train": {"recipe": "fast70"}})
    run = ChildRun(config, history, history[1] | {"best_epoch": 2}, 1.0)  # early stopping kept epoch 2
    result = summarise(run, 0, 1e6, {"fp32_peak_gflops": 1.0})
    assert (result.kept_epoch, result.scores.delivered_accuracy, result.scores.plain_accuracy) == (2, 0.91, 0.8)
    assert result.train_seconds == 30.0 and result.delivered_seconds == 1.5 + 30.0 + 2.5
    assert result.train_time_to["0.70"] == 10.0 and result.time_to["0.70"] == 1.5 + 10.0 + 2.0
    assert result.time_to["0.90"] == 24.0 and result.time_to["0.93"] is None  # marks use the TTA accuracy
    written = result.to_dict()  # bench.json's row: the scores by the one pair of names
    assert (written["delivered_accuracy"], written["plain_accuracy"], written["kept_epoch"]) == (0.91, 0.8, 2)
    assert "accuracy 0.9100 (with flip TTA on the 50% least sure; 0.8000 without) (epoch 2)" in format_result(result)


def test_bench_counts_the_networks_flops_only_on_the_epochs_that_trained_on_images():
    def line(epoch, phase, seconds):
        scores = Scores("none", 1.0, 0.9, 1.0, 0.9, 0.0).metrics("test")
        return {"epoch": epoch, "phase": phase, "seconds": seconds, "images_per_s": 100.0, "precision": "fp32"} | scores

    config = resolve_run_config({"train": {"recipe": "finetune"}})
    head_only = [line(1, "head", 0.1), line(2, "head", 0.1)]
    result = summarise(ChildRun(config, head_only, head_only[-1], 1.0), 0, 1e9, {"fp32_peak_gflops": 100.0})
    assert result.gflops is None and "GFLOP/s not counted (the head trained on cached features)" in format_result(
        result
    )
    unfrozen = [*head_only, line(3, "unfreeze", 10.0)]
    result = summarise(ChildRun(config, unfrozen, unfrozen[-1], 1.0), 0, 1e9, {"fp32_peak_gflops": 100.0})
    assert result.gflops == pytest.approx(100.0) and result.fraction_of_peak == pytest.approx(1.0)  # 1e9 x 100 / s


def test_bench_ratios_are_of_means_over_seeds_and_only_for_marks_every_run_reached():
    def run(recipe, delivered, to_90):
        marks = {f"{mark:.2f}": None for mark in MARKS} | {"0.70": delivered / 2, "0.90": to_90}
        return SimpleNamespace(recipe=recipe, delivered_seconds=delivered, time_to=marks)

    results = [run("base", 100.0, 80.0), run("base", 120.0, 100.0), run("fast", 30.0, 27.0), run("fast", 36.0, None)]
    (row,) = ratios(results, ["fast"], ["base"])
    assert row["delivered"] == pytest.approx(33.0 / 110.0)
    assert row["time_to"]["0.70"] == pytest.approx(16.5 / 55.0)
    assert row["time_to"]["0.90"] is None  # one fast run never reached 90%: no mean to compare
    assert format_ratio(row) == "fast / base: delivered 0.300x; to 70% 0.300x"
    assert with_seeds("fast94:3", 1) == ("fast94", 3) and with_seeds("fast70", 2) == ("fast70", 2)
    with pytest.raises(CnnlabError, match="at least 1"):
        with_seeds("fast94:0", 1)


def test_the_flops_a_run_is_credited_with_follow_the_sizes_its_steps_see():
    def share(**augment):
        return mean_pixel_share(resolve_run_config({"train": {"recipe": "fast94", **augment}}).train.augment, (32, 32))

    assert share(low_res=0) == 1.0  # full size throughout
    assert share() == pytest.approx(0.5 * 28**2 / 32**2 + 0.5, abs=0.01)  # fast94: 28 px for half the steps
    # 16 px rising to 32 over the whole run in 4 px steps: 16, 20, 24 and 28 px for a quarter of the steps each
    expected = (16**2 + 20**2 + 24**2 + 28**2) / 4 / 32**2
    assert share(low_res=16, low_res_share=1.0) == pytest.approx(expected, abs=0.01)


def test_a_fractional_epoch_trains_part_of_the_last_epoch(tmp_path):
    config = resolve_run_config(
        {
            "data": {"dataset": "digits", "image_size": 12},
            "train": {"model": "tutorial-cnn", "epochs": 1.5},
            "out": str(tmp_path / "run"),
        }
    )
    history = fit(config, reporter=LineReporter()).history
    assert [m["epoch"] for m in history] == [1, 2]
    assert history[1]["images_per_s"] * history[1]["seconds"] == pytest.approx(23 * 32, rel=0.01)  # 23 of 45 steps
