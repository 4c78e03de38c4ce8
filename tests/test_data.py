from __future__ import annotations

import logging
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cnnlab.config import DataConfig
from cnnlab.data import folder as folder_module
from cnnlab.data import load_dataset
from cnnlab.data.images import decode
from cnnlab.errors import CnnlabError
from tests.conftest import pattern_image, write_image_folder


def folder_config(path: Path, **overrides) -> DataConfig:
    return DataConfig(data=str(path), **overrides)


def test_split_layout_keeps_train_and_test(tmp_path):
    write_image_folder(tmp_path, classes=3, per_class=4, size=12)
    dataset = load_dataset(folder_config(tmp_path))
    assert dataset.classes == ("class0", "class1", "class2")
    assert len(dataset.train) == 12 and len(dataset.test) == 12
    assert dataset.image_shape == (3, 12, 12)
    assert dataset.train.images.dtype == np.uint8 and dataset.train.labels.dtype == np.int64
    # pixels survive PNG round trip exactly
    np.testing.assert_array_equal(dataset.train.images[0], pattern_image(0, 12, 0))


def test_class_only_layout_carves_a_seeded_stratified_test_split(tmp_path):
    write_image_folder(tmp_path, classes=2, per_class=10, split=False)
    first = load_dataset(folder_config(tmp_path, test_fraction=0.3))
    second = load_dataset(folder_config(tmp_path, test_fraction=0.3))
    assert len(first.test) == 6 and np.bincount(first.test.labels).tolist() == [3, 3]
    np.testing.assert_array_equal(first.test.images, second.test.images)
    other_seed = load_dataset(folder_config(tmp_path, test_fraction=0.3, split_seed=1))
    assert not np.array_equal(first.test.images, other_seed.test.images)


def test_validation_split_is_carved_from_train(tmp_path):
    write_image_folder(tmp_path, classes=2, per_class=10)
    dataset = load_dataset(folder_config(tmp_path, val_fraction=0.2))
    assert len(dataset.val) == 4 and len(dataset.train) == 16 and len(dataset.test) == 20
    assert np.bincount(dataset.val.labels).tolist() == [2, 2]


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_archives_of_a_wrapped_folder_load_like_the_folder(tmp_path, kind):
    write_image_folder(tmp_path / "src" / "mydata", classes=2, per_class=3)
    archive = tmp_path / f"mydata.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as z:
            for file in sorted((tmp_path / "src").rglob("*.png")):
                z.write(file, file.relative_to(tmp_path / "src"))
    else:
        with tarfile.open(archive, "w:gz") as t:
            t.add(tmp_path / "src" / "mydata", arcname="mydata")
    from_archive = load_dataset(folder_config(archive))
    from_folder = load_dataset(folder_config(tmp_path / "src" / "mydata"))
    assert from_archive.classes == from_folder.classes
    np.testing.assert_array_equal(from_archive.train.images, from_folder.train.images)
    np.testing.assert_array_equal(from_archive.test.labels, from_folder.test.labels)


def test_archive_member_escaping_the_folder_is_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    payload = tmp_path / "x.png"
    Image.fromarray(pattern_image(0)).save(payload)
    with tarfile.open(archive, "w:gz") as t:
        t.add(payload, arcname="../escape.png")
    with pytest.raises(CnnlabError, match="outside"):
        load_dataset(folder_config(archive))
    absolute = tmp_path / "absolute.tar.gz"
    with tarfile.open(absolute, "w:gz") as t:
        member = tarfile.TarInfo("/tmp/escape.png")  # built by hand: tarfile.add would strip the leading slash
        member.size = payload.stat().st_size
        t.addfile(member, payload.open("rb"))
    with pytest.raises(CnnlabError, match="outside"):
        load_dataset(folder_config(absolute))
    assert not (tmp_path.parent / "escape.png").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "absolute.tar.gz",
        "evil.tar.gz",
        "x.png",
    ]


def test_grayscale_datasets_stay_single_channel_and_mixed_become_rgb(tmp_path):
    for label in range(2):
        (tmp_path / "gray" / f"c{label}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((10, 10), 40 * i + label, np.uint8), "L").save(
                tmp_path / "gray" / f"c{label}" / f"{i}.png"
            )
    gray = load_dataset(folder_config(tmp_path / "gray"))
    assert gray.image_shape == (1, 10, 10)

    Image.fromarray(np.zeros((10, 10, 4), np.uint8), "RGBA").save(tmp_path / "gray" / "c0" / "rgba.png")
    mixed = load_dataset(folder_config(tmp_path / "gray"))
    assert mixed.image_shape == (3, 10, 10)


