"""Label files: every shape read and said, the careless files read or refused in one line, and a folder labelled
by a file giving the same dataset, and the same weights, as the same images in class folders."""

from __future__ import annotations

import json
import logging
import shutil
import tarfile

import numpy as np
import pytest
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.data import DataConfig, load_dataset
from cnnlab.data.labels import named_classes, read_label_file
from cnnlab.errors import CnnlabError
from cnnlab.recipes import resolve_run_config
from cnnlab.train import fit
from cnnlab.train.reporter import LineReporter
from tests.conftest import SHARED_CIFAR, write_image_folder

FILES = ["a.jpg", "b.jpg", "c.png", "sub/d.jpg"]


def table_of(tmp_path, name, text, files=FILES, **options):
    label_file = tmp_path / name
    label_file.write_text(text) if isinstance(text, str) else label_file.write_bytes(text)
    return read_label_file(label_file, files, **options)


def labels_of(table):
    return {row.path: row.labels for row in table.rows}


@pytest.mark.parametrize(
    ("name", "text", "said"),
    [
        ("l.csv", "file,label\na.jpg,cat\nb.jpg,dog\nc.png,cat\nsub/d.jpg,dog\n", "CSV, one row per line"),
        ("l.tsv", "image\tclass\na.jpg\tcat\nb.jpg\tdog\nc.png\tcat\nsub/d.jpg\tdog\n", "TSV"),
        ("l.csv", "\ufeffpath;label\r\na.jpg;cat\r\nb.jpg;dog\r\nc.png;cat\r\nsub/d.jpg;dog\r\n\r\n\r\n", "';'"),
        ("l.csv", "id,label\na,cat\nb,dog\nc,cat\nsub/d,dog\n", "paths in 'id'"),  # IDs resolve by stem
        ("l.csv", "filename,breed\na.jpg,cat\nb.jpg,dog\nc.png,cat\nsub/d.jpg,dog\n", "labels in 'breed'"),
        (
            "l.csv",
            "Filenames,labels\r\na.jpg,cat\r\nb.jpg,dog\r\nc.png,cat\r\nsub/d.jpg,dog\r\n",
            "paths in 'Filenames'",
        ),
        ("l.json", json.dumps([{"image": f, "label": c} for f, c in zip(FILES, "cdcd", strict=True)]), "JSON list"),
        ("l.json", json.dumps(dict(zip(FILES, ["c", "d", "c", "d"], strict=True))), "JSON object"),
        (
            "l.jsonl",
            "".join(json.dumps({"file": f, "labels": [c]}) + "\n" for f, c in zip(FILES, "cdcd", strict=True)),
            "JSON lines",
        ),
    ],
)
def test_every_single_label_shape_is_read_and_said(tmp_path, name, text, said):
    table = table_of(tmp_path, name, text)
    assert said in table.reading and "4 images" in table.reading and not table.multi_label
    assert [row.path for row in table.rows] == FILES  # the file's order, each by the folder's own path
    assert len(table.classes) == 2 and {len(labels) for labels in labels_of(table).values()} == {1}


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("path,labels\na.jpg,sea sunset\nb.jpg,sea\nc.png,sunset\nsub/d.jpg,\n", "split at ' '"),
        ('Filenames,labels\r\na.jpg,"sea, sunset"\r\nb.jpg,sea\r\nc.png,sunset\r\nsub/d.jpg,\r\n', "split at ','"),
        ('path,labels\na.jpg,sea;sunset\nb.jpg,sea\nc.png,"[""sunset""]"\nsub/d.jpg,"[]"\n', "split at ';'"),
        ("path,sea,sunset\na.jpg,1,1\nb.jpg,1,0\nc.png,0,1\nsub/d.jpg,0,0\n", "as 2 0/1 columns"),
        ("path,label\na.jpg,sea\na.jpg,sunset\nb.jpg,sea\nc.png,sunset\nsub/d.jpg,sea\n", "long form"),
    ],
)
def test_several_labels_per_image_are_read_in_each_shape(tmp_path, text, said):
    table = table_of(tmp_path, "l.csv", text)
    assert table.multi_label and said in table.reading, table.reading
    assert labels_of(table)["a.jpg"] == ("sea", "sunset") and table.classes == ("sea", "sunset")


