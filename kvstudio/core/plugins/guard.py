"""One guard for every call into policy code: whatever a policy does wrong becomes a PolicyError.

A policy (a plugin above all) is code KV Studio does not control. Every place the engine, the CLI
or the studio calls into it goes through `call_policy` (methods: budget_for, limit_for,
attention_queries, new_layer_state, select) or `build_policy` (its Config, validate() and
__init__): any exception, and SystemExit too, comes out as a `PolicyFault` (a PolicyError) naming
the policy, its file and the line that raised. The CLI prints it as one line with exit status 2;
the studio shows it in its banner and keeps the window.

What passes through unchanged:
  - KeyboardInterrupt and other non-Exception stops (interruptions.Terminated for SIGTERM), and
    out-of-memory errors, which say what ran
    out (core/runtime/oom.py names the policy when its code was the one allocating);
  - a PolicyConfigError raised while the policy is being configured: that is the contract's way
    to refuse parameters, and its message already says what to change;
  - a PolicyFault from an inner guarded call (a policy's __init__ calling budget_for).

`describe_problem(policy_class)` checks, when a plugin loads, that its Config can be described
(the CLI options and the studio's form are generated from it); a policy that cannot is not
registered, and its plugin is shown as broken.
"""

from __future__ import annotations

import dataclasses
import inspect
import numbers
import traceback
from pathlib import Path
from typing import Any, Callable

from kvstudio.core.errors import PolicyConfigError, PolicyError, is_out_of_memory
from kvstudio.core.policies import BUILT_IN, available_policies, source_of
from kvstudio.core.policies.base import PolicyConfig

PARAMETER_TYPES = (int, float, bool, str)


class PolicyFault(PolicyError):
    """Policy code raised, exited or returned something unusable; the message says where."""


# --- where a policy lives -------------------------------------------------------------------------


def policy_name(policy) -> str:
    cls = policy if inspect.isclass(policy) else type(policy)
    name = getattr(cls, "name", None)
    return name if isinstance(name, str) else cls.__name__


def policy_source(policy) -> str | None:
    """The plugin file or folder a policy came from; None for a built-in or an unregistered class."""
    source = source_of(policy_name(policy))
    return None if source in (None, BUILT_IN) else source


def policy_label(policy) -> str:
    """'name', or 'name' (plugin FILE): every message says where to look."""
    source = policy_source(policy)
    return f"'{policy_name(policy)}'" + ("" if source is None else f" (plugin {source})")


def _code_files(policy) -> list[str]:
    """Files whose frames count as the policy's own code: its plugin file or folder and the
    modules of its classes (an entry point's package, a built-in's file)."""
    cls = policy if inspect.isclass(policy) else type(policy)
    files = []
    source = policy_source(policy)
    if source is not None and not source.startswith("entry point"):
        files.append(str(Path(source)))
    for klass in (cls, getattr(cls, "Config", None)):
        try:
            files.append(inspect.getfile(klass))
        except (TypeError, OSError):
            pass
    return files


def fault_line(error: BaseException, files: list[str]) -> tuple[str, int] | None:
    """(file name, line) of the innermost traceback frame inside one of `files`, or None."""
    found = None
    for frame in traceback.extract_tb(error.__traceback__):
        if any(frame.filename == f or frame.filename.startswith(f.rstrip("/") + "/") for f in files):
            found = (Path(frame.filename).name, frame.lineno)
    return found


def definition_line(policy, method: str) -> str:
    """'select() at FILE line N': where the method that returned something unusable is written."""
    cls = policy if inspect.isclass(policy) else type(policy)
    function = inspect.getattr_static(cls, method, None)
    try:
        lines = inspect.getsourcelines(function)
        return f"{method}() at {Path(inspect.getfile(function)).name} line {lines[1]}"
    except (TypeError, OSError):
        return f"{method}()"


def _described(error: BaseException) -> str:
    if isinstance(error, SystemExit):
        return f"called sys.exit({error.code!r}); a policy must raise an exception, never exit"
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def fault(policy, method: str, layer: int | None, error: BaseException) -> PolicyFault:
    """A PolicyFault for `error` raised by `method` ("select"), in `layer` when there is one:
    "policy 'x' (plugin F) raised in layer 3: ValueError: ... (select() at x.py line 12)"."""
    where = fault_line(error, _code_files(policy))
    at = f" at {where[0]} line {where[1]}" if where else ""
    if layer is None:
        return PolicyFault(f"policy {policy_label(policy)} raised in {method}: {_described(error)}"
                           + (f" ({at.strip()})" if at else ""))
    return PolicyFault(f"policy {policy_label(policy)} raised in layer {layer}: {_described(error)} ({method}{at})")


