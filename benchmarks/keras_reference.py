"""cnnlab's tutorial recipe against the tutorial's own Keras code, seed for seed, on the same decoded images.

Keras 3 runs on its torch backend, so both sides use the same torch build, threads and allocator settings;
neither needs TensorFlow. Prints each seed's test accuracy and seconds per epoch, then mean and standard
deviation: a single run of the MLP's last epoch swings by a few points, so only the spread compares.

    .venv/bin/pip install keras
    .venv/bin/python benchmarks/keras_reference.py --model tutorial-mlp --seeds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from cnnlab.data import DataConfig, Dataset, load_dataset
from cnnlab.recipes import recipe_values, resolve_run_config
from cnnlab.train import fit
from cnnlab.train.runtime import keep_freed_memory

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-png.tar.gz"


def keras_tutorial_model(keras, name: str, input_shape: tuple[int, int, int], classes: int):
    """The tutorial's Sequential model and compile call, as the tutorial writes them."""
    layers = keras.layers
    if name == "tutorial-mlp":
        model = keras.Sequential(
            [
                layers.Input(shape=input_shape),
                layers.Flatten(),
                layers.Dense(3000, activation="relu"),
                layers.Dense(1000, activation="relu"),
                layers.Dense(classes, activation="softmax"),
            ]
        )
        model.compile(optimizer="SGD", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        return model
    model = keras.Sequential(
        [
            layers.Input(shape=input_shape),
            layers.Conv2D(32, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Conv2D(64, (3, 3), activation="relu"),
            layers.MaxPooling2D((2, 2)),
            layers.Flatten(),
            layers.Dense(64, activation="relu"),
            layers.Dense(classes, activation="softmax"),
        ]
    )
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def keras_run(keras, name: str, dataset: Dataset, seed: int) -> tuple[float, float]:
    """(test accuracy, seconds per epoch) of the tutorial's Keras code."""
    keras.utils.set_random_seed(seed)
    x_train, x_test = dataset.train.images / 255.0, dataset.test.images / 255.0  # the tutorial's float64 scaling
    model = keras_tutorial_model(keras, name, dataset.image_shape.hwc, len(dataset.classes))
    epochs = int(recipe_values(name)["epochs"])  # the tutorial's, recorded once in cnnlab's recipe
    started = time.perf_counter()
    model.fit(x_train, dataset.train.labels, epochs=epochs, verbose=2)
    seconds = (time.perf_counter() - started) / epochs
    _, accuracy = model.evaluate(x_test, dataset.test.labels, verbose=0)
    return accuracy, seconds


def cnnlab_run(name: str, data: Path, dataset: Dataset, seed: int) -> tuple[float, float]:
    """(test accuracy, seconds per epoch) of cnnlab's recipe of the same name."""
    with tempfile.TemporaryDirectory() as folder:
        layer = {"train": {"recipe": name, "seed": seed}, "data": {"data": str(data)}, "out": folder}
        config = resolve_run_config(layer)
        history = fit(config, dataset).history
    return history[-1]["test_plain_accuracy"], statistics.mean(epoch["seconds"] for epoch in history)


def describe(label: str, runs: list[tuple[float, float]]) -> str:
    accuracies = [100 * accuracy for accuracy, _ in runs]
    spread = f" ± {statistics.stdev(accuracies):.2f}" if len(runs) > 1 else ""
    seconds = statistics.mean(s for _, s in runs)
    listed = " / ".join(f"{a:.2f}" for a in accuracies)
    return f"{label:>7}: {statistics.mean(accuracies):.2f}%{spread} (seeds: {listed}), {seconds:.1f} s/epoch"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tutorial-mlp", "tutorial-cnn"], default="tutorial-mlp")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--data", type=Path, default=SHARED_CIFAR)
    args = parser.parse_args()
    if not args.data.exists():
        print(f"skipped: {args.data} not found")
        return
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError as error:
        print(f"skipped: cannot import keras ({error}); pip install keras, which runs on torch without TensorFlow")
        return
    keep_freed_memory()  # what fit() sets for cnnlab, set here for both sides alike
    dataset = load_dataset(DataConfig(data=str(args.data)))
    print(f"{args.model} on {args.data}, Keras {keras.__version__} ({keras.backend.backend()} backend)")
    keras_runs, cnnlab_runs = [], []
    for seed in range(args.seeds):
        keras_runs.append(keras_run(keras, args.model, dataset, seed))
        cnnlab_runs.append(cnnlab_run(args.model, args.data, dataset, seed))
        print(f"seed {seed}: Keras {keras_runs[-1][0]:.2%}, cnnlab {cnnlab_runs[-1][0]:.2%}", flush=True)
    print(describe("Keras", keras_runs))
    print(describe("cnnlab", cnnlab_runs))


if __name__ == "__main__":
    main()
