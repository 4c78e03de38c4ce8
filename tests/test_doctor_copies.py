"""The doctor's copy tiers: exact, near-exact and near duplicates (the same photo cropped, scaled, turned,
recoloured or re-encoded), each found and named; a look-alike that is another picture is not a copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cnnlab.config import DataConfig, DoctorConfig
from cnnlab.data import load_dataset
from cnnlab.doctor import Kind, examine
from cnnlab.doctor.copies import REALISTIC, realistic_copy, warped
from cnnlab.doctor.duplicates import calibrate, registered_similarity, views_of

SIZE = 48


def photo(seed: int, label: int) -> np.ndarray:
    """A picture with detail at two scales, like a photo's, and its class's mark (a bright corner)."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).resize((SIZE, SIZE), Image.BICUBIC)
    fine = Image.fromarray(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)).resize((SIZE, SIZE), Image.BILINEAR)
    image = 0.65 * np.asarray(coarse, float) + 0.35 * np.asarray(fine, float)
    image[: SIZE // 4, label * SIZE // 2 : label * SIZE // 2 + SIZE // 4] += 80
    return image.clip(0, 255).astype(np.uint8)


def look_alike(image: np.ndarray, seed: int) -> np.ndarray:
    """Another picture with the same colours: each channel's mean and spread matched to `image`'s."""
    other = photo(seed, 0).astype(float)
    matched = (other - other.mean((0, 1))) / other.std((0, 1)) * image.std((0, 1)) + image.mean((0, 1))
    return matched.clip(0, 255).astype(np.uint8)


# test image name: (the train image it copies, how, the tiers the doctor may name: a mild scale or turn of a smooth
# picture keeps its pixels aligned enough to be near-exact)
PLANTED = {
    "crop": (
        0,
        lambda image: np.asarray(Image.fromarray(image).crop((4, 2, 46, 44)).resize((SIZE, SIZE))),
        "near duplicate",
    ),
    "scale": (1, lambda image: warped(image, 1.1, 0.0), ("near duplicate", "near-exact")),
    "rotation": (2, lambda image: warped(image, 1.0, 4.0), ("near duplicate", "near-exact")),
    "exact": (3, lambda image: image.copy(), ("exact copy",)),
    "shifted": (4, lambda image: np.roll(image, 1, axis=1), ("near-exact",)),
}


@pytest.fixture(scope="module")
def copied(tmp_path_factory):
    root = tmp_path_factory.mktemp("copies") / "data"
    train = {}
    for label in range(2):
        for split, count in (("train", 24), ("test", 6)):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                seed = 1000 * label + i + (500 if split == "test" else 0)
                image = photo(seed, label)
                Image.fromarray(image).save(folder / f"{i:03d}.png")
                if split == "train" and label == 0:
                    train[i] = image
    for name, (source, copy, _) in PLANTED.items():
        Image.fromarray(copy(train[source])).save(root / "test" / "class0" / f"{name}.png")
    Image.fromarray(look_alike(train[5], seed=77)).save(root / "test" / "class0" / "look-alike.png")
    dataset = load_dataset(DataConfig(data=str(root)))
    return dataset, examine(dataset, DoctorConfig(label_model="embeddings"), tmp_path_factory.mktemp("cache"))


def test_each_tier_finds_its_planted_copy_and_names_it(copied):
    _, diagnosis = copied
    leaks = {finding.image.path: finding for finding in diagnosis.of_kind(Kind.LEAK)}
    for name, (source, _, tiers) in PLANTED.items():
        finding = leaks[f"test/class0/{name}.png"]
        assert finding.other is not None and finding.other.path == f"train/class0/{source:03d}.png"
        assert finding.detail.startswith(tiers), (name, finding.detail)
    assert diagnosis.calibration.registered_threshold > 0.8 and diagnosis.calibration.unrelated_above == 0


def test_a_look_alike_is_not_called_a_copy(copied):
    _, diagnosis = copied
    copies = diagnosis.of_kind(Kind.LEAK) + diagnosis.of_kind(Kind.DUPLICATE)
    assert not any("look-alike" in (finding.image.path or "") for finding in copies)
    # The planted copies and nothing else: the pictures are all different.
    assert len(copies) == len(PLANTED)


def test_registration_undoes_each_realistic_way_and_not_another_picture():
    rng = np.random.default_rng(0)
    originals = np.stack([photo(seed, 0) for seed in range(40)])
    _, views = views_of(torch.from_numpy(originals))
    for way in REALISTIC:
        made = np.stack([realistic_copy(image, way, rng) for image in originals])
        assert made.shape == originals.shape and made.dtype == np.uint8
        _, copied_views = views_of(torch.from_numpy(made))
        assert np.median(registered_similarity(views, copied_views)) > 0.95, way
    others = np.roll(views, 1, axis=0)
    assert registered_similarity(views, others).max() < 0.8


def test_the_threshold_rises_above_unrelated_pairs_that_reach_it():
    originals = np.stack([photo(seed, 0) for seed in range(30)])
    _, views = views_of(torch.from_numpy(originals))
    plain = calibrate(originals, views, (views[:5], np.roll(views, 1, axis=0)[:5]), seed=0)
    assert plain.unrelated_above == 0 and plain.registered_threshold == plain.copies_threshold
    assert plain.registered_recall > 0.9 and "none of 5 differently labelled" in plain.said()
    # Copies given as unrelated: the threshold goes above them; near-exact ones are copies, not unrelated pairs.
    turned = np.stack([warped(image, 1.1, 5.0) for image in originals[:5]])
    _, turned_views = views_of(torch.from_numpy(turned))
    raised = calibrate(originals, views, (views[:5], turned_views), seed=0)
    assert raised.unrelated_above >= 1 and raised.registered_threshold > raised.copies_threshold
    assert raised.registered_recall < plain.registered_recall and "raised from" in raised.said()
    assert calibrate(originals, views, (views[:5], views[:5]), seed=0).unrelated == 0
