"""The HTTP API and web page: `create_app(classifier)` returns a FastAPI app; `cnnlab serve` runs it.

Safe under bad input and load: bodies over the limit are refused before they are read whole (and what
the client keeps sending is drained, up to a bound, so that it can read the refusal); only
allow-listed raster formats are decoded, and only after their header's pixel count is checked;
a body that arrives slower than `upload_timeout_s` answers 408; decoding runs in a bounded thread pool off the
event loop, and a full queue answers 503 with Retry-After at once. Concurrent requests are classified together
(`batching`: a short wait window and a largest batch). GET /metrics gives request counts and latency
histograms in Prometheus' text format.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.resources import files
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cnnlab.data import images as image_io
from cnnlab.models import ModelInfo
from cnnlab.models.inference import Scores
from cnnlab.models.label_sets import answered_classes
from cnnlab.predict import Predictor
from cnnlab.serve.batching import Batcher


@dataclass(frozen=True)
class ServeConfig:
    max_upload_mb: float = 10.0  # whole request body
    # After a 413, what the client still sends is read and discarded up to this much (MB) and this long (s),
    # so that clients that send the whole body before reading (urllib, requests) get the 413, not a reset.
    drain_mb: float = 64.0
    drain_seconds: float = 10.0
    max_pixels: int = 4096 * 4096  # per image, checked on the header before decoding
    max_files: int = 64  # images per request
    workers: int = 2  # decoding threads (and inference threads without batching)
    queue: int = 32  # requests allowed to wait for a worker; beyond that: 503
    top_k: int = 5
    max_batch: int = 64  # images classified together at most; 1: each request on its own
    batch_window_ms: float = 5.0  # how long a batch waits for more requests after its first
    upload_timeout_s: float = 30.0  # a request body not received in this time answers 408


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, by its Content-Length or as soon as the bytes
    received pass it; the body read so far (at most `limit`) is then handed on to the app.

    A client that asked `Expect: 100-continue` gets the 413 before it sends the body. Any other client is
    already sending it: the 413 goes out at once, then the rest of the body is drained (at most `drain`
    bytes, for at most `drain_seconds`) before the connection closes, since closing a socket with unread
    data resets it and the client would never read the answer."""

    def __init__(self, app: ASGIApp, limit: int, drain: int, drain_seconds: float, timeout_s: float):
        self.app, self.limit, self.drain, self.drain_seconds = app, limit, drain, drain_seconds
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            if headers.get(b"expect", b"").lower() == b"100-continue":
                return await self._refuse(send, None)
            return await self._refuse(send, receive)
        chunks: list[bytes] = []
        size = 0
        with anyio.move_on_after(self.timeout_s) as slow:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                if size > self.limit:
                    return await self._refuse(send, receive if message.get("more_body", False) else None)
                if not message.get("more_body", False):
                    break
        if slow.cancelled_caught:
            return await _answer(send, 408, f"request body not received within {self.timeout_s:g} s")
        body, replayed = b"".join(chunks), False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _refuse(self, send: Send, unread_body: Receive | None) -> None:
        """Answer 413; then, when the client is still sending (`unread_body` is its receive), drain it."""
        body = json.dumps({"detail": f"request body over the {self.limit / 1e6:g} MB limit"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": [*headers, (b"connection", b"close")]})
        # The response stays open while draining: the server stops reading a request once its response ends.
        await send({"type": "http.response.body", "body": body, "more_body": unread_body is not None})
        if unread_body is None:
            return
        drained = 0
        with anyio.move_on_after(self.drain_seconds):
            while drained <= self.drain:
                message = await unread_body()
                drained += len(message.get("body", b""))
                if message["type"] == "http.disconnect" or not message.get("more_body", False):
                    break
        await send({"type": "http.response.body", "body": b""})


async def _answer(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*headers, (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BadImage(Exception):
    pass


def decode_upload(data: bytes, name: str, classifier: Predictor, config: ServeConfig) -> np.ndarray:
    """Check the header (format allow-list, pixel count), then decode with the training preprocessing."""
    if not data:
        raise BadImage(f"{name}: empty file")
    try:
        found = image_io.header(data, name)  # refuses any format outside image_io.ALLOWED_FORMATS
        if found.height * found.width > config.max_pixels:
            raise BadImage(f"{name}: {found.width}x{found.height} pixels, over the limit of {config.max_pixels:,}")
        return image_io.decode(data, name, classifier.info.input_shape.size, classifier.info.input_shape.channels)
    except image_io.ImageError as error:
        raise BadImage(str(error)) from None


def describe(info: ModelInfo) -> dict[str, Any]:
    """GET /model: what the model is, and its delivered test accuracy (with its TTA, as /predict answers)
    with the plain one (each image once) beside it."""
    recorded = Scores.from_metrics(info.metrics, "test")
    described = {
        "architecture": info.architecture,
        "classes": info.classes,
        "input_shape": list(info.input_shape),
        "metric": "mAP" if info.multi_label else "accuracy",  # the headline: test_delivered_map, or the accuracy
        "test_delivered_accuracy": recorded.delivered_accuracy if recorded is not None else None,
        "test_plain_accuracy": recorded.plain_accuracy if recorded is not None else None,
        "tta": info.inference.tta,
        "tta_below": info.inference.tta_below,  # selective TTA: the views only for images less sure than this
    }
    if info.thresholds is None:
        return described
    # A multi-label model: its accuracy is the exact match (the whole label set right)
    sets = recorded.to_dict() if recorded is not None else {}
    scores = {f"test_{key}": sets.get(key) for key in ("delivered_map", "micro_f1", "macro_f1", "hamming_loss")}
    return described | scores | {"thresholds": dict(zip(info.classes, info.thresholds, strict=True))}


def top_classes(names: list[str], probabilities: np.ndarray, info: ModelInfo, top_k: int) -> list[dict[str, Any]]:
    """Each file's `top_k` most probable classes, most probable first; for a multi-label model, its answer too:
    "labels", every class at or above its threshold."""
    predictions = []
    classes = info.classes
    for name, row in zip(names, probabilities, strict=True):
        best = np.argsort(-row)[: min(top_k, len(classes))]
        top = [{"class": classes[c], "probability": float(row[c])} for c in best]
        predictions.append({"filename": name, "top": top})
        if info.thresholds is not None:
            answer = answered_classes(row, classes, info.thresholds)
            predictions[-1]["labels"] = [{"class": label, "probability": chance} for label, chance in answer]
    return predictions


@dataclass(frozen=True)
class Metrics:
    """What GET /metrics exposes, in a registry of the app's own."""

    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    batch_images: Histogram


# Request latency buckets (seconds) and batch sizes (images): from a fast batch-1 answer to a queue near its limit.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Measured:
    """ASGI middleware: counts each HTTP request by path and status and observes its time to answer (from its
    arrival to its last byte sent). Plain ASGI, not `app.middleware("http")`, which costs every request a
    task group and a stream of its own."""

    PATHS = ("/predict", "/model", "/health", "/metrics")

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500  # 500: the app raised before it answered

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            path = scope["path"] if scope["path"] in self.PATHS else "other"
            self.metrics.requests.labels(path, str(status)).inc()
            self.metrics.latency.labels(path).observe(time.perf_counter() - started)


def instrument(app: FastAPI) -> Metrics:
    """Count and time every request by path and status (`Measured`, added by `create_app`), and serve the
    figures at GET /metrics."""
    registry = CollectorRegistry()
    metrics = Metrics(
        registry,
        Counter("cnnlab_requests", "HTTP requests answered", ["path", "status"], registry=registry),
        Histogram("cnnlab_request_seconds", "Time to answer", ["path"], buckets=LATENCY_BUCKETS, registry=registry),
        Histogram("cnnlab_batch_images", "Images per classified batch", buckets=BATCH_BUCKETS, registry=registry),
    )

    @app.get("/metrics", include_in_schema=False)
    async def exposition() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return metrics


def answering(
    classifier: Predictor, config: ServeConfig, metrics: Metrics, in_flight: Callable[[], int]
) -> Callable[[list[tuple[str, bytes]]], Awaitable[np.ndarray]]:
    """How /predict gets the probabilities of its uploads (name, bytes): decoded in a worker thread (the event
    loop only does I/O), then classified with the images of concurrent requests (`in_flight` of them), or alone."""
    workers = anyio.CapacityLimiter(config.workers)
    window_s = config.batch_window_ms / 1000
    batcher = Batcher(classifier.probabilities, config.max_batch, window_s, metrics.batch_images.observe, in_flight)

    async def probabilities_of(uploads: list[tuple[str, bytes]]) -> np.ndarray:
        def decode() -> np.ndarray:
            return np.stack([decode_upload(data, name, classifier, config) for name, data in uploads])

        if config.max_batch == 1:
            return await anyio.to_thread.run_sync(lambda: classifier.probabilities(decode()), limiter=workers)
        return await batcher.classify_batched(await anyio.to_thread.run_sync(decode, limiter=workers))

    return probabilities_of


def hide_unexpected_errors(app: FastAPI) -> None:
    """Answer an unexpected exception 500 "internal error": never a traceback to the client."""

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, _error: Exception) -> JSONResponse:
        return JSONResponse({"detail": "internal error"}, status_code=500)


def create_app(classifier: Predictor, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    info = classifier.info
    app = FastAPI(title="cnnlab", description=f"{info.architecture} image classifier")
    waiting = {"requests": 0}  # requests inside /predict; bounded by workers + queue
    page = files("cnnlab.serve").joinpath("page.html").read_text()
    metrics = instrument(app)
    probabilities_of = answering(classifier, config, metrics, lambda: waiting["requests"])

    @app.exception_handler(BadImage)
    async def bad_image(_request: Request, error: BadImage) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=400)

    hide_unexpected_errors(app)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> str:
        return page

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model")
    async def model() -> dict[str, Any]:
        return describe(info)

    @app.post("/predict")
    async def predict(file: Annotated[list[UploadFile], File(description="One or more images")]) -> JSONResponse:
        if len(file) > config.max_files:
            raise BadImage(f"{len(file)} files, over the limit of {config.max_files} per request")
        if waiting["requests"] >= config.workers + config.queue:
            return JSONResponse({"detail": "busy, try again shortly"}, status_code=503, headers={"Retry-After": "1"})
        waiting["requests"] += 1
        try:
            uploads = [(upload.filename or f"file {i}", await upload.read()) for i, upload in enumerate(file)]
            probabilities = await probabilities_of(uploads)
        finally:
            waiting["requests"] -= 1
        names = [name for name, _ in uploads]
        return JSONResponse({"predictions": top_classes(names, probabilities, info, config.top_k)})

    app.add_middleware(
        BodyLimit,
        limit=int(config.max_upload_mb * 1_000_000),
        drain=int(config.drain_mb * 1_000_000),
        drain_seconds=config.drain_seconds,
        timeout_s=config.upload_timeout_s,
    )
    app.add_middleware(Measured, metrics=metrics)  # outermost: a 413 or 408 from BodyLimit is counted too
    return app
