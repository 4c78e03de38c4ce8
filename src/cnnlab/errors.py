"""The exception types that reach the user as a single line instead of a traceback."""

from __future__ import annotations

from pathlib import Path


class CnnlabError(Exception):
    """A problem with the user's input or environment: a bad path, file, argument or setting.

    The message names the thing at fault and says what was expected; a front end prints it alone and
    exits with `exit_code`. `resume_from` is a run folder whose last checkpoint is intact, for a front end
    to say how it continues the run (the CLI: `cnnlab train --resume DIR`)."""

    exit_code = 2  # a usage or input error
    resume_from: Path | None = None
    processes = 1  # how many processes the run to resume trained in

    def resumable(self, run_dir: Path, processes: int = 1) -> CnnlabError:
        self.resume_from, self.processes = run_dir, processes
        return self


class ConfigError(CnnlabError):
    """A config value the library refuses. The message names each value by its key, `section.key`
    (train.batch_size), listed in `keys`, so that a front end can name it its own way (the CLI: --batch-size)."""

    def __init__(self, message: str, *keys: str):
        super().__init__(message)
        self.keys = keys


def first_line(error: BaseException) -> str:
    """The first line of a library's error message (or its type's name): enough to quote in one of ours."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
