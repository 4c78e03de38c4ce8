"""MLflow: the run as an MLflow run, at $MLFLOW_TRACKING_URI or MLflow's own local default (./mlflow.db).

The MLflow run's id is kept in the run folder's tracking.json, so that a resumed run, and `publish` after the
report, log into the same one. Requests fail fast (no retries, a few seconds' timeout, unless the environment
says otherwise): a server that went away costs a warning, not minutes of retrying.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from cnnlab.atomic import write_text
from cnnlab.run_dir import RunDir
from cnnlab.tracking.loggers import RunFacts, missing_extra, parameters_of

EXPERIMENT = "cnnlab"  # unless $MLFLOW_EXPERIMENT_NAME names another
REQUEST_RETRIES, REQUEST_TIMEOUT_S = "0", "5"
BATCH = 1000  # MLflow takes at most 1,000 metrics and 100 parameters per request
PARAMETERS_PER_BATCH = 100
# The files of a finished run that go up as artifacts.
ARTIFACTS = (RunDir.WEIGHTS, RunDir.INFO, RunDir.CONFIG, RunDir.METRICS, RunDir.REPORT, RunDir.EVALUATION)


class MlflowTracker:
    name = "mlflow"

    def __init__(self, run_dir: RunDir):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", REQUEST_RETRIES)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", REQUEST_TIMEOUT_S)
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as error:
            raise missing_extra("mlflow", error) from None
        self.run_dir = run_dir
        recorded = self._recorded()
        # A run logged before goes on where it was logged, whatever $MLFLOW_TRACKING_URI says now.
        self.client = MlflowClient(recorded.get("uri"))
        self.run_id: str | None = recorded.get("run_id")

    def _recorded(self) -> dict[str, Any]:
        """What tracking.json says of this run's MLflow run; nothing when it is absent or unreadable (a new one)."""
        path = self.run_dir / RunDir.TRACKING
        try:
            recorded = json.loads(path.read_text()).get("mlflow", {}) if path.is_file() else {}
        except (OSError, ValueError, AttributeError):
            return {}
        return recorded if isinstance(recorded, dict) else {}

    def start(self, run: RunFacts) -> None:
        from mlflow.entities import Param, RunTag

        tags = {
            "machine_kind": run.machine_kind,
            "precision": run.precision,
            "model": run.config.train.model,
            "data": run.config.data.label,
            "run_folder": str(run.run_dir.path.resolve()),
        }
        if self.run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME", EXPERIMENT)
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            self.run_id = self.client.create_run(experiment_id, run_name=run.run_dir.path.name).info.run_id
            uri = self.client.tracking_uri
            write_text(self.run_dir / RunDir.TRACKING, json.dumps({"mlflow": {"run_id": self.run_id, "uri": uri}}))
            items = [Param(key, str(value)) for key, value in parameters_of(run.config).items()]
            for first in range(0, len(items), PARAMETERS_PER_BATCH):
                self.client.log_batch(self.run_id, params=items[first : first + PARAMETERS_PER_BATCH])
        else:
            self.client.update_run(self.run_id, status="RUNNING")
        self.client.log_batch(self.run_id, tags=[RunTag(key, value) for key, value in tags.items()])

    def _metrics(self, values: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        assert self.run_id is not None, "start comes first"
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value, step in values]
        for first in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[first : first + BATCH])

    def log_steps(self, steps: list[tuple[int, float, float]]) -> None:
        self._metrics([item for step, loss, lr in steps for item in (("step_loss", loss, step), ("step_lr", lr, step))])

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        numbers = {key: value for key, value in metrics.items() if isinstance(value, int | float)}
        self._metrics([(key, value, metrics["epoch"]) for key, value in numbers.items() if key != "epoch"])

    def publish(self, run_dir: RunDir, final: dict[str, float]) -> None:
        if self.run_id is None:
            raise RuntimeError("no MLflow run was started for this run (see the warning as it started); nothing sent")
        self._metrics([(f"final_{key}", value, 0) for key, value in final.items()])
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        for figure in sorted(run_dir.path.glob("*.png")):
            self.client.log_artifact(self.run_id, str(figure), "figures")
        self.client.set_terminated(self.run_id, "FINISHED")

    def stopped(self) -> None:
        if self.run_id is not None:
            self.client.set_terminated(self.run_id, "KILLED")  # RUNNING again when it resumes

    def close(self) -> None:
        pass
