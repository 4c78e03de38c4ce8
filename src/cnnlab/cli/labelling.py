"""Commands of the labelling loop: label (the page) and suggest (which images to label next)."""

from __future__ import annotations

import csv
import io
import threading
from pathlib import Path
from typing import Annotated

import typer

from cnnlab.atomic import write_text
from cnnlab.cli import app, console, handles_errors
from cnnlab.errors import CnnlabError
from cnnlab.export import require
from cnnlab.labelling.workspace import Workspace, open_workspace
from cnnlab.models import load_model
from cnnlab.serve.listen import listening_socket

Folder = Annotated[Path, typer.Argument(help="The folder of images (a folder, not an archive).")]
LabelsOption = Annotated[
    Path | None, typer.Option("--labels", help="The label file (CSV) decisions go to; default: DATA/labels.csv.")
]
RunOption = Annotated[Path | None, typer.Option("--run", help="A run whose classes are the class list.")]
DoctorOption = Annotated[
    Path | None, typer.Option("--doctor", help="A doctor.json of this data: its findings to review, its copies.")
]
ClassesOption = Annotated[str, typer.Option("--classes", help="The classes, as cat,dog,bird (default: the labels').")]
MultiOption = Annotated[bool, typer.Option("--multi-label", help="Several labels per image.")]


def _workspace(
    data: Path, labels: Path | None, classes: str, run: Path | None, doctor: Path | None, multi: bool
) -> Workspace:
    names = tuple(name.strip() for name in classes.split(",") if name.strip())
    if run is not None:
        if names:
            raise CnnlabError("give --classes or --run, not both: the run's classes are the class list")
        names = tuple(load_model(run).info.classes)
    workspace = open_workspace(data, labels, names, doctor, multi)
    console.print(f"{workspace.store.reading}; {len(workspace.files):,} images, {len(workspace.classes)} classes")
    return workspace


@app.command()
@handles_errors
def label(
    data: Folder,
    labels: LabelsOption = None,
    run: RunOption = None,
    doctor: DoctorOption = None,
    classes: ClassesOption = "",
    multi_label: MultiOption = False,
    port: Annotated[int, typer.Option(help="TCP port on 127.0.0.1.")] = 8010,
) -> None:
    """A page to label and review images, keyboard first: the doctor's findings, images in the order active
    learning chooses, everything. Each decision is written to the label file at once, with a history."""
    require("fastapi", "serve")
    uvicorn = require("uvicorn", "serve")
    from cnnlab.labelling.page import create_label_app  # needs the serve extra

    listener = listening_socket("127.0.0.1", port)
    workspace = _workspace(data, labels, classes, run, doctor, multi_label)
    # The page answers while the images are embedded.
    threading.Thread(target=workspace.prepare_in_background, daemon=True).start()
    console.print(f"labelling {data} on http://127.0.0.1:{port}/ (decisions go to {workspace.store.path})")
    try:
        uvicorn.Server(uvicorn.Config(create_label_app(workspace), log_level="warning")).run(sockets=[listener])
    finally:
        workspace.store.close()


@app.command()
@handles_errors
def suggest(
    data: Folder,
    labels: LabelsOption = None,
    run: RunOption = None,
    doctor: DoctorOption = None,
    classes: ClassesOption = "",
    multi_label: MultiOption = False,
    n: Annotated[int, typer.Option("--n", help="How many images to suggest.", min=1)] = 100,
    out: Annotated[Path | None, typer.Option(help="Write them as CSV (rank,path,method,margin).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the clustering.")] = 0,
) -> None:
    """Which unlabelled images to label next (active learning; the README says which methods and why)."""
    workspace = _workspace(data, labels, classes, run, doctor, multi_label)
    workspace.seed = seed
    try:
        workspace.prepare()
        chosen = workspace.suggestion(n)
    finally:
        workspace.store.close()
    rows, margins = chosen.rows, chosen.margins
    console.print(f"{len(rows)} images to label next: {chosen.method}")
    if out is None:
        for row in rows:
            typer.echo(workspace.files[row])
        return
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["rank", "path", "method", "margin"])
    for rank, row in enumerate(rows, start=1):
        margin = "" if margins is None else f"{margins[rank - 1]:.4f}"
        writer.writerow([rank, workspace.files[row], chosen.method, margin])
    write_text(out, text.getvalue())
    console.print(f"wrote {out}")
