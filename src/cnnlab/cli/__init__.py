"""The `cnnlab` command: a thin layer that parses flags and calls the library."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from cnnlab.cli.flags import render
from cnnlab.errors import CnnlabError

app = typer.Typer(
    help="Train, evaluate and use convolutional image classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# markup=False: messages carry paths and library errors, whose square brackets are not rich markup.
console = Console(highlight=False, soft_wrap=True, markup=False)
errors = Console(stderr=True, highlight=False, soft_wrap=True, markup=False)

# Exit codes besides each error's own (CnnlabError.exit_code: 2 for a usage or input error, 74 when a file
# system operation fails, 128 + N when stopped by signal N): 1 when some inputs failed (predict) or the
# reader of our output went away (click's own handling of EPIPE), 130 when interrupted.
EXIT_PARTIAL, EXIT_INTERRUPTED, EXIT_IO = 1, 130, 74


def handles_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn cnnlab's input errors into one line on stderr and a distinct exit code; no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except CnnlabError as error:
            errors.print(f"error: {render(error)}")
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:
            errors.print("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BrokenPipeError:
            raise  # click ends quietly with exit code 1: `cnnlab predict ... | head` closed our output
        except OSError as error:  # a file system fault the library did not foresee: still one line
            where = f"{error.filename}: " if error.filename else ""
            errors.print(f"error: {where}{error.strerror or error}")
            raise typer.Exit(EXIT_IO) from None

    return wrapper


@app.callback()
def setup() -> None:
    """Library warnings (skipped files and the like) go to stderr as plain lines."""
    logger = logging.getLogger("cnnlab")
    for previous in [handler for handler in logger.handlers if handler.name == "cnnlab-cli"]:
        logger.removeHandler(previous)
    handler = logging.StreamHandler(sys.stderr)  # this invocation's stderr: a test runner swaps it per call
    handler.name = "cnnlab-cli"
    handler.setFormatter(logging.Formatter("warning: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False


def print_whole(table: Table) -> None:
    """A table on stdout; a pipe or a log gets it whole, where rich would squeeze it into 80 columns."""
    whole = Measurement.get(console, console.options.update_width(1000), table).maximum
    (console if console.is_terminal else Console(width=whole, highlight=False, markup=False)).print(table)


def main() -> None:
    app()


# The commands register themselves on `app`.
from cnnlab.cli import labelling, training, using  # noqa: E402, F401
