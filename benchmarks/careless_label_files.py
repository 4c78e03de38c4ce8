"""What `cnnlab data show --labels FILE` prints for each kind of careless label file: read (with its one line of
warning) or refused (with its one line of error).

    PYTHONPATH=src python benchmarks/careless_label_files.py > careless.md

Writes six small images (a.jpg, b.jpg, c.png, sub/d.jpg, x.jpg, x.png) into a temporary folder, then for each
label file runs the command in a child process and prints a Markdown table: the case, the exit status and the
lines it printed that say how the file was read or why it was refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

IMAGES = ("a.jpg", "b.jpg", "c.png", "sub/d.jpg")
CLEAN = "path,label\na.jpg,cat\nb.jpg,dog\nc.png,cat\nsub/d.jpg,dog\n"
CASES: list[tuple[str, str, str, list[str]]] = [
    ("clean", "l.csv", CLEAN, []),
    ("rows whose image is missing", "l.csv", CLEAN + "gone.jpg,cat\n", []),
    ("... with --strict", "l.csv", CLEAN + "gone.jpg,cat\n", ["--strict"]),
    ("an image the file does not name", "l.csv", "path,label\na.jpg,cat\nb.jpg,dog\nc.png,cat\n", []),
    ("an identical row twice", "l.csv", CLEAN + "a.jpg,cat\n", []),
    ("an image on two rows with two labels", "l.csv", CLEAN + "a.jpg,dog\n", []),
    ("an image in two splits", "l.csv", "path,label,split\na.jpg,cat,train\na.jpg,cat,test\nb.jpg,dog,train\n", []),
    (
        "an empty label cell, one label elsewhere",
        "l.csv",
        "path,label\na.jpg,cat\nb.jpg,dog\nc.png,\nsub/d.jpg,dog\n",
        [],
    ),
    (
        "an empty label cell, multi-label",
        "l.csv",
        'path,label\na.jpg,"cat dog"\nb.jpg,dog\nc.png,\nsub/d.jpg,cat\n',
        [],
    ),
    ("a byte-order mark and Windows line ends", "l.csv", "\ufeff" + CLEAN.replace("\n", "\r\n"), []),
    ("a ;-separated European CSV", "l.csv", CLEAN.replace(",", ";"), []),
    ("trailing blank lines", "l.csv", CLEAN + "\n\n\n", []),
    ("an absolute path", "l.csv", CLEAN + "/etc/passwd,cat\n", []),
    ("a path leading out of the folder", "l.csv", CLEAN + "../a.jpg,cat\n", []),
    ("an ID matching two files", "l.csv", CLEAN + "x,cat\n", []),
    ("two path columns that differ", "l.csv", "file,image,label\na.jpg,b.jpg,cat\nb.jpg,a.jpg,dog\n", []),
    ("a label column and 0/1 columns that differ", "l.csv", "path,label,cat,dog\na.jpg,cat,0,1\nb.jpg,dog,0,1\n", []),
    ("an unknown split", "l.csv", "path,label,split\na.jpg,cat,holdout\nb.jpg,dog,train\n", []),
    ("no label column to be found", "l.csv", "path,when,where\na.jpg,x,y\n", []),
    ("numeric labels", "l.csv", "path,label\na.jpg,1\nb.jpg,2\nc.png,1\nsub/d.jpg,2\n", []),
    (
        "... named with --class-names",
        "l.csv",
        "path,label\na.jpg,1\nb.jpg,2\nc.png,1\nsub/d.jpg,2\n",
        ["--class-names", "1=bad,2=good"],
    ),
    (
        "JSON {path: labels}",
        "l.json",
        json.dumps({"a.jpg": "cat", "b.jpg": ["dog"], "c.png": "cat", "sub/d.jpg": "dog"}),
        [],
    ),
    ("not valid JSON", "l.json", "[{", []),
    ("an .xlsx", "l.xlsx", CLEAN, []),
]


def said(output: str) -> str:
    """The lines that say how the file was read or why it was refused."""
    kept = [
        line.strip() for line in output.splitlines() if "l." in line or "error" in line.lower() or "left out" in line
    ]
    return "<br>".join(kept) or output.strip().splitlines()[-1]


def main() -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        folder = root / "images"
        for number, name in enumerate((*IMAGES, "x.jpg", "x.png")):
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(number).integers(0, 255, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name)
        print("| case | exit | what cnnlab printed |\n|---|---:|---|")
        for number, (case, name, text, flags) in enumerate(CASES):
            label_file = root / f"{number}" / name
            label_file.parent.mkdir()
            label_file.write_text(text, newline="")
            command = [
                sys.executable,
                "-m",
                "cnnlab",
                "data",
                "show",
                "--data",
                str(folder),
                "--labels",
                str(label_file),
            ]
            command += [*flags, "--out", str(root / f"{number}" / "grid.png"), "--test-fraction", "0.5"]
            done = subprocess.run(command, capture_output=True, text=True, cwd=root)
            lines = said(
                (done.stdout + done.stderr).replace(str(label_file.parent) + "/", "").replace(str(root), "DIR")
            )
            print(f"| {case} | {done.returncode} | {lines.replace('|', '&#124;')} |")


if __name__ == "__main__":
    main()
