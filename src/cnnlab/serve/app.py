"""The HTTP API and web page: `create_app(classifier)` returns a FastAPI app; `cnnlab serve` runs it.

Safe under bad input and load: bodies over the limit are refused before they are read whole (and what
the client keeps sending is drained, up to a bound, so that it can read the refusal); only
allow-listed raster formats are decoded, and only after their header's pixel count is checked;
inference runs in a bounded thread pool off the event loop, and a full queue answers 503 at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cnnlab.data import images as image_io
from cnnlab.models import ModelInfo
from cnnlab.models.inference import Scores
from cnnlab.predict import Classifier


@dataclass(frozen=True)
class ServeConfig:
    max_upload_mb: float = 10.0  # whole request body
    # After a 413, what the client still sends is read and discarded up to this much (MB) and this long (s),
    # so that clients that send the whole body before reading (urllib, requests) get the 413, not a reset.
    drain_mb: float = 64.0
    drain_seconds: float = 10.0
    max_pixels: int = 4096 * 4096  # per image, checked on the header before decoding
    max_files: int = 64  # images per request
    workers: int = 2  # inference threads
    queue: int = 32  # requests allowed to wait for a worker; beyond that: 503
    top_k: int = 5


class BodyLimit:
    """ASGI middleware: 413 for a body over `limit` bytes, by its Content-Length or as soon as the bytes
    received pass it; the body read so far (at most `limit`) is then handed on to the app.

    A client that asked `Expect: 100-continue` gets the 413 before it sends the body. Any other client is
    already sending it: the 413 goes out at once, then the rest of the body is drained (at most `drain`
    bytes, for at most `drain_seconds`) before the connection closes, since closing a socket with unread
    data resets it and the client would never read the answer."""

    def __init__(self, app: ASGIApp, limit: int, drain: int, drain_seconds: float):
        self.app, self.limit, self.drain, self.drain_seconds = app, limit, drain, drain_seconds

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


class BadImage(Exception):
    pass


def decode_upload(data: bytes, name: str, classifier: Classifier, config: ServeConfig) -> np.ndarray:
    """Check the header (format allow-list, pixel count), then decode with the training preprocessing."""
    if not data:
        raise BadImage(f"{name}: empty file")
    try:
        found = image_io.header(data, name)  # refuses any format outside image_io.ALLOWED_FORMATS
        if found.height * found.width > config.max_pixels:
            raise BadImage(f"{name}: {found.width}x{found.height} pixels, over the limit of {config.max_pixels:,}")
        return image_io.decode(data, name, classifier.info.shape.size, classifier.info.shape.channels)
    except image_io.ImageError as error:
        raise BadImage(str(error)) from None


def describe(info: ModelInfo) -> dict[str, Any]:
    """GET /model: what the model is, and its delivered test accuracy (with its TTA, as /predict answers)
    with the plain one (each image once) beside it."""
    recorded = Scores.from_metrics(info.metrics, "test", info.tta)
    return {
        "architecture": info.architecture,
        "classes": info.classes,
        "input_shape": info.input_shape,
        "test_accuracy": recorded.delivered_accuracy if recorded is not None else None,
        "test_accuracy_without_tta": recorded.accuracy if recorded is not None else None,
        "tta": info.tta,
        "tta_below": info.tta_below,  # selective TTA: the views only for images less sure than this
    }


def top_classes(names: list[str], probabilities: np.ndarray, classes: list[str], top_k: int) -> list[dict[str, Any]]:
    """Each file's `top_k` most probable classes, most probable first."""
    predictions = []
    for name, row in zip(names, probabilities, strict=True):
        best = np.argsort(-row)[: min(top_k, len(classes))]
        top = [{"class": classes[c], "probability": float(row[c])} for c in best]
        predictions.append({"filename": name, "top": top})
    return predictions


def create_app(classifier: Classifier, config: ServeConfig | None = None) -> FastAPI:
    config = config or ServeConfig()
    info = classifier.info
    app = FastAPI(title="cnnlab", description=f"{info.architecture} image classifier")
    workers = anyio.CapacityLimiter(config.workers)
    waiting = {"requests": 0}  # requests inside /predict; bounded by workers + queue
    page = files("cnnlab.serve").joinpath("page.html").read_text()

    @app.exception_handler(BadImage)
    async def bad_image(_request: Request, error: BadImage) -> JSONResponse:
        return JSONResponse({"detail": str(error)}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, _error: Exception) -> JSONResponse:
        return JSONResponse({"detail": "internal error"}, status_code=500)  # never a traceback to the client

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

            def decode_and_classify() -> np.ndarray:  # in a worker thread: the event loop only does I/O
                images = np.stack([decode_upload(data, name, classifier, config) for name, data in uploads])
                return classifier.probabilities(images)

            probabilities = await anyio.to_thread.run_sync(decode_and_classify, limiter=workers)
        finally:
            waiting["requests"] -= 1
        names = [name for name, _ in uploads]
        return JSONResponse({"predictions": top_classes(names, probabilities, info.classes, config.top_k)})

    app.add_middleware(
        BodyLimit,
        limit=int(config.max_upload_mb * 1_000_000),
        drain=int(config.drain_mb * 1_000_000),
        drain_seconds=config.drain_seconds,
    )
    return app