def test_modes_are_converted_consistently(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=100)
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.dstack([rgb, np.full((8, 8), 128, np.uint8)]), "RGBA").save(tmp_path / "rgba.png")
    assert decode(tmp_path / "cmyk.jpg", "cmyk", None, 3).shape == (8, 8, 3)
    assert decode(tmp_path / "palette.png", "p", None, 3).shape == (8, 8, 3)
    np.testing.assert_array_equal(decode(tmp_path / "rgba.png", "rgba", None, 3), rgb)  # alpha dropped


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    wide = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    np.testing.assert_array_equal(decode(tmp_path / "wide.png", "wide", None, 1)[..., 0], [[0, 100, 255]])


def test_exif_orientation_is_applied(tmp_path):
    image = Image.fromarray(np.zeros((4, 8, 3), np.uint8))  # 8 wide, 4 high
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert decode(tmp_path / "rotated.jpg", "r", None, 3).shape == (8, 4, 3)


def test_default_size_is_the_most_common_and_image_size_overrides(tmp_path):
    write_image_folder(tmp_path, classes=2, per_class=3, size=12)
    Image.fromarray(pattern_image(0, 20)).save(tmp_path / "train" / "class0" / "big.png")
    assert load_dataset(folder_config(tmp_path)).image_shape == (3, 12, 12)
    assert load_dataset(folder_config(tmp_path, image_size=16)).image_shape == (3, 16, 16)


def test_unreadable_files_are_skipped_with_one_warning_or_refused_when_strict(tmp_path, caplog):
    write_image_folder(tmp_path, classes=2, per_class=3)
    (tmp_path / "train" / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "train" / "class1" / "notes.txt").write_text("hello")
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        dataset = load_dataset(folder_config(tmp_path))
    assert len(dataset.train) == 6
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "skipped 2 of 14" in warnings[0] and "broken.png" in warnings[0]
    with pytest.raises(CnnlabError, match=r"\(data\.strict\)"):
        load_dataset(folder_config(tmp_path, strict=True))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: root / "missing", "no such file"),
        (lambda root: root, "empty"),
        (lambda root: write_image_folder(root, classes=1, per_class=3, split=False), "only one class"),
        (lambda root: (Image.fromarray(pattern_image(0)).save(root / "a.png"), root)[1], "no class folders"),
    ],
)
def test_bad_folders_get_a_one_line_error_naming_the_path(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(CnnlabError, match=message) as caught:
        load_dataset(folder_config(path))
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_second_load_comes_from_the_cache_and_changes_invalidate_it(tmp_path, monkeypatch):
    write_image_folder(tmp_path / "data", classes=2, per_class=3)
    config = folder_config(tmp_path / "data", cache_dir=str(tmp_path / "cache"))
    first = load_dataset(config)
    calls = []
    original = folder_module._decode_dataset
    monkeypatch.setattr(folder_module, "_decode_dataset", lambda *a: calls.append(1) or original(*a))
    second = load_dataset(config)
    assert calls == [] and list((tmp_path / "cache" / "decoded").iterdir())
    np.testing.assert_array_equal(first.train.images, second.train.images)
    shutil.copy(tmp_path / "data" / "train" / "class0" / "000.png", tmp_path / "data" / "train" / "class0" / "new.png")
    assert len(load_dataset(config).train) == 7 and calls == [1]


def test_digits_is_upsampled_to_32_by_default_and_kept_native_on_request():
    dataset = load_dataset(DataConfig(dataset="digits"))
    assert dataset.image_shape == (1, 32, 32) and len(dataset.train) + len(dataset.test) == 1797
    assert len(dataset.classes) == 10
    assert load_dataset(DataConfig(dataset="digits", image_size=8)).image_shape == (1, 8, 8)


def test_unknown_dataset_and_conflicting_sources_are_refused():
    with pytest.raises(CnnlabError, match="known: digits"):
        load_dataset(DataConfig(dataset="imagenet"))
    with pytest.raises(CnnlabError, match="exactly one"):
        load_dataset(DataConfig(dataset="digits", data="x"))