def test_a_split_column_is_kept_and_numeric_labels_stay_names(tmp_path):
    table = table_of(
        tmp_path, "l.csv", "path,label,split\na.jpg,1,train\nb.jpg,2,val\nc.png,1,test\nsub/d.jpg,2,TRAIN\n"
    )
    assert [row.split for row in table.rows] == ["train", "val", "test", "train"] and table.classes == ("1", "2")


@pytest.mark.parametrize(
    ("text", "refused"),
    [
        ("path,label\n/etc/a.jpg,cat\nb.jpg,dog\n", "absolute path"),
        ("path,label\n../a.jpg,cat\nb.jpg,dog\n", "leads out of the data folder"),
        ("path,file,label\na.jpg,b.jpg,cat\nb.jpg,a.jpg,dog\n", "2 columns could hold the paths (path, file)"),
        ("path,label,cat,dog\na.jpg,cat,0,1\nb.jpg,dog,0,1\n", "from 'label' or from the 0/1 columns cat, dog"),
        ("path,cat,dog\na.jpg,1,0\na.jpg,0,1\nb.jpg,0,1\n", "1 image(s) on several rows that disagree: a.jpg"),
        ("path,label,split\na.jpg,cat,train\nb.jpg,dog,holdout\n", "split 'holdout' is none of train, val, test"),
        ("path,label,excluded\na.jpg,cat,0\nb.jpg,dog,maybe\n", "excluded 'maybe' is none of 0, 1"),
        ("path,label\n", "no rows"),
        ("path,label\na.jpg,cat\nb.jpg,cat\n", "1 label(s) (cat); a classifier needs at least two"),
        ("path,when,where\na.jpg,x,y\n", "no label column among when, where; name it with --label-column"),
        ("path,label\nx,cat\nb.jpg,dog\n", "1 ID(s) match several files: x (x.jpg, x.png)"),
    ],
)
def test_a_file_that_could_be_misread_is_refused_in_one_line(tmp_path, text, refused):
    with pytest.raises(CnnlabError, match=None) as raised:
        table_of(tmp_path, "l.csv", text, files=[*FILES, "x.jpg", "x.png"])
    message = str(raised.value)
    assert refused in message and "\n" not in message, message


def test_a_label_file_of_another_format_or_none_at_all_is_refused(tmp_path):
    with pytest.raises(CnnlabError, match=r"a label file is \.csv, \.tsv, \.json, \.jsonl; not \.xlsx"):
        table_of(tmp_path, "l.xlsx", "path,label\n")
    with pytest.raises(CnnlabError, match="no such label file"):
        read_label_file(tmp_path / "missing.csv", FILES)
    with pytest.raises(CnnlabError, match="not valid JSON"):
        table_of(tmp_path, "l.json", "[{")


def test_careless_rows_are_left_out_with_counts_and_examples_or_refused_when_strict(tmp_path, caplog):
    text = "path,label\na.jpg,cat\nb.jpg,dog\nb.jpg,dog\ngone1.jpg,cat\ngone2.jpg,dog\nc.png,\n"
    with caplog.at_level(logging.WARNING, logger="cnnlab"):
        table = table_of(tmp_path, "l.csv", text)
    assert labels_of(table) == {"a.jpg": ("cat",), "b.jpg": ("dog",)}  # the identical row merged
    assert "2 rows whose image is not in the folder, left out: gone1.jpg, gone2.jpg" in caplog.text
    assert "1 rows with no label" in caplog.text and "c.png" in caplog.text
    # c.png is named, without a label: said once, as such, not again as a file the label file does not name
    assert "1 files in the folder that the label file does not name, left out: sub/d.jpg" in caplog.text
    with pytest.raises(CnnlabError, match=r"2 rows whose image is not in the folder \(data.strict\)"):
        table_of(tmp_path, "l.csv", text, strict=True)


