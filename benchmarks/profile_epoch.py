"""Where a training epoch's time goes: one run of a recipe under the PyTorch profiler, its steps split by the
engine's marks (data: batches drawn and augmented; forward with the loss; backward; optimizer with the
schedule; hooks: selection, weight averaging, progress, checkpoints) and, inside each, by kind of operation.

    PYTHONPATH=src python benchmarks/profile_epoch.py fast70 --data ../shared/data/cifar10-png.tar.gz
    PYTHONPATH=src python benchmarks/profile_epoch.py fast94 --data ../shared/data/cifar10-png.tar.gz --epochs 1

"Python" is time inside a mark that no PyTorch operation accounts for: the interpreter, and the framework code
between operations. An operation's time is its own (self) time on the training thread, its children apart.
"""

from __future__ import annotations

import argparse
import tempfile
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from cnnlab.recipes import resolve_run_config
from cnnlab.train.fit import fit

MARKS = ("data", "forward", "backward", "optimizer", "hooks")
KINDS = ("convolution", "matmul", "batchnorm", "other ops", "python")


def kind_of(operation: str) -> str:
    if "convolution" in operation:
        return "convolution"
    if any(name in operation for name in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear")):
        return "matmul"
    if "batch_norm" in operation:
        return "batchnorm"
    return "other ops"


def descendants(event: FunctionEvent) -> Iterable[FunctionEvent]:
    for child in event.cpu_children:
        yield child
        yield from descendants(child)


def breakdown(events: Iterable[FunctionEvent]) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Seconds per mark and per kind inside it ("wall": the mark's whole time), and per operation."""
    table: dict[str, dict[str, float]] = {mark: defaultdict(float) for mark in MARKS}
    operations: dict[str, float] = defaultdict(float)
    for event in events:
        if event.name not in MARKS:
            continue
        row = table[event.name]
        row["wall"] += event.cpu_time_total / 1e6
        row["python"] += event.self_cpu_time_total / 1e6
        for inner in descendants(event):
            if inner.name in MARKS:  # a mark inside another (none today): counted once, in its own row
                continue
            row[kind_of(inner.name)] += inner.self_cpu_time_total / 1e6
            operations[inner.name] += inner.self_cpu_time_total / 1e6
    return table, operations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe")
    parser.add_argument("--data", required=True, help="an image folder, archive or CIFAR archive")
    parser.add_argument("--epochs", type=float, help="the recipe's own unless given")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precision", help="the recipe's (auto: what is fast here) unless given")
    parser.add_argument("--top", type=int, default=12, help="how many of the most costly operations to list")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    args = parser.parse_args()
    train = {"recipe": args.recipe, "seed": args.seed, "compile": args.compile}
    train |= {"epochs": args.epochs} if args.epochs is not None else {}
    train |= {"precision": args.precision} if args.precision is not None else {}
    with tempfile.TemporaryDirectory() as scratch:
        config = resolve_run_config({"data": {"data": args.data}, "train": train, "out": str(Path(scratch) / "run")})
        with profile(activities=[ProfilerActivity.CPU]) as profiler:
            result = fit(config)
    epoch_seconds = sum(metrics["seconds"] for metrics in result.history)
    table, operations = breakdown(profiler.events())
    marked = sum(row["wall"] for row in table.values())
    print(f"{args.recipe}: {len(result.history)} epoch(s), {epoch_seconds:.1f} s of training under the profiler")
    print(f"{'':<10}{'seconds':>9}{'share':>7}" + "".join(f"{kind:>13}" for kind in KINDS))
    totals = {"wall": marked} | {kind: sum(row[kind] for row in table.values()) for kind in KINDS}
    for mark, row in [*table.items(), ("all marks", totals)]:
        kinds = "".join(f"{row[kind]:>13.2f}" for kind in KINDS)
        print(f"{mark:<10}{row['wall']:>9.2f}{row['wall'] / epoch_seconds:>7.0%}{kinds}")
    rest = epoch_seconds - marked
    print(f"{'unmarked':<10}{rest:>9.2f}{rest / epoch_seconds:>7.0%}  (the loop itself, and each epoch's end)")
    print("the most costly operations (seconds, own time):")
    for name, seconds in sorted(operations.items(), key=lambda item: -item[1])[: args.top]:
        print(f"  {seconds:8.2f}  {seconds / epoch_seconds:4.0%}  {name}")


if __name__ == "__main__":
    main()
