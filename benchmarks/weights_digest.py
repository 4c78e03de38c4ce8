"""Train recipes on the digits dataset and print a SHA-256 of each final model's weights.

Run it with two checkouts of cnnlab (PYTHONPATH=<checkout>/src) to show that a refactor left training
bitwise the same: equal digests mean every weight, BatchNorm statistic included, has the same bits.

    PYTHONPATH=src python benchmarks/weights_digest.py tutorial-cnn fast70 --epochs 2
    PYTHONPATH=src python benchmarks/weights_digest.py finetune --data photos/ --epochs 3
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file


def weights_digest(folder: Path) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order (the file layout aside)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(folder / "model.safetensors")).items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="+")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", help="an image folder or archive instead of the digits dataset")
    parser.add_argument("--flags", default="", help="more `cnnlab train` flags, e.g. '--loader disk'")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        for recipe in args.recipes:
            out = Path(scratch) / recipe
            source = ["--data", args.data] if args.data else ["--dataset", "digits"]
            command = [sys.executable, "-m", "cnnlab", "train", "--recipe", recipe, *source]
            command += ["--epochs", str(args.epochs), "--seed", str(args.seed), "--out", str(out), "--no-report", "-q"]
            command += shlex.split(args.flags)
            subprocess.run(command, check=True, capture_output=True)
            flags = f" {args.flags}" if args.flags else ""
            print(f"{recipe} seed {args.seed} epochs {args.epochs}{flags}: {weights_digest(out)}")


if __name__ == "__main__":
    main()
