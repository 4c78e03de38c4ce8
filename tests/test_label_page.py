"""The labelling page in a real browser (Debian's Chromium, Playwright) against `cnnlab label` run as a user runs
it: keyboard labelling, undo, retraining, multi-label toggles, the review queue, a phone-width screen, a server
killed mid-session, and hostile input to its API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from cnnlab.labelling.store import LabelStore
from tests.conftest import ARTIFACTS, free_port, pattern_image

CLASSES = "class0,class1,class2"


def unlabelled_folder(root: Path, per_class: int = 8) -> Path:
    """Images of three learnable patterns, in one flat folder: no labels of their own."""
    root.mkdir(parents=True)
    for label in range(3):
        for i in range(per_class):
            Image.fromarray(pattern_image(label, 12, seed=i * 7 + label)).save(root / f"p{label}-{i:02d}.png")
    return root


@contextlib.contextmanager
def label_server(*args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`cnnlab label ARGS` on a free port; yields its URL once its images are embedded, and the process."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "cnnlab", "label", *args, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if "label next" in httpx.get(f"{url}/api/state", timeout=1).json()["status"]:
                break
        time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"cnnlab label did not start: {process.stdout.read().decode()[-800:]}")
    try:
        yield url, process
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(10)


def rows_of(labels: Path) -> dict[str, tuple[str, str]]:
    lines = labels.read_text().splitlines()[1:] if labels.exists() else []
    return {path: (label, excluded) for path, label, excluded in (line.split(",") for line in lines)}


def open_page(page, url: str, name: str = "tester") -> None:
    page.on("dialog", lambda dialog: dialog.accept(name))
    page.goto(url)
    page.wait_for_selector("#classes button")


def saved(page, number: int) -> None:
    page.wait_for_function(f"document.getElementById('saved').dataset.number === '{number}'", timeout=10_000)


def test_keyboard_labelling_undo_retrain_and_a_phone_screen(tmp_path, browser_page):
    folder, labels = unlabelled_folder(tmp_path / "pool"), tmp_path / "labels.csv"
    with label_server(str(folder), "--labels", str(labels), "--classes", CLASSES) as (url, _):
        page = browser_page
        open_page(page, url)
        assert page.get_attribute("nav .tab[data-queue=next]", "aria-selected") == "true"  # no review: label next
        first = page.text_content("#viewer .path")
        page.keyboard.press("1")
        saved(page, 1)
        second = page.text_content("#viewer .path")
        page.keyboard.press("2")
        saved(page, 2)
        assert rows_of(labels) == {first: ("class0", "0"), second: ("class1", "0")}
        page.keyboard.press("z")  # undo: the second image is unlabelled again
        page.wait_for_function("document.getElementById('saved').textContent.startsWith('undone')")
        assert rows_of(labels) == {first: ("class0", "0")}
        assert page.text_content("#current-label") == "unlabelled"
        page.keyboard.press("2")
        saved(page, 4)
        page.keyboard.press("3")
        saved(page, 5)
        page.click("#retrain")  # the head fitted on three labels: suggestions appear
        page.wait_for_function("document.getElementById('model').textContent.startsWith('head on 3 labels')")
        page.wait_for_selector("#suggestion .top")
        shown = page.text_content("#viewer .path")
        page.keyboard.press("Enter")  # accept the suggestion
        saved(page, 6)
        assert rows_of(labels)[shown][0] in CLASSES.split(",")
        page.screenshot(path=str(ARTIFACTS / "label-page.png"), full_page=True)
        for key, queue in (("e", "all"), ("r", "review"), ("n", "next")):  # queue keys are no class's key
            page.keyboard.press(key)
            page.wait_for_selector(f"nav .tab[data-queue={queue}][aria-selected=true]")
        page.keyboard.press("g")
        page.wait_for_selector("#grid figure img")
        page.screenshot(path=str(ARTIFACTS / "label-grid.png"), full_page=True)
        page.set_viewport_size({"width": 390, "height": 844})
        page.keyboard.press("g")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
        page.screenshot(path=str(ARTIFACTS / "label-phone.png"), full_page=True)
        assert page.errors == []
    history = [json.loads(line) for line in labels.with_name("labels.csv.history.jsonl").read_text().splitlines()]
    assert {line["who"] for line in history} == {"tester"} and history[2]["undoes"] == 2


def test_multi_label_toggles_save_the_set(tmp_path, browser_page):
    folder, labels = unlabelled_folder(tmp_path / "pool", per_class=3), tmp_path / "labels.csv"
    with label_server(str(folder), "--labels", str(labels), "--classes", CLASSES, "--multi-label") as (url, _):
        page = browser_page
        open_page(page, url)
        path = page.text_content("#viewer .path")
        page.keyboard.press("1")
        page.keyboard.press("3")
        page.keyboard.press("2")
        page.keyboard.press("2")  # toggled on, then off
        assert page.locator("#classes button.toggled").count() == 2
        page.keyboard.press("Enter")
        saved(page, 1)
        assert rows_of(labels)[path] == ("class0;class2", "0")


def test_the_review_queue_keeps_changes_and_excludes(tmp_path, browser_page):
    root = tmp_path / "pool"
    unlabelled_folder(root, per_class=4)
    labels = tmp_path / "labels.csv"
    given = {path.name: f"class{path.name[1]}" for path in root.iterdir()}
    given["p0-01.png"] = "class1"  # a planted error
    labels.write_text("path,label\n" + "".join(f"{name},{label}\n" for name, label in sorted(given.items())))
    finding = {"kind": "label", "score": 0.9, "detail": "p(class0) 0.90 against p(class1) 0.05"}
    copy = {"kind": "duplicate", "score": 0.99, "detail": "near-exact copy (aligned correlation 0.99)"}
    doctor = tmp_path / "doctor.json"
    doctor.write_text(
        json.dumps(
            {
                "format": "cnnlab-doctor/1",
                "findings": [
                    finding | {"image": {"path": "p0-01.png"}, "suggested": "class0"},
                    copy | {"image": {"path": "p1-02.png"}, "other": {"path": "p1-03.png"}},
                    finding | {"image": {"path": "p2-00.png"}, "suggested": "class1"},
                ],
            }
        )
    )
    with label_server(str(root), "--labels", str(labels), "--doctor", str(doctor)) as (url, _):
        page = browser_page
        open_page(page, url)
        assert "p(class0) 0.90" in page.text_content("#finding")
        page.keyboard.press("Enter")  # take the doctor's suggestion: class0
        saved(page, 1)
        assert page.locator(".pair figure").count() == 2  # the copy beside its original
        page.keyboard.press("x")
        saved(page, 2)
        page.keyboard.press("k")  # keep: the label was right
        saved(page, 3)
        page.screenshot(path=str(ARTIFACTS / "label-review.png"), full_page=True)
        assert "reviewed 3 of 3" in page.text_content("#progress")
    after = rows_of(labels)
    changed = {path: value for path, value in after.items() if value != (given[path], "0")}
    assert changed == {"p0-01.png": ("class0", "0"), "p1-02.png": ("class1", "1")}


def test_a_killed_server_loses_no_decision_the_page_showed_saved(tmp_path, browser_page):
    """SIGKILL mid-session: every decision the page said was saved is in the label file."""
    folder, labels = unlabelled_folder(tmp_path / "pool"), tmp_path / "labels.csv"
    with label_server(str(folder), "--labels", str(labels), "--classes", CLASSES) as (url, process):
        page = browser_page
        open_page(page, url)
        shown = {}
        for number, key in enumerate("1231231", start=1):
            path = page.text_content("#viewer .path")
            page.keyboard.press(key)
            saved(page, number)
            shown[path] = f"class{int(key) - 1}"
        page.keyboard.press("2")  # in flight, perhaps: not counted
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
    written = rows_of(labels)  # the whole file: the last decision's, or the one before
    assert all(written[path] == (label, "0") for path, label in shown.items())
    LabelStore(labels, []).close()  # the next start removes a temporary the kill may have left mid-write
    assert not list(tmp_path.glob(".labels.csv.*.tmp"))


def test_hostile_input_gets_one_line_4xx_and_changes_nothing(tmp_path):
    folder, labels = unlabelled_folder(tmp_path / "pool", per_class=2), tmp_path / "labels.csv"
    outside = tmp_path / "secret.png"
    outside.write_bytes((folder / "p0-00.png").read_bytes())
    with label_server(str(folder), "--labels", str(labels), "--classes", CLASSES) as (url, _):
        good = {"path": "p0-00.png", "labels": ["class0"], "who": "ana", "queue": "next"}
        assert httpx.post(f"{url}/api/decide", json=good).status_code == 200
        before = labels.read_bytes(), labels.with_name("labels.csv.history.jsonl").read_bytes()
        hostile = [
            ("post", "/api/decide", {**good, "path": "nothere.png"}, 404),
            ("post", "/api/decide", {**good, "path": "../secret.png"}, 404),
            ("post", "/api/decide", {**good, "path": str(outside)}, 404),
            ("post", "/api/decide", {**good, "labels": ["dog"]}, 400),
            ("post", "/api/decide", {**good, "labels": ["class0", "class1"]}, 400),
            ("post", "/api/decide", {**good, "queue": "elsewhere"}, 422),
            ("post", "/api/decide", {**good, "who": ""}, 422),
            ("post", "/api/decide", {**good, "who": "   "}, 422),
            ("post", "/api/decide", {**good, "labels": ["x" * 100_000]}, 413),
            ("post", "/api/undo", {"who": "x" * 65}, 422),
            ("get", "/api/image?path=../secret.png", None, 404),
            ("get", "/api/queue/all?label=dog", None, 400),
            ("get", "/api/queue/elsewhere", None, 422),
        ]
        for method, path, body, status in hostile:
            answer = httpx.request(method, f"{url}{path}", json=body)
            assert answer.status_code == status, (path, body and str(body)[:80], answer.text[:200])
            assert "\n" not in answer.json()["detail"]
        not_json = httpx.post(f"{url}/api/decide", content=b"{not json", headers={"content-type": "application/json"})
        assert not_json.status_code == 422
        assert (labels.read_bytes(), labels.with_name("labels.csv.history.jsonl").read_bytes()) == before


def test_suggest_lists_unlabelled_images_and_writes_a_csv(tmp_path):
    from typer.testing import CliRunner

    from cnnlab.cli import app

    folder, labels = unlabelled_folder(tmp_path / "pool"), tmp_path / "labels.csv"
    labels.write_text("path,label\np0-00.png,class0\np1-00.png,class1\n")
    out = tmp_path / "next.csv"
    result = CliRunner().invoke(app, ["suggest", str(folder), "--labels", str(labels), "--n", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "typical and diverse" in result.output
    rows = out.read_text().splitlines()
    assert rows[0] == "rank,path,method,margin" and len(rows) == 6
    assert not {row.split(",")[1] for row in rows[1:]} & {"p0-00.png", "p1-00.png"}
    refused = CliRunner().invoke(app, ["suggest", str(tmp_path / "missing")])
    assert refused.exit_code == 2 and "not a folder of images" in refused.output
