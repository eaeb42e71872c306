"""Policy plugins: Python files (or package folders) that define policies on the public contract.

Where plugins come from, in this order:
  1. the repository's `plugins/` folder (examples that ship with KV Studio),
  2. the user's plugin folder (`<user data dir>/plugins`; KVSTUDIO_DATA_DIR overrides the data dir),
  3. folders given with `--plugins DIR` (or chosen in the studio),
  4. folders in KVSTUDIO_PLUGIN_PATH (separated like PATH),
  5. installed packages, through the entry-point group `kvstudio.policies` (each entry names a
     Policy subclass or a module).

Plugins are code and run with the user's rights. KV Studio imports only from the folders above and
packages the user installed; it never imports a policy named inside a run file, a cache file or a
prompt. Each plugin is isolated: one that fails to import, defines no policy, or reuses a taken
name is reported with its file and the error, and every other policy keeps working.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import sys
import traceback
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path

from kvstudio.core import policies as registry
from kvstudio.core.plugins.guard import describe_problem
from kvstudio.core.policies.base import Policy
from kvstudio.core.storage import register_codec, unregister_codec
from kvstudio.core.storage.base import Codec

ENTRY_POINT_GROUP = "kvstudio.policies"
REPOSITORY_PLUGINS = Path(__file__).resolve().parents[3] / "plugins"


@dataclass
class PluginRecord:
    """One plugin source and what became of it."""

    source: str  # a file or folder path, or "entry point NAME"
    policies: list[str] = field(default_factory=list)
    error: str | None = None
    broken: list[str] = field(default_factory=list)  # policies it defines that cannot describe their options
    codecs: list[str] = field(default_factory=list)  # storage codecs the file adds (core.storage.base.Codec)

    @property
    def status(self) -> str:
        if self.broken:
            return "broken"
        if self.error:
            return "error"
        return "loaded" if self.policies or self.codecs else "no policies"


def user_data_dir() -> Path:
    override = os.environ.get("KVSTUDIO_DATA_DIR")
    if override:
        return Path(override)
    import platformdirs

    return Path(platformdirs.user_data_dir("kvstudio"))


def user_plugin_dir() -> Path:
    return user_data_dir() / "plugins"


def plugin_folders(extra: list[str | Path] = ()) -> list[Path]:
    """The folders searched, in order, without duplicates."""
    folders = [REPOSITORY_PLUGINS, user_plugin_dir(), *map(Path, extra)]
    folders += [Path(p) for p in os.environ.get("KVSTUDIO_PLUGIN_PATH", "").split(os.pathsep) if p]
    unique = []
    for folder in folders:
        folder = folder.expanduser().resolve()
        if folder not in unique:
            unique.append(folder)
    return unique


def plugin_sources(folder: Path) -> list[Path]:
    """The plugin files and package folders directly inside `folder`."""
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(("_", ".")):
            continue
        if path.suffix == ".py" and path.is_file():
            found.append(path)
        elif path.is_dir() and (path / "__init__.py").is_file():
            found.append(path)
    return found


class PluginManager:
    """Loads plugins into the policy registry, and unloads them for a reload."""

    def __init__(self, extra_folders: list[str | Path] = (), entry_points_enabled: bool = True):
        self.extra_folders = list(extra_folders)
        self.entry_points_enabled = entry_points_enabled
        self.records: list[PluginRecord] = []

    @property
    def folders(self) -> list[Path]:
        return plugin_folders(self.extra_folders)

    @property
    def errors(self) -> list[PluginRecord]:
        return [record for record in self.records if record.error]

    def load(self) -> list[PluginRecord]:
        """(Re)load every plugin: edits on disk take effect; removed plugins disappear."""
        self.unload()
        for folder in self.folders:
            for path in plugin_sources(folder):
                self.records.append(self._load_file(path))
        if self.entry_points_enabled:
            for entry in entry_points(group=ENTRY_POINT_GROUP):
                self.records.append(self._load_entry_point(entry))
        return self.records

    def unload(self) -> None:
        for record in self.records:
            for name in record.policies:
                registry.unregister(name)
            for name in record.codecs:
                unregister_codec(name)
        for module in [m for m in sys.modules if m.startswith("kvstudio_plugin_")]:
            del sys.modules[module]
        self.records = []

    # -- one source -------------------------------------------------------------------------------

    def _load_file(self, path: Path) -> PluginRecord:
        record = PluginRecord(str(path))
        # A unique module name per file: two plugins may both be called my_policy.py.
        module_name = "kvstudio_plugin_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        target = path / "__init__.py" if path.is_dir() else path
        try:
            spec = importlib.util.spec_from_file_location(
                module_name, target, submodule_search_locations=[str(path)] if path.is_dir() else None)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        except BaseException as error:  # a plugin's import may raise anything, even SystemExit
            sys.modules.pop(module_name, None)
            record.error = _describe(error, path)
            return record
        classes = [obj for obj in vars(module).values()
                   if inspect.isclass(obj) and issubclass(obj, Policy) and obj is not Policy
                   and obj.__module__.startswith(module_name) and not inspect.isabstract(obj)]
        record.codecs = _register_codecs(module, module_name, str(path))
        if not classes and record.codecs:
            return record
        if not classes:
            record.error = (f"{path.name} defines no policy: subclass kvstudio.core.policies.base.Policy "
                            "and implement select()")
            return record
        self._register(record, classes, str(path))
        return record

    def _load_entry_point(self, entry) -> PluginRecord:
        record = PluginRecord(f"entry point {entry.name} ({entry.value})")
        try:
            loaded = entry.load()
        except BaseException as error:
            record.error = f"{entry.value} failed to import: {type(error).__name__}: {error}"
            return record
        if inspect.isclass(loaded):
            classes = [loaded] if issubclass(loaded, Policy) else []
        else:
            classes = [obj for obj in vars(loaded).values()
                       if inspect.isclass(obj) and issubclass(obj, Policy) and obj.__module__ == loaded.__name__]
        if not classes:
            record.error = f"{entry.value} is not a Policy subclass and defines none"
            return record
        self._register(record, classes, record.source)
        return record

    def _register(self, record: PluginRecord, classes: list[type[Policy]], source: str) -> None:
        problems = []
        for cls in classes:
            name = getattr(cls, "name", None)
            if not isinstance(name, str) or not name.isidentifier():
                problems.append(f"{cls.__name__} needs a `name` that is a plain identifier, got {name!r}")
                continue
            taken_by = registry.source_of(name)
            if taken_by is not None and taken_by != source:
                problems.append(f"policy '{name}' in {Path(source).name} clashes with the one from {taken_by}; "
                                "rename one of them")
                continue
            problem = describe_problem(cls)  # options and forms are generated from its Config
            if problem:
                problems.append(f"policy '{name}' in {Path(source).name} is broken: {problem}")
                record.broken.append(name)
                continue
            if not getattr(cls, "summary", ""):
                cls.summary = (inspect.getdoc(cls) or "a plugin policy").splitlines()[0]
            registry.register(cls, source=source)
            record.policies.append(name)
        if problems:
            record.error = "; ".join(problems)


def _register_codecs(module, module_name: str, source: str) -> list[str]:
    """A plugin file may also define storage codecs on the codec contract; they join --codec."""
    found = [obj for obj in vars(module).values()
             if inspect.isclass(obj) and issubclass(obj, Codec) and obj.__module__.startswith(module_name)
             and not inspect.isabstract(obj) and isinstance(getattr(obj, "name", None), str)]
    for codec in found:
        register_codec(codec, source=source)
    return [codec.name for codec in found]


def _describe(error: BaseException, path: Path) -> str:
    """The error and the plugin line it came from, in one line."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename.startswith(str(path))]
    where = f" (line {frames[-1].lineno})" if frames else ""
    if isinstance(error, SyntaxError):
        where = f" (line {error.lineno})"
    return f"{path.name} failed to import{where}: {type(error).__name__}: {error}"
