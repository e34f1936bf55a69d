"""The flags of ``espro serve``, generated from the fields of :mod:`serving.settings`.

Every field of :class:`~serving.settings.LaunchConfig`, :class:`~serving.settings.AppConfig`
and :class:`~serving.settings.DeploymentOptions` is a flag named after it, whose help is the
field's docstring and whose default is the field's, so neither is restated here;
:data:`SPELLINGS` holds the few fields spelled otherwise or counted in other units.
"""

from __future__ import annotations

import argparse
import re
import types
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from serving.settings import (
    AppConfig,
    DeploymentOptions,
    LaunchConfig,
    MiB,
    ServeSettings,
    check_batch_fits,
)

Model = type[BaseModel]


@dataclass(frozen=True)
class Spelling:
    """A field's flag where it is not ``--field-name``."""

    flag: str | None
    """The flag; fields that share one all take its value. None: no flag."""
    scale: float = 1.0
    """Flag units per field unit: 1000 for a flag in milliseconds of a field in seconds."""


SPELLINGS: dict[tuple[Model, str], Spelling] = {
    (AppConfig, "bundles"): Spelling(None),  # the positional arguments
    (DeploymentOptions, "num_replicas"): Spelling("--replicas"),
    (DeploymentOptions, "num_cpus"): Spelling("--replica-cpus"),
    (AppConfig, "batch_wait_timeout_s"): Spelling("--batch-wait-ms", 1000),
    (AppConfig, "max_body_bytes"): Spelling("--max-body-mb", 1 / MiB),
    (AppConfig, "direct_host"): Spelling("--host"),  # where every door listens
    (LaunchConfig, "num_cpus"): Spelling("--ray-cpus"),
    (LaunchConfig, "num_gpus"): Spelling("--ray-gpus"),
}


@dataclass
class Flag:
    """One flag of ``espro serve`` and the settings fields it sets."""

    name: str
    scale: float
    fields: list[tuple[Model, str]] = field(default_factory=list)

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")

    @property
    def info(self) -> FieldInfo:
        """The first field's: its docstring and default are the flag's help and default."""
        model, name = self.fields[0]
        return model.model_fields[name]


def _collect() -> dict[str, Flag]:
    """The flags by name, in the fields' order: one per field, or per shared spelling."""
    flags: dict[str, Flag] = {}
    for model in (LaunchConfig, AppConfig, DeploymentOptions):
        for name in model.model_fields:
            plain = Spelling("--" + name.replace("_", "-"))
            spelling = SPELLINGS.get((model, name), plain)
            if spelling.flag is not None:
                flag = flags.setdefault(spelling.flag, Flag(spelling.flag, spelling.scale))
                flag.fields.append((model, name))
    return flags


FLAGS: dict[str, Flag] = _collect()


def _plain(docstring: str | None) -> str:
    """A docstring as help text: reST roles and literals as plain text, ``%`` escaped."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", docstring or "").replace("``", "")
    return " ".join(text.split()).replace("%", "%%")


def _help(flag: Flag) -> str:
    text = _plain(flag.info.description)
    default = flag.info.get_default()
    if default is not None and not isinstance(default, bool):
        shown = f"{default * flag.scale:g}" if isinstance(default, int | float) else default
        text += f" (default: {shown})"
    if len(flag.fields) > 1:
        text += " Sets " + ", ".join(f"{m.__name__}.{n}" for m, n in flag.fields) + "."
    return text


def _value_type(annotation: Any) -> Any:
    """``X`` of an optional ``X | None``; the annotation itself otherwise."""
    if get_origin(annotation) in (Union, types.UnionType):
        (annotation,) = [a for a in get_args(annotation) if a is not type(None)]
    return annotation


def _argument(flag: Flag) -> dict[str, Any]:
    """``add_argument``'s keywords for ``flag``: its type, choices or action."""
    kind = _value_type(flag.info.annotation)
    if kind is bool:
        return {"action": argparse.BooleanOptionalAction}
    if get_origin(kind) is Literal:
        return {"choices": list(get_args(kind))}
    if flag.scale != 1:
        return {"type": float}
    if kind in (int, float, str):
        return {"type": kind}
    raise TypeError(f"{flag.name}: no command-line form for {kind!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bundles and every flag; an absent flag leaves its fields at their defaults."""
    bundles = AppConfig.model_fields["bundles"]
    parser.add_argument("bundles", nargs="+", help=_plain(bundles.description))
    for flag in FLAGS.values():
        parser.add_argument(flag.name, dest=flag.dest, help=_help(flag), **_argument(flag))


def _field_value(value: Any, flag: Flag, model: Model, name: str) -> Any:
    if flag.scale == 1:
        return value
    value /= flag.scale
    return int(value) if _value_type(model.model_fields[name].annotation) is int else value


def serve_configs(args: argparse.Namespace) -> ServeSettings:
    """The settings the parsed flags give; a ``ValueError`` (a pydantic ``ValidationError``
    for a single field) where they are invalid."""
    data: dict[Model, dict[str, Any]] = {
        AppConfig: {"bundles": args.bundles},
        DeploymentOptions: {},
        LaunchConfig: {},
    }
    for flag in FLAGS.values():
        value = getattr(args, flag.dest)
        if value is not None:
            for model, name in flag.fields:
                data[model][name] = _field_value(value, flag, model, name)
    settings = ServeSettings(
        AppConfig.model_validate(data[AppConfig]),
        DeploymentOptions.model_validate(data[DeploymentOptions]),
        LaunchConfig.model_validate(data[LaunchConfig]),
    )
    check_batch_fits(settings.app, settings.deployment)
    return settings