def flattened(folder, flat):
    """The class-folder dataset `folder` as one folder of files and a labels.csv naming each one's class and split,
    in the order the folder layout reads them."""
    flat.mkdir()
    rows = ["file,label,split"]
    for image in sorted(folder.rglob("*.png")):
        split, label = image.parent.parent.name, image.parent.name
        name = f"{split}-{label}-{image.name}"
        shutil.copy(image, flat / name)
        rows.append(f"{name},{label},{split}")
    (flat / "labels.csv").write_text("\n".join(rows) + "\n")
    return flat / "labels.csv"


def cifar_subset(root, per_class):
    """The first `per_class` images (by name) of each class of each split of the shared CIFAR-10 png copy."""
    with tarfile.open(SHARED_CIFAR) as archive:
        members = sorted((m for m in archive.getmembers() if m.name.endswith(".png")), key=lambda m: m.name)
        taken = {}
        for member in members:
            split, label = member.name.split("/")[-3:-1]
            if taken.setdefault((split, label), 0) < per_class:
                taken[split, label] += 1
                target = root / split / label / member.name.rsplit("/", 1)[1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(member).read())
    return root


@pytest.mark.parametrize(
    "source",
    [
        "patterns",
        pytest.param(
            "cifar10-png",
            marks=pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason=f"real CIFAR-10 not found at {SHARED_CIFAR}"),
        ),
    ],
)
def test_a_label_file_gives_the_same_arrays_and_weights_as_class_folders(tmp_path, source):
    """The same images in class folders, and flattened into one folder with a labels.csv: the same arrays in the
    same order, and bitwise the same weights after training (CIFAR-10: 40 images of each class and split)."""
    if source == "patterns":
        folder = write_image_folder(tmp_path / "folders", classes=3, per_class=10, size=12)
    else:
        folder = cifar_subset(tmp_path / "folders", per_class=40)
    labels = flattened(folder, tmp_path / "flat")
    by_folders = load_dataset(DataConfig(data=str(folder)))
    by_file = load_dataset(DataConfig(data=str(tmp_path / "flat"), labels=str(labels)))
    assert by_file.classes == by_folders.classes and "labels.csv: CSV" in by_file.layout
    for name in ("train", "test"):
        mine, theirs = getattr(by_file, name), getattr(by_folders, name)
        assert np.array_equal(np.asarray(mine.images), np.asarray(theirs.images))
        assert np.array_equal(mine.labels, theirs.labels)
    weights = []
    for data, file in ((folder, None), (tmp_path / "flat", labels)):
        layer = {
            "data": {"data": str(data), "labels": str(file) if file else None},
            "out": str(tmp_path / f"r{len(weights)}"),
        }
        config = resolve_run_config(layer | {"train": {"model": "tutorial-cnn", "epochs": 1}})
        weights.append(fit(config, reporter=LineReporter()).model.module.state_dict())
    assert all(np.array_equal(weights[0][key].numpy(), weights[1][key].numpy()) for key in weights[0])


