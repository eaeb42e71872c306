"""Checking that data read from a file has the shape its reader depends on, with pydantic.

A file KV Studio wrote may come back changed: damaged, edited, or made by someone else to look like
one. A checksum catches damage, not a file written to fool it; a reader that indexes
`header["policy"]["parameters"]` then meets a list, a string where a number belongs, a key missing,
and fails with a KeyError or TypeError nobody can act on. Each reader declares the shape it relies
on (TypedDicts, checked strictly: no "64" for 64, no true for 1), and `shape_problem` says in words
where the data departs from it, for the reader's own one-line error.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Annotated

from pydantic import AfterValidator, TypeAdapter, ValidationError


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def _in_64_bits(value: int) -> int:
    if not -2**63 <= value < 2**64:
        raise ValueError("beyond 64 bits")
    return value


FiniteNumber = Annotated[float, AfterValidator(_finite)]  # strict float takes ints too
Integer = Annotated[int, AfterValidator(_in_64_bits)]


@lru_cache(maxsize=None)
def _adapter(shape) -> TypeAdapter:
    return TypeAdapter(shape)


def shape_problem(data, shape) -> str | None:
    """Where `data` departs from `shape` (a type pydantic checks), in words; None when it fits."""
    try:
        _adapter(shape).validate_python(data, strict=True)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the whole"
        return f"{where}: {first['msg'][0].lower()}{first['msg'][1:]}"
    except RecursionError:
        return "it is nested too deeply"
    return None
