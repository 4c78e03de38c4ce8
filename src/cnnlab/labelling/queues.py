"""The labelling page's queues, a page of items at a time, and its progress in numbers.

- review: the doctor's findings (suspected label errors, copies, leaks), in its order, each with what it measured;
- next: unlabelled images in the order active learning chose (`active.suggest`, chosen again at each retraining);
- all: every image, filtered by its label, by the head's prediction, or to those where the two disagree.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from cnnlab.labelling.workspace import Workspace


def progress(workspace: Workspace) -> dict[str, Any]:
    """Labelled, excluded and unlabelled images, per class, and the review queue's decided and left."""
    entries = workspace.store.entries
    labelled = [entry for entry in entries.values() if entry.labels is not None and not entry.excluded]
    per_class = Counter(label for entry in labelled for label in entry.labels or ())
    reviewed = workspace.reviewed()
    excluded = sum(entry.excluded for entry in entries.values())
    return {
        "images": len(workspace.files),
        "labelled": len(labelled),
        "excluded": excluded,
        "unlabelled": len(workspace.files) - len(labelled) - excluded,
        "per_class": {name: per_class.get(name, 0) for name in workspace.classes},
        "review_total": len(workspace.review),
        "reviewed": sum(item.path in reviewed for item in workspace.review),  # findings whose image was decided
        "decisions": len(workspace.store.history),
        "unreadable": len(workspace.unreadable),
    }


def _item(workspace: Workspace, path: str) -> dict[str, Any]:
    entry = workspace.store.entry(path)
    top = workspace.top(path)
    return {
        "path": path,
        "labels": list(entry.labels) if entry.labels is not None else None,
        "excluded": entry.excluded,
        "top": [{"class": name, "probability": round(chance, 4)} for name, chance in top],
    }


def queue_page(
    workspace: Workspace,
    name: str,
    offset: int,
    limit: int,
    label: str | None,
    predicted: str | None,
    show: str,
) -> dict[str, Any]:
    """Items `offset` to `offset + limit` of queue `name`, and how many it holds."""
    if name == "review":
        reviewed = workspace.reviewed()
        items = []
        for finding in workspace.review[offset : offset + limit]:
            item = _item(workspace, finding.path) | {
                "kind": finding.kind,
                "detail": finding.detail,
                "suggested": list(finding.suggested) if finding.suggested else None,
                "other": finding.other,
                "reviewed": finding.path in reviewed,
            }
            items.append(item)
        return {"total": len(workspace.review), "items": items}
    paths = _next(workspace) if name == "next" else _filtered(workspace, label, predicted, show)
    return {"total": len(paths), "items": [_item(workspace, path) for path in paths[offset : offset + limit]]}


def _next(workspace: Workspace) -> list[str]:
    """The label-next queue: active learning's order while it lasts, then the other unlabelled images."""
    store = workspace.store
    chosen = [path for path in workspace.next_order if store.entry(path).labels is None]
    if chosen:
        return chosen
    return [path for path in workspace.files if store.entry(path).labels is None and path not in workspace.unreadable]


def _filtered(workspace: Workspace, label: str | None, predicted: str | None, show: str) -> list[str]:
    store = workspace.store
    head = workspace.head
    best = head.probabilities.argmax(1) if head is not None else None
    chosen = []
    for row, path in enumerate(workspace.files):
        entry = store.entry(path)
        labels = entry.labels or ()
        if label is not None and label not in labels:
            continue
        if show == "unlabelled" and entry.labels is not None:
            continue
        if show in ("labelled", "disagree") and entry.labels is None:
            continue
        guess = workspace.classes[int(best[row])] if best is not None else None
        if predicted is not None and guess != predicted:
            continue
        if show == "disagree" and (guess is None or guess in labels):
            continue
        chosen.append(path)
    return chosen
