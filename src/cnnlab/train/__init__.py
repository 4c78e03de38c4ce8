"""Training: fit a registered model to a dataset, with checkpoints, exact resume and metric logs."""

from cnnlab.train.fit import TrainingResult, fit, read_run_config, resume

__all__ = ["TrainingResult", "fit", "read_run_config", "resume"]
