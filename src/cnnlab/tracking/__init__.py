"""Runs followed and compared: the table of every run under a folder (`catalog`), and the experiment trackers
training can also log to (TensorBoard, MLflow)."""
