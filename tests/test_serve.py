"""The HTTP API under bad input and load, the web page in a real browser, and ONNX export parity."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace

import httpx
import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from cnnlab.cli import app
from cnnlab.config import InferenceConfig
from cnnlab.data import DataConfig, load_dataset
from cnnlab.errors import CnnlabError
from cnnlab.evaluate import evaluate
from cnnlab.export import OnnxModel, export_onnx, require
from cnnlab.models import TrainedModel, load_model
from cnnlab.predict import predict_files
from cnnlab.quantize import Int8Settings, export_int8
from cnnlab.serve.app import ServeConfig, create_app
from tests.conftest import ARTIFACTS, served

runner = CliRunner()


def png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def model(trained_run):
    return load_model(trained_run)


@pytest.fixture(scope="module")
def client(model):
    return TestClient(create_app(model, ServeConfig(max_upload_mb=1, max_pixels=512 * 512)))


def digit_png(value: int = 3) -> bytes:
    return png(load_dataset(DataConfig(dataset="digits", image_size=12)).test.images[value][..., 0])


def test_predict_returns_top_k_for_each_uploaded_image(client):
    files = [("file", ("a.png", digit_png(0), "image/png")), ("file", ("b.png", digit_png(1), "image/png"))]
    response = client.post("/predict", files=files)
    assert response.status_code == 200
    predictions = response.json()["predictions"]
    assert [p["filename"] for p in predictions] == ["a.png", "b.png"]
    assert (
        len(predictions[0]["top"]) == 5
        and predictions[0]["top"][0]["probability"] >= predictions[0]["top"][1]["probability"]
    )


def test_model_health_page_and_docs(client, model):
    assert client.get("/health").json() == {"status": "ok"}
    described = client.get("/model").json()
    assert described["classes"] == model.info.classes and described["input_shape"] == [1, 12, 12]
    page = client.get("/")
    assert page.status_code == 200 and "<script>" in page.text and "http" not in page.text.split("<body>")[1]
    assert client.get("/docs").status_code == 200 and client.get("/openapi.json").status_code == 200


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"", "empty"),
        (b"definitely not an image", "not a recognised image format"),
        (png(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))[:2000], "corrupt or truncated"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not"),
        (png(np.zeros((600, 600), np.uint8)), "over the limit"),
    ],
    ids=["empty", "text", "truncated", "eps", "too-many-pixels"],
)
def test_bad_images_get_400_with_a_json_message_never_500(client, content, fragment):
    response = client.post("/predict", files=[("file", ("x.img", content, "application/octet-stream"))])
    assert response.status_code == 400
    assert fragment in response.json()["detail"] and "Traceback" not in response.text


def test_a_body_over_the_limit_is_refused_with_413(client):
    big = os.urandom(1_100_000)
    response = client.post("/predict", files=[("file", ("big.png", big, "image/png"))])
    assert response.status_code == 413


def test_a_full_queue_answers_503_with_retry_after(model):
    release = threading.Event()

    class Slow:
        info = model.info

        def probabilities(self, images):
            release.wait(10)
            return model.probabilities(images)

    app = create_app(Slow(), ServeConfig(workers=1, queue=0))

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            files = {"file": ("a.png", digit_png(), "image/png")}
            first = asyncio.create_task(http.post("/predict", files=files))
            await asyncio.sleep(0.3)
            second = await http.post("/predict", files=files)
            release.set()
            return (await first), second

    first, second = asyncio.run(scenario())
    assert first.status_code == 200
    assert second.status_code == 503 and second.headers["Retry-After"] == "1"


@pytest.fixture(scope="module")
def server(trained_run):
    """`cnnlab serve` in its own process on 127.0.0.1, as a user would run it; yields its base URL."""
    with served(trained_run) as url:
        yield url


OVER_LIMIT = 11_000_000  # bytes: over `cnnlab serve`'s default 10 MB limit


def read_response(connection: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset raises ConnectionResetError)."""
    received = b""
    while chunk := connection.recv(65536):
        received += chunk
    return received


def test_a_urllib_client_sending_the_whole_body_reads_the_413(server):
    request = urllib.request.Request(f"{server}/predict", data=os.urandom(OVER_LIMIT), method="POST")
    request.add_header("Content-Type", "application/octet-stream")
    with pytest.raises(urllib.error.HTTPError) as refused:  # not ConnectionResetError / URLError
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 413 and "10 MB limit" in json.loads(refused.value.read())["detail"]


