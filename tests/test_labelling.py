"""The labelling loop's library: the label store (atomic decisions, history, undo, one server per file), active
learning's choices, and label files with excluded and unlabelled images in training."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from cnnlab.config import DataConfig
from cnnlab.data import load_dataset
from cnnlab.data.labels import read_label_file
from cnnlab.errors import CnnlabError
from cnnlab.labelling import active
from cnnlab.labelling.store import Conflict, Entry, LabelStore
from tests.conftest import write_image_folder

FILES = [f"img{i}.png" for i in range(6)]


def test_each_decision_is_in_the_file_and_the_history_at_once(tmp_path):
    store = LabelStore(tmp_path / "labels.csv", FILES)
    store.decide("img0.png", Entry(("cat",)), "ana", "next")
    store.decide("img1.png", Entry(("dog",), excluded=True), "ana", "review")
    assert (tmp_path / "labels.csv").read_text() == "path,label,excluded\nimg0.png,cat,0\nimg1.png,dog,1\n"
    lines = [json.loads(line) for line in (tmp_path / "labels.csv.history.jsonl").read_text().splitlines()]
    assert [(line["who"], line["queue"], line["before"]["labels"]) for line in lines] == [
        ("ana", "next", None),
        ("ana", "review", None),
    ]
    store.close()
    reopened = LabelStore(tmp_path / "labels.csv", FILES)  # the file and the history are the whole state
    assert reopened.entry("img1.png") == Entry(("dog",), excluded=True)
    assert reopened.entry("img2.png").labels is None
    assert len(reopened.history) == 2


def test_undo_restores_the_previous_value_and_refuses_over_another_persons_change(tmp_path):
    store = LabelStore(tmp_path / "labels.csv", FILES)
    store.decide("img0.png", Entry(("cat",)), "ana", "next")
    store.decide("img0.png", Entry(("dog",)), "ana", "next")
    undone = store.undo("ana")
    assert undone is not None and store.entry("img0.png") == Entry(("cat",))
    assert store.undo("ana") is not None and store.entry("img0.png").labels is None  # back to unlabelled
    assert "img0.png" not in (tmp_path / "labels.csv").read_text()
    assert store.undo("ana") is None  # nothing left of ana's
    store.decide("img1.png", Entry(("cat",)), "ana", "next")
    store.decide("img1.png", Entry(("dog",)), "ben", "all")  # the later decision wins
    with pytest.raises(Conflict, match="changed by ben"):
        store.undo("ana")
    assert store.entry("img1.png") == Entry(("dog",))


def test_a_second_server_on_one_label_file_is_refused_and_a_cut_history_line_is_skipped(tmp_path):
    store = LabelStore(tmp_path / "labels.csv", FILES)
    with pytest.raises(CnnlabError, match="open in another labelling page"):
        LabelStore(tmp_path / "labels.csv", FILES)
    store.decide("img0.png", Entry(("cat",)), "ana", "next")
    store.close()
    with open(tmp_path / "labels.csv.history.jsonl", "a") as history:
        history.write('{"number": 2, "path": "img1.pn')  # a crash mid-line
    (tmp_path / ".labels.csv.0123abcd.tmp").write_text("path,lab")  # and mid-write of the file
    assert len(LabelStore(tmp_path / "labels.csv", FILES).history) == 1
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(CnnlabError, match="writes CSV"):
        LabelStore(tmp_path / "labels.json", FILES)


def test_training_reads_only_labelled_images_that_are_not_excluded(tmp_path):
    root = write_image_folder(tmp_path / "images", classes=2, per_class=10, split=False)
    files = sorted(str(path.relative_to(root)) for path in root.rglob("*.png"))
    labels = tmp_path / "labels.csv"
    rows = [f"{name},{name.split('/')[0]},{int(i % 5 == 0)}" for i, name in enumerate(files[:16])]
    labels.write_text("path,label,excluded\n" + "\n".join(rows) + "\n")
    table = read_label_file(labels, files)
    assert len(table.rows) == 16 - 4 and "4 excluded in 'excluded'" in table.reading
    assert len(read_label_file(labels, files, editing=True).rows) == 16
    dataset = load_dataset(DataConfig(data=str(root), labels=str(labels), test_fraction=0.25))
    assert len(dataset.train) + len(dataset.test) == 12  # 4 unlabelled and 4 excluded stay out
    names = {*dataset.train.names.tolist(), *dataset.test.names.tolist()}
    assert not names & {files[i] for i in (0, 5, 10, 15, 16, 17, 18, 19)}


def blobs(per_blob: int = 30, centres: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors in `centres` tight clusters, and each one's cluster."""
    rng = np.random.default_rng(seed)
    middle = rng.normal(size=(centres, 32))
    points = np.repeat(middle, per_blob, axis=0) + 0.05 * rng.normal(size=(centres * per_blob, 32))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32), np.repeat(
        np.arange(centres), per_blob
    )


