"""The README's ablation table: a recipe as it is, then with one of its techniques undone per row, each row a
`cnnlab bench` run (mean and sd over the seeds), back to back on this machine.

    .venv/bin/python benchmarks/ablation.py --data ../shared/data/cifar10-jpg.tar.gz --recipe fast70 --seeds 3

Each row undoes a technique by `cnnlab train` flags; `--row 'label=flags'` replaces the recipe's default rows.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from cnnlab.bench import bench
from cnnlab.config import DataConfig

# Per recipe: the techniques it uses, and the flags that undo each one.
ROWS: dict[str, dict[str, str]] = {
    "fast70": {
        "progressive resizing (20 px rising to 32 over 2/3 of the steps)": "--low-res 0",
        "selective TTA (flip views for images under 50% sure)": "--tta-below 1",
        "TTA (flip, selective)": "--tta none",
        "batch 128 (instead of 512 at lr 0.75)": "--batch-size 512 --lr 0.75",
        "1 epoch, no translation (instead of 1.5 epochs, 2 px)": "--epochs 1.5 --translate 2",
        "all of it (the recipe before issue 16)": "--batch-size 512 --lr 0.75 --epochs 1.5 --translate 2 --low-res 0 "
        "--tta flip-translate --tta-below 1",
    },
    "fast90": {
        "hard-example selection (9 epochs of the 2/3 with the highest losses; 6 full ones cost as much)": (
            "--select-share 1 --epochs 6"
        ),
        "progressive resizing (20 px rising to 32 over half the steps)": "--low-res 0",
        "selective TTA (views for images under 70% sure)": "--tta-below 1",
    },
    "fast94": {
        "hard-example selection (10 epochs of the 2/3 with the highest losses; 6.7 full ones cost as much)": (
            "--select-share 1 --epochs 6.7"
        ),
        "selective TTA (views for images under 70% sure)": "--tta-below 1",
    },
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True)
    parser.add_argument("--recipe", required=True, choices=sorted(ROWS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/ablation"))
    parser.add_argument("--row", action="append", default=[], help="'label=flags': undo a technique by these flags")
    parser.add_argument("--skip-as-is", action="store_true", help="leave out the recipe as it is (timed before)")
    args = parser.parse_args()
    rows = dict(row.split("=", 1) for row in args.row) if args.row else ROWS[args.recipe]
    table = [f"| {args.recipe} | accuracy (TTA) | delivered s | time to 70/90% s |", "|---|---|---|---|"]
    variants = [("as is", "")] * (not args.skip_as_is) + [(f"without {k}", v) for k, v in rows.items()]
    for index, (label, flags) in enumerate(variants):
        out = args.out / args.recipe / str(index)
        out.mkdir(parents=True, exist_ok=True)
        result = bench(
            [args.recipe],
            DataConfig(data=args.data),
            out,
            seeds=args.seeds,
            train_flags=shlex.split(flags),
            progress=lambda line: print(line, flush=True),
        )
        runs = result.rows
        accuracy = [r.scores.delivered_accuracy for r in runs]
        delivered = [r.delivered_seconds for r in runs]
        mark = "0.70" if args.recipe == "fast70" else "0.90"
        marks = [r.time_to[mark] for r in runs]
        table.append(
            f"| {label} `{flags}` | {_spread(accuracy, 100, '%')} | {_spread(delivered, 1, '')} | "
            f"{', '.join('-' if m is None else f'{m:.1f}' for m in marks)} |"
        )
        print("\n".join(table), flush=True)


def _spread(values: list[float], scale: float, unit: str) -> str:
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean * scale:.2f}{unit}"
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean * scale:.2f} ± {sd * scale:.2f}{unit}"


if __name__ == "__main__":
    main()