def test_a_requests_style_client_that_sends_everything_before_reading_gets_the_413(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        head = f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Length: {OVER_LIMIT}\r\n\r\n"
        connection.sendall(head.encode() + os.urandom(OVER_LIMIT))
        answer = read_response(connection)
    assert answer.startswith(b"HTTP/1.1 413") and b"10 MB limit" in answer


def test_a_curl_style_client_asking_100_continue_gets_the_413_before_sending(server):
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        head = f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Length: {OVER_LIMIT}\r\nExpect: 100-continue\r\n\r\n"
        connection.sendall(head.encode())
        answer = read_response(connection)  # the body is never sent
    assert answer.startswith(b"HTTP/1.1 413") and b"100 Continue" not in answer


def test_a_streamed_body_without_length_is_cut_off_with_413(server):
    def chunks():
        for _ in range(OVER_LIMIT // 1_000_000):
            yield os.urandom(1_000_000)

    response = httpx.post(f"{server}/predict", content=chunks(), timeout=30)
    assert response.status_code == 413 and "10 MB limit" in response.json()["detail"]


def test_a_client_that_never_stops_sending_is_cut_off_after_the_drain_bound(model):
    """Past `drain_mb` the server closes: it never reads an unbounded body, even to be polite."""
    app = create_app(model, ServeConfig(max_upload_mb=0.001, drain_mb=0.01))
    sent = 0

    async def endless():
        nonlocal sent
        sent += 1000
        return {"type": "http.request", "body": b"x" * 1000, "more_body": True}

    messages = []

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [(b"content-length", b"99999999")]}
    asyncio.run(app(scope, endless, send))
    assert messages[0]["status"] == 413 and not messages[-1].get("more_body", False)
    assert 10_000 <= sent <= 12_000


def test_load_1000_requests_at_concurrency_32_without_5xx(server):
    body = digit_png()
    latencies: list[float] = []
    statuses: list[int] = []

    async def worker(http, count):
        for _ in range(count):
            started = time.perf_counter()
            response = await http.post(f"{server}/predict", files={"file": ("a.png", body, "image/png")})
            latencies.append(time.perf_counter() - started)
            statuses.append(response.status_code)

    async def run():
        limits = httpx.Limits(max_connections=32)
        async with httpx.AsyncClient(limits=limits, timeout=30) as http:
            started = time.perf_counter()
            await asyncio.gather(*(worker(http, 1000 // 32 + (i < 1000 % 32)) for i in range(32)))
            return time.perf_counter() - started

    elapsed = asyncio.run(run())
    assert len(statuses) == 1000
    server_errors = sum(status >= 500 for status in statuses)
    quantiles = statistics.quantiles(latencies, n=100)
    figures = {
        "requests_per_s": 1000 / elapsed,
        "p50_ms": quantiles[49] * 1000,
        "p99_ms": quantiles[98] * 1000,
        "server_errors": server_errors,
        "requests": len(statuses),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "load-test.json").write_text(json.dumps(figures, indent=2))
    print(f"\nload test: {figures}")
    assert server_errors == 0


def test_the_page_shows_the_prediction_in_headless_chromium(server, tmp_path, browser_page):
    image = tmp_path / "digit.png"
    image.write_bytes(digit_png(5))
    expected = httpx.post(f"{server}/predict", files={"file": ("d.png", image.read_bytes(), "image/png")})
    expected_class = expected.json()["predictions"][0]["top"][0]["class"]
    browser_page.goto(server)
    browser_page.set_input_files("#file", str(image))
    browser_page.wait_for_function("document.getElementById('prediction').textContent.includes('%')", timeout=10_000)
    browser_page.screenshot(path=str(ARTIFACTS / "serve-page.png"), full_page=True)
    assert browser_page.text_content("#prediction").startswith(expected_class)
    assert browser_page.errors == []


def test_onnx_export_matches_pytorch_and_predicts_like_it(model, trained_run, tmp_path):
    sample = load_dataset(DataConfig(dataset="digits", image_size=12)).test.images[:100]
    verification = export_onnx(model, tmp_path / "model.onnx", sample)
    assert verification.max_abs_difference <= 1e-4 and verification.batch_sizes == (1, 7)
    exported = OnnxModel(tmp_path / "model.onnx")
    assert [(i.name, i.type, i.shape[1:]) for i in exported.session.get_inputs()] == [
        ("pixels", "tensor(uint8)", [12, 12, 1])  # normalising is inside the graph
    ]
    np.testing.assert_allclose(exported.probabilities(sample[:7]), model.probabilities(sample[:7]), atol=1e-4)
    image = tmp_path / "digit.png"
    image.write_bytes(png(sample[3][..., 0]))
    [from_onnx] = predict_files(exported, [image])
    [from_torch] = predict_files(model, [image])
    assert from_onnx.top[0][0] == from_torch.top[0][0]


def test_onnx_export_computes_the_models_selective_tta(model, tmp_path):
    sample = load_dataset(DataConfig(dataset="digits", image_size=12)).test.images[:100]
    plain = model.probabilities(sample[:7])  # the fixture's model has no TTA
    third, fourth = np.sort(plain.max(1))[2:4]
    below = float(third + fourth) / 2  # the views for the three least sure images; no image at the threshold
    viewing = TrainedModel(model.module, replace(model.info, inference=InferenceConfig("flip-translate", below)))
    verification = export_onnx(viewing, tmp_path / "model.onnx", sample)
    assert verification.max_abs_difference <= 1e-4
    exported = OnnxModel(tmp_path / "model.onnx").probabilities(sample[:7])
    np.testing.assert_allclose(exported, viewing.probabilities(sample[:7]), atol=1e-4)
    unsure = plain.max(1) < below
    assert unsure.sum() == 3
    np.testing.assert_allclose(exported[~unsure], plain[~unsure], atol=1e-4)
    assert not np.allclose(exported[unsure], plain[unsure], atol=1e-4)


def test_a_corrupt_onnx_file_is_refused_in_one_line(model, tmp_path):
    sample = load_dataset(DataConfig(dataset="digits", image_size=12)).test.images[:10]
    export_onnx(model, tmp_path / "model.onnx", sample)
    (tmp_path / "model.onnx").write_bytes(b"\x08\x07not a protobuf")
    with pytest.raises(CnnlabError, match=r"model\.onnx: not a loadable ONNX model \(.+\)$") as refused:
        OnnxModel(tmp_path / "model.onnx")
    assert "\n" not in str(refused.value)


def test_a_graph_that_does_not_take_pixels_is_refused_in_one_line(model, tmp_path):
    sample = load_dataset(DataConfig(dataset="digits", image_size=12)).test.images[:10]
    export_onnx(model, tmp_path / "model.onnx", sample)  # for its model.json
    floats = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [None, 1, 12, 12])
    identity = onnx.helper.make_node("Identity", ["input"], ["probabilities"])
    graph = onnx.helper.make_graph([identity], "normalised floats", [floats], [floats])  # as exports were before
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), tmp_path / "model.onnx")
    with pytest.raises(
        CnnlabError, match=r"model\.onnx: its graph takes .+ not uint8 pixels.+export it again"
    ) as refused:
        OnnxModel(tmp_path / "model.onnx")
    assert "\n" not in str(refused.value)


def test_a_missing_extra_names_the_extra_to_install():
    with pytest.raises(CnnlabError, match=r"pip install 'cnnlab\[serve\]'"):
        require("a_module_that_is_not_installed", "serve")


def test_int8_export_records_both_accuracies_and_answers_like_fp32(trained_run, model, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    result = runner.invoke(app, ["export", str(run), "--int8", "--calibration", "128"])
    assert result.exit_code == 0, result.output
    record = json.loads((run / "model.int8.json").read_text())["quantization"]
    test = load_dataset(DataConfig(dataset="digits", image_size=12)).test
    int8 = OnnxModel(run / "model.int8.onnx").probabilities(test.images)
    torch_delivered = evaluate(model, test).scores.delivered_accuracy
    assert record["metric"] == "accuracy"
    assert record["int8_score"] == pytest.approx(float((int8.argmax(1) == test.labels).mean()))
    assert abs(record["fp32_score"] - torch_delivered) <= 1 / len(test)  # fp32 onnxruntime is PyTorch's
    assert record["agreement"] >= 0.97 and record["calibration_images"] == 128 and record["test_images"] == len(test)
    graph = onnx.load(str(run / "model.int8.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    assert any(weights.data_type == onnx.TensorProto.INT8 for weights in graph.initializer)
    assert f"{record['int8_score']:.2%} in INT8" in result.output


def test_int8_losing_more_than_allowed_writes_nothing(model, tmp_path):
    data = load_dataset(DataConfig(dataset="digits", image_size=12))
    with pytest.raises(CnnlabError, match=r"^INT8 loses .* more than --max-drop .*; nothing written$"):
        export_int8(model, tmp_path / "model.int8.onnx", data.train.images[:64], data.test, Int8Settings(max_drop=-1))
    assert not list(tmp_path.iterdir())


def test_predict_runs_a_run_folders_export_on_the_onnx_engine(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    image = tmp_path / "digit.png"
    image.write_bytes(png(load_dataset(DataConfig(dataset="digits", image_size=12)).test.images[3][..., 0]))
    missing = runner.invoke(app, ["predict", str(run), str(image), "--engine", "onnx"])
    assert missing.exit_code == 2 and "export the model first" in missing.output
    assert runner.invoke(app, ["export", str(run)]).exit_code == 0
    answers = {}
    for engine in ("torch", "onnx"):
        result = runner.invoke(app, ["predict", str(run), str(image), "--engine", engine, "--json"])
        assert result.exit_code == 0, result.output
        answers[engine] = json.loads(result.stdout)[0]["top"]
    assert answers["onnx"][0][0] == answers["torch"][0][0]
    assert answers["onnx"][0][1] == pytest.approx(answers["torch"][0][1], abs=1e-4)
    refused = runner.invoke(app, ["predict", str(run / "model.onnx"), str(image), "--engine", "torch"])
    assert refused.exit_code == 2 and "--engine onnx" in refused.output


def test_concurrent_requests_are_classified_together_and_answered_as_alone(model):
    images = load_dataset(DataConfig(dataset="digits", image_size=12)).test.images[:16]
    bodies = [png(image[..., 0]) for image in images]

    async def answers(config: ServeConfig) -> tuple[list[list[dict]], str]:
        app = create_app(model, config)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cnnlab") as http:
            responses = await asyncio.gather(
                *(
                    http.post("/predict", files={"file": (f"{i}.png", body, "image/png")})
                    for i, body in enumerate(bodies)
                )
            )
            assert all(response.status_code == 200 for response in responses)
            return [r.json()["predictions"][0]["top"] for r in responses], (await http.get("/metrics")).text

    batched, exposition = asyncio.run(answers(ServeConfig(max_batch=64, batch_window_ms=50)))
    alone, _ = asyncio.run(answers(ServeConfig(max_batch=1)))
    for together, single in zip(batched, alone, strict=True):
        assert [t["class"] for t in together] == [s["class"] for s in single]
        assert together[0]["probability"] == pytest.approx(single[0]["probability"], abs=1e-5)
    families = {family.name: family for family in text_string_to_metric_families(exposition)}
    sizes = {sample.name: sample.value for sample in families["cnnlab_batch_images"].samples}
    assert sizes["cnnlab_batch_images_sum"] == 16 and sizes["cnnlab_batch_images_count"] < 16


def test_metrics_count_and_time_requests_in_prometheus_text_format(model):
    client = TestClient(create_app(model))
    assert client.get("/health").status_code == 200
    assert client.post("/predict", files={"file": ("a.png", digit_png(), "image/png")}).status_code == 200
    assert client.post("/predict", files={"file": ("b.png", b"not an image", "image/png")}).status_code == 400
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }
    assert samples[("cnnlab_requests_total", (("path", "/predict"), ("status", "200")))] == 1
    assert samples[("cnnlab_requests_total", (("path", "/predict"), ("status", "400")))] == 1
    assert samples[("cnnlab_request_seconds_count", (("path", "/predict"),))] == 2
    assert samples[("cnnlab_request_seconds_bucket", (("le", "+Inf"), ("path", "/health")))] == 1


def test_an_upload_slower_than_the_timeout_answers_408(model):
    app = create_app(model, ServeConfig(upload_timeout_s=0.2))

    async def slow():
        await asyncio.sleep(5)
        return {"type": "http.request", "body": b"x", "more_body": False}

    messages = []

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [(b"content-length", b"100")]}
    asyncio.run(app(scope, slow, send))
    assert messages[0]["status"] == 408 and b"not received within 0.2 s" in messages[1]["body"]
