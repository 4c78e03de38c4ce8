"""TensorBoard: standard event files in the run folder's tensorboard/ (`tensorboard --logdir runs`)."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
from PIL import Image

from cnnlab.config import to_toml
from cnnlab.run_dir import RunDir
from cnnlab.tracking.loggers import RunFacts, missing_extra, parameters_of

# The run report's figures that go to TensorBoard as images, when the report wrote them.
IMAGES = {"confusion matrix": "confusion_matrix.png", "sample predictions": "sample_predictions.png"}


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run_dir: RunDir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise missing_extra("tensorboard", error) from None
        self.writer = SummaryWriter(log_dir=str(run_dir / RunDir.TENSORBOARD))
        self.parameters: dict[str, Any] = {}

    def start(self, run: RunFacts) -> None:
        self.writer.add_text("config", f"```\n{to_toml(run.config)}\n```")
        self.writer.add_text("machine", f"{run.machine_kind}, {run.precision}")

    def log_steps(self, steps: list[tuple[int, float, float]]) -> None:
        for step, loss, lr in steps:
            self.writer.add_scalar("step/loss", loss, step)
            self.writer.add_scalar("step/lr", lr, step)

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if key != "epoch" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(f"epoch/{key}", value, metrics["epoch"])
        self.writer.flush()

    def publish(self, run_dir: RunDir, final: dict[str, float]) -> None:
        for tag, name in IMAGES.items():
            if (run_dir / name).is_file():
                with Image.open(run_dir / name) as picture:
                    self.writer.add_image(tag, np.asarray(picture.convert("RGB")), dataformats="HWC")
        parameters = parameters_of(run_dir.read_config())
        # In this run's own event folder (run_name "."), not a new one beside it.
        self.writer.add_hparams(parameters, {f"final/{key}": value for key, value in final.items()}, run_name=".")

    def stopped(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
