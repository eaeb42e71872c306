"""Declared parameters: one declaration per setting, read by the CLI, the studio's forms and text parsing.

A setting (a policy's budget, the storage's group size) is declared once, as a dataclass field made
by `parameter(default, help=..., minimum=..., maximum=..., choices=...)`. `declared(cls)` turns a
dataclass's fields into `ParameterSpec`s: name, type, default, range, choices and help. Every user
interface reads those: the CLI generates its options from them, the forms their editors' ranges and
tooltips, and `parse_text` turns typed text ("budget=64", "measure_error=on") into a value of the
declared type, with one reading of booleans for everything.

This module sits below policies and storage (it imports only the errors), so both declare with it.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import field
from typing import Any

from kvstudio.core.errors import KVStudioError

TRUE_WORDS = ("on", "true", "1", "yes")
FALSE_WORDS = ("off", "false", "0", "no")


def parameter(default: Any, *, help: str, minimum: float | None = None, maximum: float | None = None,
              choices: tuple | None = None, label: str | None = None, metavar: str | None = None):
    """Declare a parameter: a dataclass field that carries what forms and the CLI need. `label` is the
    form's name for it (default: the name with spaces), `metavar` the CLI's placeholder."""
    return field(default=default, metadata={"help": help, "minimum": minimum, "maximum": maximum, "choices": choices,
                                            "label": label, "metavar": metavar})


@dataclasses.dataclass(frozen=True)
class ParameterSpec:
    """What a user interface needs to know about one parameter."""

    name: str
    type: type  # int, float, bool or str
    default: Any
    help: str
    optional: bool  # None is an accepted value
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple | None = None
    label: str | None = None  # the form's label; None: the name with spaces
    metavar: str | None = None  # the CLI's placeholder; None: the type's name

    @property
    def option(self) -> str:
        """The CLI option: --group-size for group_size."""
        return "--" + self.name.replace("_", "-")

    @property
    def form_label(self) -> str:
        return self.label or self.name.replace("_", " ")


def _base_type(annotation) -> tuple[type, bool]:
    """int | None -> (int, True); float -> (float, False)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {}, {})  # annotations are plain builtins: int, float, bool, str
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        inner = [arg for arg in args if arg is not type(None)]
        return inner[0], True
    return annotation, False


def declared(cls) -> list[ParameterSpec]:
    """The ParameterSpecs of a dataclass's fields, in field order."""
    return list(_declared(cls))


@functools.lru_cache(maxsize=256)  # every policy built validates through this; type hints cost ~0.2 ms a class
def _declared(cls) -> tuple[ParameterSpec, ...]:
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        base, optional = _base_type(hints[f.name])
        meta = f.metadata
        specs.append(ParameterSpec(f.name, base, f.default, meta.get("help", ""), optional, meta.get("minimum"),
                                   meta.get("maximum"), meta.get("choices"), meta.get("label"), meta.get("metavar")))
    return tuple(specs)


def parse_bool(text: str, what: str, error: type[KVStudioError] = KVStudioError) -> bool:
    """"on"/"true"/"1"/"yes" -> True, "off"/"false"/"0"/"no" -> False; anything else is refused, naming `what`."""
    word = str(text).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise error(f"{what}: '{text}' is not on or off (write on/true/1 or off/false/0)")


def parse_text(spec: ParameterSpec, text, what: str | None = None, error: type[KVStudioError] = KVStudioError):
    """A typed value of `spec` from text (a --variant's NAME=VALUE): a value already of the type passes;
    'none' gives None where None is accepted. Range and choices are the config's own check."""
    what = what or f"{spec.name}={text}"
    if not isinstance(text, str):
        return text
    if spec.optional and text.strip().lower() in ("none", ""):
        return None
    if spec.type is bool:
        return parse_bool(text, what, error)
    try:
        return spec.type(text)
    except ValueError:
        raise error(f"{what}: {spec.option} takes a{'n' if spec.type is int else ''} {spec.type.__name__}") from None


def check_value(spec: ParameterSpec, value, error: type[KVStudioError] = KVStudioError):
    """`value` checked against its declaration (type, range, choices); returns it (an int widened to float
    where a float is declared). The message names the CLI option and what would be accepted."""
    if value is None:
        if not spec.optional:
            raise error(f"{spec.option} needs a value")
        return None
    if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, spec.type) or (spec.type is int and isinstance(value, bool)):
        raise error(f"{spec.option} must be {spec.type.__name__}, got {value!r}")
    if spec.minimum is not None and spec.maximum is not None and not spec.minimum <= value <= spec.maximum:
        raise error(f"{spec.option} must be between {spec.minimum:g} and {spec.maximum:g}, got {value}")
    if spec.minimum is not None and value < spec.minimum:
        raise error(f"{spec.option} must be at least {spec.minimum:g}, got {value}")
    if spec.maximum is not None and value > spec.maximum:
        raise error(f"{spec.option} must be at most {spec.maximum:g}, got {value}")
    if spec.choices is not None and value not in spec.choices:
        raise error(f"{spec.option} must be one of {', '.join(map(str, spec.choices))}, got {value!r}")
    return value
