"""Training: fit a registered model to a dataset, with checkpoints, exact resume and metric logs."""

from cnnlab.train.fit import TrainingResult, fit, resume
from cnnlab.train.orchestrate import run

__all__ = ["TrainingResult", "fit", "resume", "run"]
