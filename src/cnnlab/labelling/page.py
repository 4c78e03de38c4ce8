"""The labelling page's HTTP API and page: `create_label_app(workspace)`; `cnnlab label` serves it on 127.0.0.1.

Every decision is validated before anything is written: an image is named by its path as the page listed it (any
other path, one leading out of the folder included, is 404), labels must be among the classes (else 400), a body
over MAX_BODY bytes is 413 (`serve.app.BodyLimit`). Answers to bad input are one line, {"detail": ...}.
"""

from __future__ import annotations

import hashlib
import io
import threading
from importlib.resources import files as package_files
from typing import Annotated, Any, Literal

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field

from cnnlab.atomic import atomic_write, make_folder
from cnnlab.data import images as image_io
from cnnlab.labelling.queues import progress, queue_page
from cnnlab.labelling.store import Conflict, Entry
from cnnlab.labelling.workspace import Workspace
from cnnlab.serve.app import BodyLimit, hide_unexpected_errors

MAX_BODY = 64 * 1024  # bytes: a decision is a few hundred
SIDES = {"thumb": 160, "large": 640}  # pixels, the longer side of each view of an image
RETRAIN_EVERY = 20  # decisions between automatic retrainings (the page can turn them off)
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"\S")]  # who decides: not only blanks


class DecisionBody(BaseModel):
    path: Annotated[str, Field(max_length=4096)]
    labels: Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=1000)] | None
    excluded: bool = False
    who: Name
    queue: Literal["review", "next", "all"]


class UndoBody(BaseModel):
    who: Name


def create_label_app(workspace: Workspace) -> FastAPI:
    app = FastAPI(title="cnnlab label", description="label and review images")
    _answer_errors_in_one_line(app)
    _reading(app, workspace)
    _deciding(app, workspace)
    app.add_middleware(BodyLimit, limit=MAX_BODY, drain=MAX_BODY, drain_seconds=1.0, timeout_s=10.0)
    return app


def _answer_errors_in_one_line(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

    hide_unexpected_errors(app)


def _reading(app: FastAPI, workspace: Workspace) -> None:
    """The page, its state, its queues and images."""
    page = package_files("cnnlab.labelling").joinpath("page.html").read_text()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> str:
        return page

    @app.get("/api/state")
    def state() -> dict[str, Any]:
        head = workspace.head
        return {
            "classes": list(workspace.classes),
            "multi_label": workspace.multi_label,
            "labels_file": str(workspace.store.path),
            "reading": workspace.store.reading,
            "status": workspace.status,
            "model": None if head is None else {"labels": head.labels, "seconds": round(head.seconds, 2)},
            "auto_retrain": workspace.auto_retrain,
            "progress": progress(workspace),
        }

    @app.get("/api/queue/{name}")
    def queue(
        name: Literal["review", "next", "all"],
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=200)] = 24,
        label: Annotated[str | None, Query(max_length=256)] = None,
        predicted: Annotated[str | None, Query(max_length=256)] = None,
        show: Literal["any", "unlabelled", "labelled", "disagree"] = "any",
    ) -> dict[str, Any]:
        for value in (label, predicted):
            if value is not None and value not in workspace.classes:
                raise HTTPException(400, f"{value!r} is not a class")
        return queue_page(workspace, name, offset, limit, label, predicted, show)

    @app.get("/api/image")
    def image(path: Annotated[str, Query(max_length=4096)], size: Literal["thumb", "large"] = "thumb") -> Response:
        _known(workspace, path)
        return Response(_view(workspace, path, SIDES[size]), media_type="image/jpeg")


def _deciding(app: FastAPI, workspace: Workspace) -> None:
    """Decisions, undo and retraining (by hand, or every RETRAIN_EVERY decisions while `auto_retrain`)."""
    decided = {"since_retrain": 0}

    @app.post("/api/decide")
    def decide(body: DecisionBody) -> dict[str, Any]:
        _known(workspace, body.path)
        entry = _entry(workspace, body)
        decision = workspace.store.decide(body.path, entry, body.who.strip(), body.queue)
        decided["since_retrain"] += 1
        if workspace.auto_retrain and decided["since_retrain"] >= RETRAIN_EVERY:
            decided["since_retrain"] = 0
            threading.Thread(target=workspace.retrain, daemon=True).start()
        return {"saved": True, "number": decision.number, "entry": entry.to_dict(), "progress": progress(workspace)}

    @app.post("/api/undo")
    def undo(body: UndoBody) -> dict[str, Any]:
        try:
            decision = workspace.store.undo(body.who.strip())
        except Conflict as error:
            raise HTTPException(409, str(error)) from None
        if decision is None:
            return {"undone": None}
        return {"undone": decision.path, "entry": decision.after.to_dict(), "progress": progress(workspace)}

    @app.post("/api/retrain")
    def retrain(auto: bool | None = None) -> dict[str, Any]:
        if auto is not None:
            workspace.auto_retrain = auto
            return {"auto_retrain": auto}
        started = workspace.retrain()
        return {"retrained": started, "status": workspace.status}


def _known(workspace: Workspace, path: str) -> None:
    if path not in workspace.index:
        raise HTTPException(404, "no such image in this folder")


def _entry(workspace: Workspace, body: DecisionBody) -> Entry:
    """The decision's new value, its labels checked against the classes."""
    if body.labels is None:
        if body.excluded:
            raise HTTPException(400, "an excluded image keeps its labels: give them")
        return Entry(None)
    unknown = [label for label in body.labels if label not in workspace.classes]
    if unknown:
        raise HTTPException(400, f"{unknown[0][:64]!r} is not a class")
    labels = tuple(sorted(set(body.labels)))
    if not workspace.multi_label and len(labels) != 1:
        raise HTTPException(400, f"this data takes one label per image, not {len(labels)}")
    return Entry(labels, body.excluded)


def _view(workspace: Workspace, path: str, side: int) -> bytes:
    """The image as a JPEG at most `side` pixels on its longer side, cached on disk by its file's identity."""
    source = workspace.root / path
    try:
        stat = source.stat()
    except OSError:
        raise HTTPException(404, "the image is no longer in the folder") from None
    key = hashlib.sha256(f"{source.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\0{side}".encode()).hexdigest()
    cached = workspace.cache / "thumbnails" / key[:2] / f"{key[2:]}.jpg"
    if cached.exists():
        return cached.read_bytes()
    try:
        picture = image_io.read(str(source), path).convert("RGB")
    except image_io.ImageError as error:
        raise HTTPException(415, str(error)) from None
    picture.thumbnail((side, side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, "JPEG", quality=88)
    make_folder(cached.parent)
    atomic_write(cached, buffer.getvalue())
    return buffer.getvalue()
