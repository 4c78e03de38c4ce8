"""`run`: train a config or continue a run folder, in this process or in several launched by torchrun."""

from __future__ import annotations

import tempfile
from pathlib import Path

from cnnlab.atomic import make_folder, write_text
from cnnlab.config import RunConfig, to_toml
from cnnlab.errors import ConfigError
from cnnlab.run_dir import RunDir
from cnnlab.train.distributed import launch
from cnnlab.train.fit import TrainingResult, fit, resume
from cnnlab.train.reporter import Reporter


def run(
    config: RunConfig | None = None,
    *,
    resume_from: Path | None = None,
    epochs: float | None = None,
    nproc: int = 1,
    max_restarts: int = 0,
    reporter: Reporter | None = None,
    worker_flags: tuple[str, ...] = (),
) -> TrainingResult | None:
    """Train `config`, or continue the run in `resume_from` (optionally to another number of `epochs`).

    With `nproc` > 1 it launches that many `cnnlab train` processes on this machine (torchrun, DDP; each also
    given `worker_flags`), of which torchrun restarts the lot up to `max_restarts` times from the last
    checkpoint; the result is then in the run folder, and None is returned."""
    if (config is None) == (resume_from is None):
        raise ValueError("give a config to train, or a run folder to resume, not both")
    if nproc < 1 or max_restarts < 0 or (max_restarts and nproc == 1):
        raise ConfigError(
            "nproc must be at least 1, and max_restarts (0 or more) goes with nproc 2 or more", "nproc", "max_restarts"
        )
    if nproc == 1:
        if resume_from is not None:
            return resume(resume_from, epochs=epochs, reporter=reporter)
        assert config is not None
        return fit(config, reporter=reporter)
    if resume_from is not None:
        epochs_flag = ["--epochs", str(epochs)] if epochs is not None else []
        launch(
            ["train", "--resume", str(resume_from), *epochs_flag, *worker_flags], nproc, max_restarts, str(resume_from)
        )
        return None
    assert config is not None
    # The run folder is fixed first, so that processes torchrun restarts find the run to resume; the workers
    # read the resolved config from a temporary file.
    if not config.out:
        config.out = str(RunDir.default_path(config))
        make_folder(Path(config.out).parent)
    with tempfile.TemporaryDirectory() as folder:
        config_file = Path(folder) / RunDir.CONFIG
        write_text(config_file, to_toml(config))
        launch(["train", "--config", str(config_file), *worker_flags], nproc, max_restarts, config.out)
    return None