def test_train_with_a_label_file_says_how_it_read_it_and_when_it_reads_several_labels_per_image(tmp_path):
    folder = write_image_folder(tmp_path / "folders", classes=2, per_class=8, size=12)
    labels = flattened(folder, tmp_path / "flat")
    runner = CliRunner()
    args = ["train", "--model", "tutorial-cnn", "--data", str(tmp_path / "flat"), "--labels", str(labels), "-q"]
    trained = runner.invoke(app, [*args, "--epochs", "1", "--no-report", "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    written = (tmp_path / "run" / "data.csv").read_text().splitlines()  # what the run trained and was scored on
    assert (
        written[0] == "path,label,split" and len(written) == 1 + 32 and "train-class0-000.png,class0,train" in written
    )
    assert (
        "labels.csv: CSV, one row per line, 32 images; paths in 'file', labels in 'label', splits in 'split'"
        in trained.output
    )
    # A second row for an image reads as the long form: that image has two labels, and the data is multi-label.
    (tmp_path / "flat" / "labels.csv").write_text(labels.read_text() + "train-class0-000.png,class1,train\n")
    multi = runner.invoke(app, [*args, "--epochs", "1", "--no-report", "--out", str(tmp_path / "run2")])
    assert multi.exit_code == 0 and "multi-label (images with other than one label: 1)" in multi.output, multi.output
    assert "train-class0-000.png,class0;class1,train" in (tmp_path / "run2" / "data.csv").read_text()
    named = runner.invoke(app, ["train", "--dataset", "digits", "--labels", str(labels), "--out", str(tmp_path / "r3")])
    assert (
        named.exit_code == 2 and "data.labels" not in named.output and "--labels labels an image folder" in named.output
    )


def test_a_label_file_labels_an_archive_through_its_top_folder(tmp_path):
    folder = write_image_folder(tmp_path / "folders", classes=2, per_class=6, size=12)
    labels = flattened(folder, tmp_path / "flat")
    shutil.move(labels, tmp_path / "labels.csv")  # beside the archive, naming the files as inside flat/
    archive = shutil.make_archive(str(tmp_path / "flat"), "zip", tmp_path, "flat")
    dataset = load_dataset(DataConfig(data=archive, labels=str(tmp_path / "labels.csv")))
    assert (len(dataset.train), len(dataset.test), dataset.classes) == (12, 12, ("class0", "class1"))


SCENES = SHARED_CIFAR.with_name("scenes-miml.tar.gz")


@pytest.mark.skipif(not SCENES.is_file(), reason=f"scenes-miml not found at {SCENES}")
def test_the_two_label_file_shapes_of_scenes_miml_say_the_same(tmp_path):
    with tarfile.open(SCENES) as archive:
        archive.extractall(tmp_path, [m for m in archive.getmembers() if m.name.endswith(".csv")], filter="data")
    files = [f"{n}.jpg" for n in range(1, 2001)]
    one_hot, long_form = (read_label_file(tmp_path / "scenes" / f"miml_labels_{n}.csv", files) for n in (1, 2))
    assert one_hot.rows == long_form.rows and one_hot.classes == ("desert", "mountains", "sea", "sunset", "trees")
    counts = np.bincount([len(row.labels) for row in one_hot.rows])
    assert counts.tolist() == [0, 1543, 442, 15]  # as the data's README counts them
    assert "5 0/1 columns" in one_hot.reading and "split at ','" in long_form.reading


def test_class_names_rename_a_files_labels_each_once(tmp_path):
    text = "path,label\na.jpg,1\nb.jpg,2\nc.png,1\nsub/d.jpg,2\n"
    table = table_of(tmp_path, "l.csv", text, names=named_classes("1=awful, 2=great"))
    assert table.classes == ("awful", "great") and labels_of(table)["b.jpg"] == ("great",)
    with pytest.raises(CnnlabError, match=r"label\(s\) 2 have no name in data.class_names"):
        table_of(tmp_path, "l.csv", text, names=named_classes("1=awful"))
    for malformed in ("1:awful", "1=awful,1=great", "1=awful,2=awful", ""):
        with pytest.raises(CnnlabError, match=r"data\.class_names"):
            named_classes(malformed)


def test_the_decode_cache_keys_on_the_label_files_name_too(tmp_path):
    folder = write_image_folder(tmp_path / "folders", classes=2, per_class=6, size=12)
    labels = flattened(folder, tmp_path / "flat")
    load_dataset(DataConfig(data=str(tmp_path / "flat"), labels=str(labels)))  # cached
    same_bytes = tmp_path / "labels.xlsx"
    shutil.copy(labels, same_bytes)
    with pytest.raises(CnnlabError, match=r"a label file is \.csv, \.tsv, \.json, \.jsonl; not \.xlsx"):
        load_dataset(DataConfig(data=str(tmp_path / "flat"), labels=str(same_bytes)))
    renamed = tmp_path / "renamed.csv"
    shutil.copy(labels, renamed)
    assert "renamed.csv: CSV" in load_dataset(DataConfig(data=str(tmp_path / "flat"), labels=str(renamed))).layout