def test_the_cold_start_covers_every_cluster_with_a_typical_image():
    points, cluster = blobs()
    targets = np.full(len(points), -1)
    chosen = active.suggest(points, targets, classes=6, n=6)
    assert "TypiClust" in chosen.method
    assert sorted(cluster[chosen.rows]) == list(range(6))  # one per cluster
    # Each is among the most typical of its cluster: nearer its cluster's mean than most of the others.
    for row in chosen.rows:
        members = np.flatnonzero(cluster == cluster[row])
        distance = np.linalg.norm(points[members] - points[members].mean(0), axis=1)
        assert (distance < np.linalg.norm(points[row] - points[members].mean(0))).mean() < 0.5


def test_with_labels_the_least_certain_are_chosen_diverse_and_copies_not_twice():
    points, cluster = blobs(per_blob=40, centres=2)
    rng = np.random.default_rng(1)
    # Between the two clusters, a line of doubtful images; 20 labels per class make the start warm.
    between = points[:40] * np.linspace(0, 1, 40)[:, None] + points[40:] * np.linspace(1, 0, 40)[:, None]
    between /= np.linalg.norm(between, axis=1, keepdims=True)
    pool = np.concatenate([points, between]).astype(np.float32)
    targets = np.full(len(pool), -1)
    per_class = active.COLD_PER_CLASS
    labelled = np.concatenate([rng.choice(40, per_class, replace=False), 40 + rng.choice(40, per_class, replace=False)])
    targets[labelled] = cluster[labelled]
    copies = np.full(len(pool), -1)
    copies[80:] = 7  # every doubtful image a copy of the others
    plain = active.suggest(pool, targets, classes=2, n=5)
    assert "margin" in plain.method and (plain.rows >= 80).mean() >= 0.8
    assert np.all(np.diff(plain.margins) >= 0)  # least certain first
    once = active.suggest(pool, targets, classes=2, n=5, copies=copies)
    assert (once.rows >= 80).sum() == 1
    eligible = np.ones(len(pool), bool)
    eligible[80:] = False
    assert not (active.suggest(pool, targets, classes=2, n=5, eligible=eligible).rows >= 80).any()


def test_a_split_column_is_kept_and_new_labels_go_to_train(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,split\nimg0.png,cat,test\nimg1.png,dog,train\n")
    store = LabelStore(labels, FILES)
    store.decide("img2.png", Entry(("dog",)), "ana", "next")
    assert labels.read_text().splitlines()[1:] == [
        "img0.png,cat,0,test",
        "img1.png,dog,0,train",
        "img2.png,dog,0,train",
    ]


def test_multi_label_pools_are_chosen_from_too():
    points, cluster = blobs(per_blob=50, centres=3)
    targets = np.full((len(points), 3), -1)
    cold = active.suggest(points, targets, classes=3, n=3)
    assert sorted(cluster[cold.rows]) == [0, 1, 2]
    labelled = np.flatnonzero(np.arange(len(points)) % 50 < active.COLD_PER_CLASS + 5)
    targets[labelled] = np.eye(3, dtype=int)[cluster[labelled]]
    targets[labelled[::4], (cluster[labelled[::4]] + 1) % 3] = 1  # some carry two labels
    warm = active.suggest(points, targets, classes=3, n=4)
    assert "margin" in warm.method and len(warm.rows) == 4 and not np.isin(warm.rows, labelled).any()


def test_concurrent_decisions_are_serialised_and_none_is_lost(tmp_path):
    files = [f"img{i:03d}.png" for i in range(200)]
    store = LabelStore(tmp_path / "labels.csv", files)

    def person(who: str, names: list[str]) -> None:
        for name in names:
            store.decide(name, Entry((who,)), who, "all")

    people = [threading.Thread(target=person, args=(f"p{k}", files[k::4])) for k in range(4)]
    for thread in people:
        thread.start()
    for thread in people:
        thread.join()
    written = read_label_file(tmp_path / "labels.csv", files, editing=True)
    assert {row.path: row.labels for row in written.rows} == {name: (f"p{i % 4}",) for i, name in enumerate(files)}
    assert sorted(decision.number for decision in store.history) == list(range(1, 201))
