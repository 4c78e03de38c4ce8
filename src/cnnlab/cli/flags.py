"""Command-line flags generated from the config dataclasses: each field's help text is said once, on the field.

`takes_config(DATA, TRAIN)` adds one `--field-name` option per field to a typer command and hands the
command the values given, as a `Flags` of {field: value} per section; flags left out are not in it, so
that a recipe's or a TOML file's value stands.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import typer

from cnnlab.config import SECTIONS, DataConfig, DoctorConfig, RunConfig, TrainConfig
from cnnlab.errors import CnnlabError, ConfigError
from cnnlab.models import MODELS


def _owners() -> dict[str, dict[str, type]]:
    """Each flag's name and the dataclass whose field it is: [data]'s fields; [train]'s own, its sections' and
    the model families' settings (all of them flat under [train], as flags and recipes give them)."""
    train: dict[str, type] = {name: TrainConfig for name in ("model", "recipe", "weights")}
    for section in [*SECTIONS.values(), *(spec.settings for spec in MODELS.values())]:
        train |= {field.name: section for field in dataclasses.fields(section)}
    return {
        "data": {field.name: DataConfig for field in dataclasses.fields(DataConfig)},
        "train": train,
        "doctor": {field.name: DoctorConfig for field in dataclasses.fields(DoctorConfig)},
    }


OWNERS = _owners()
DATA_FIELDS, TRAIN_FIELDS, DOCTOR_FIELDS = tuple(OWNERS["data"]), tuple(OWNERS["train"]), tuple(OWNERS["doctor"])
LABEL_FIELDS = ("labels", "path_column", "label_column", "class_names", "multi_label")  # a folder's label file


@dataclass
class Flags:
    """The config values given on the command line, by section."""

    data: dict[str, Any]
    train: dict[str, Any]
    out: str | None = None
    doctor: dict[str, Any] = dataclasses.field(default_factory=dict)

    def layer(self) -> dict[str, Any]:
        """As a config layer for `resolve_run_config`."""
        return {"data": self.data, "train": self.train, **({"out": self.out} if self.out else {})}


def flag_name(key: str) -> str:
    """`train.batch_size` -> `--batch-size`."""
    return "--" + key.rsplit(".", 1)[-1].replace("_", "-")


def _option(config: type, name: str) -> inspect.Parameter:
    field = next(f for f in dataclasses.fields(config) if f.name == name)
    hint = typing.get_type_hints(config)[name]
    options = [option for option in typing.get_args(hint) if option is not type(None)]
    kind: Any = options[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) else hint
    flag = flag_name(name)
    if typing.get_origin(kind) is Literal:  # typer lists an Enum's values as the flag's choices
        kind = _choices(name, [str(choice) for choice in typing.get_args(kind)])
        option = typer.Option(flag, help=field.metadata["help"])
    elif kind is bool:
        option = typer.Option(f"{flag}/--no-{flag[2:]}", help=field.metadata["help"])
    else:
        option = typer.Option(flag, help=field.metadata["help"])
    return inspect.Parameter(
        name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, option]
    )


def _choices(name: str, values: list[str]) -> Any:
    """An Enum of `values`, which typer offers as a flag's choices (one per field: its name is not a literal)."""
    return enum.Enum(name, {value: value for value in values}, type=str)


def takes_config(
    data: Iterable[str] = (), train: Iterable[str] = (), out: bool = False, doctor: Iterable[str] = ()
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one flag per named DataConfig / TrainConfig / DoctorConfig field (and RunConfig.out),
    delivered to it as its `flags: Flags` argument."""
    chosen = {"data": tuple(data), "train": tuple(train), "doctor": tuple(doctor)}

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(command, eval_str=True)
        own = [parameter for parameter in signature.parameters.values() if parameter.name != "flags"]
        added = [_option(OWNERS[section][name], name) for section, names in chosen.items() for name in names]
        added += [_option(RunConfig, "out")] if out else []

        @functools.wraps(command)
        def with_flags(**values: Any) -> Any:
            config_values = {name: _plain(values.pop(name)) for names in chosen.values() for name in names}
            given = {
                section: {name: config_values[name] for name in names if config_values[name] is not None}
                for section, names in chosen.items()
            }
            flags = Flags(given["data"], given["train"], values.pop("out", None) if out else None, given["doctor"])
            return command(**values, flags=flags)

        parameters = own + added
        with_flags.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
        with_flags.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        return with_flags

    return decorate


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def render(error: CnnlabError) -> str:
    """An error as the command line says it: config keys as flags, and how to continue a resumable run."""
    text = str(error)
    if isinstance(error, ConfigError):
        for key in error.keys:
            text = re.sub(rf"(?<![\w.-]){re.escape(key)}(?![\w-])", flag_name(key), text)
    if error.resume_from is not None:
        nproc = f" --nproc {error.processes}" if error.processes > 1 else ""
        text += f"; continue with: cnnlab train --resume {error.resume_from}{nproc}"
    return text
