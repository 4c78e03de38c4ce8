"""The doctor's files: doctor.json (every finding), doctor.csv (a row per finding) and doctor.html (self-contained:
the summary, class balance, and galleries of the most suspicious images as embedded thumbnails)."""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image

from cnnlab.atomic import make_folder, write_text
from cnnlab.data.dataset import Dataset
from cnnlab.doctor import Diagnosis, Finding, ImageRef, Kind
from cnnlab.doctor.copies import REALISTIC
from cnnlab.report import html

GALLERY = 40  # images (or pairs, side by side) shown per gallery; doctor.json and doctor.csv hold every finding
THUMBNAIL = 96  # pixels on a thumbnail's long side (small images are enlarged without smoothing)
_GALLERY_STYLE = (
    "<style>.gallery{display:flex;flex-wrap:wrap;gap:.6rem}.gallery figure{margin:0;width:200px;font-size:.75rem}"
    ".gallery img{margin:0 auto;image-rendering:pixelated}.pair{display:flex;gap:2px}</style>"
)


@dataclass(frozen=True)
class DoctorFiles:
    html: Path
    json: Path
    csv: Path


def write_diagnosis(diagnosis: Diagnosis, dataset: Dataset, folder: Path) -> DoctorFiles:
    """doctor.html, doctor.json and doctor.csv in `folder`."""
    make_folder(folder)
    files = DoctorFiles(folder / "doctor.html", folder / "doctor.json", folder / "doctor.csv")
    write_text(files.json, json.dumps(diagnosis.to_dict(), indent=1))
    write_text(files.csv, _csv(diagnosis.findings))
    write_text(files.html, _page(diagnosis, dataset))
    return files


def _csv(findings: list[Finding]) -> str:
    table = io.StringIO(newline="")
    writer = csv.writer(table)
    writer.writerow(
        [
            "kind",
            "split",
            "index",
            "path",
            "label",
            "score",
            "suggested",
            "other_split",
            "other_index",
            "other_path",
            "detail",
        ]
    )
    for finding in findings:
        image, other = finding.image, finding.other
        writer.writerow(
            [
                finding.kind.value,
                image.split.value,
                image.index,
                image.path or "",
                image.label,
                f"{finding.score:.5f}",
                finding.suggested or "",
                other.split.value if other else "",
                other.index if other else "",
                (other.path or "") if other else "",
                finding.detail,
            ]
        )
    return table.getvalue()


def _thumbnail(dataset: Dataset, image: ImageRef) -> str:
    pixels = np.asarray(dataset.splits()[image.split].images[image.index])
    picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    scale = THUMBNAIL / max(picture.size)
    size = (max(1, round(picture.width * scale)), max(1, round(picture.height * scale)))
    smoothing = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
    buffer = io.BytesIO()
    picture.resize(size, smoothing).save(buffer, format="PNG")
    return html.image(buffer.getvalue(), f"{image.split.value} #{image.index}")


def _name(image: ImageRef) -> str:
    return image.path or f"{image.split.value} #{image.index}"


def _gallery(dataset: Dataset, findings: list[Finding], caption: str) -> str:
    if not findings:
        return "<p>None found.</p>"
    figures = []
    for finding in findings[:GALLERY]:
        pictures = _thumbnail(dataset, finding.image)
        if finding.other is not None:
            pictures = f'<div class="pair">{_thumbnail(dataset, finding.other)}{pictures}</div>'
        words = f"{_name(finding.image)}: {finding.detail}"
        figures.append(f"<figure>{pictures}<figcaption>{escape(words)}</figcaption></figure>")
    shown = f"<p>{escape(caption)} The first {min(len(findings), GALLERY)} of {len(findings):,}.</p>"
    return f'{shown}<div class="gallery">{"".join(figures)}</div>'


def _tier(way: str) -> str:
    return "near duplicate" if way in REALISTIC else "near-exact"


def _page(diagnosis: Diagnosis, dataset: Dataset) -> str:
    classes = diagnosis.classes
    balance = html.table(
        ["class", *diagnosis.class_counts],
        [[name, *(counts[i] for counts in diagnosis.class_counts.values())] for i, name in enumerate(classes)],
    )
    similarities = diagnosis.calibration.similarities
    calibration = html.table(
        ["copied as", "tier", "lowest similarity", "1st percentile", "median"],
        [
            [way, _tier(way), min(found), float(np.quantile(found, 0.01)), float(np.median(found))]
            for way, found in similarities.items()
        ],
    )
    calibration += (
        f"<p>{diagnosis.calibration.sample} images copied each way (near-exact ways: their aligned correlation; "
        f"realistic ways: their correlation once registered). {escape(diagnosis.calibration.said())}.</p>"
    )
    leaks = diagnosis.of_kind(Kind.LEAK)
    sections = [
        ("Summary", "<pre>" + escape("\n".join(diagnosis.summary())) + "</pre>"),
        ("Class balance (images per class and split)", balance),
        (
            "Suspected label errors",
            _gallery(dataset, diagnosis.of_kind(Kind.LABEL), "Least sure of their given label first."),
        ),
        (
            "Copies across splits (leakage)",
            _gallery(dataset, leaks, "Each pair: the earlier split's image, then its copy."),
        ),
        (
            "Copies within a split",
            _gallery(dataset, diagnosis.of_kind(Kind.DUPLICATE), "Each pair: the first image, then its copy."),
        ),
        ("Outliers", _gallery(dataset, diagnosis.of_kind(Kind.OUTLIER), "Furthest from their nearest images first.")),
        ("Odd images", _gallery(dataset, diagnosis.of_kind(Kind.ODD), "")),
        ("Copy calibration", calibration),
    ]
    title = f"cnnlab doctor: {dataset.name}"
    return html.page(title, sections, diagnosis.summary()[0]).replace("</head>", f"{_GALLERY_STYLE}</head>")