def _passes_through(error: BaseException, configuring: bool) -> bool:
    # Exceptions and SystemExit are the policy's faults; other BaseExceptions (KeyboardInterrupt,
    # the Terminated of a SIGTERM) are the user or the system stopping the run.
    if not isinstance(error, (Exception, SystemExit)) or isinstance(error, PolicyFault) or is_out_of_memory(error):
        return True
    return configuring and isinstance(error, PolicyConfigError)


# --- the guard ------------------------------------------------------------------------------------


def call_policy(policy, method: str, layer: int | None, function: Callable, *args) -> Any:
    """function(*args), with any fault of policy code turned into a PolicyFault whose message
    names the policy, its file, `method` ("select()"), the layer (or None) and the line."""
    try:
        return function(*args)
    except BaseException as error:
        if _passes_through(error, configuring=False):
            raise
        raise fault(policy, method, layer, error) from error


def build_policy(cls, params: dict) -> Any:
    """cls(**params): the policy's Config, its validate() and the policy's __init__, guarded.
    A PolicyConfigError (bad parameters) comes out as it is."""
    try:
        return cls(**params)
    except BaseException as error:
        if _passes_through(error, configuring=True):
            raise
        raise fault(cls, "its configuration (Config, validate() or __init__)", None, error) from error


def checked_count(policy, method: str, value, *, minimum: int, allow_none: bool, layer: int | None = None):
    """A budget or a query count a policy returned: an int >= minimum (or None where allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        layer_text = "" if layer is None else f" for layer {layer}"
        accepted = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise PolicyFault(f"policy {policy_label(policy)} returned {_shown(value)} from "
                          f"{definition_line(policy, method)}{layer_text}; expected {accepted}")
    return int(value)


def _shown(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"


def returned_wrong_type(policy, method: str, value, expected: str, layer: int | None = None) -> PolicyFault:
    layer_text = "" if layer is None else f" in layer {layer}"
    return PolicyFault(f"policy {policy_label(policy)} returned {_shown(value)} from "
                       f"{definition_line(policy, method)}{layer_text}; expected {expected}")


# --- can the policy's options be described? ------------------------------------------------------


def describe_problem(cls) -> str | None:
    """Why the policy's Config cannot be turned into CLI options and a form; None when it can."""
    config = getattr(cls, "Config", None)
    if not (inspect.isclass(config) and issubclass(config, PolicyConfig) and dataclasses.is_dataclass(config)):
        return f"its Config must be a dataclass subclass of PolicyConfig, got {config!r}"
    try:
        specs = config.parameters()
    except BaseException as error:
        if isinstance(error, KeyboardInterrupt):
            raise
        where = fault_line(error, _code_files(cls))
        at = f" (line {where[1]} of {where[0]})" if where else ""
        return f"its Config cannot be described{at}: {_described(error)}"
    for spec in specs:
        problem = _parameter_problem(spec)
        if problem:
            return f"parameter '{spec.name}' {problem}"
    return None


def _parameter_problem(spec) -> str | None:
    if spec.type not in PARAMETER_TYPES:
        return (f"has type {getattr(spec.type, '__name__', spec.type)!r}; a parameter must be int, float, bool "
                "or str (or one of them | None)")
    if spec.default is dataclasses.MISSING:
        return "has no default; declare it with parameter(default, help=...)"
    if not _fits(spec.default, spec.type) and not (spec.default is None and spec.optional):
        return f"has default {spec.default!r}, which is not a {spec.type.__name__}"
    for bound in ("minimum", "maximum"):
        value = getattr(spec, bound)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            return f"has {bound} {value!r}; it must be a number"
    if spec.choices is not None:
        if not isinstance(spec.choices, (tuple, list)) or not spec.choices:
            return f"has choices {spec.choices!r}; give a non-empty tuple"
        if not all(_fits(choice, spec.type) for choice in spec.choices):
            return f"has choices {spec.choices!r} that are not all {spec.type.__name__}"
    return None


def _fits(value, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


# --- the last net ----------------------------------------------------------------------------------


def fault_from_traceback(error: BaseException, plugin_sources: list[str] | None = None) -> PolicyFault | None:
    """For an error that escaped every guard (a policy method nobody expected to fail, such as an
    overridden describe()): a PolicyFault naming the innermost plugin frame in its traceback, or
    None when no plugin code was involved. `plugin_sources` defaults to every registered plugin."""
    if plugin_sources is None:
        plugin_sources = [source for name in available_policies() if (source := source_of(name)) != BUILT_IN]
    files = [str(Path(s)) for s in plugin_sources if s and not s.startswith("entry point")]
    innermost = None
    for frame in traceback.extract_tb(error.__traceback__):
        for source in files:
            if frame.filename == source or frame.filename.startswith(source.rstrip("/") + "/"):
                innermost = (source, frame.lineno)
    if innermost is None:
        return None
    return PolicyFault(f"plugin {innermost[0]} raised at line {innermost[1]}: {_described(error)}")
