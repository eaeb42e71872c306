"""Plugins shipped to another machine: what a cluster worker needs to run the policies the driver has.

The driver packs the source of every plugin file or package folder its registry holds (policies and
codecs, as loaded by the PluginManager) into a bundle of bytes with a digest per plugin; a worker
writes the bundle into a folder of its own and loads exactly those plugins from it: not its own
`plugins/` folder, user folder or KVSTUDIO_PLUGIN_PATH, whose files may be other versions of the
same plugins. Plugins that come from installed packages (entry points) cannot be shipped as files:
they must be installed on the workers, and their distributions' versions are compared instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from kvstudio.core.plugins.loader import ENTRY_POINT_GROUP, PluginManager, PluginRecord
from kvstudio.core.policies import available_policies, source_of
from kvstudio.core.registry import BUILT_IN
from kvstudio.core.storage import available_codecs, codec_source


@dataclass(frozen=True)
class ShippedPlugin:
    source: str  # the plugin file or package folder on the driver
    files: tuple[tuple[str, bytes], ...]  # (path relative to the plugin's folder, content)
    digest: str  # SHA-256 over the names and contents: the plugin's version, wherever it is unpacked

    @property
    def name(self) -> str:
        return Path(self.source).name


def plugin_sources_in_use() -> list[Path]:
    """The plugin files and folders that registered a policy or a codec, in a stable order."""
    sources = {source_of(name) for name in available_policies()}
    sources |= {codec_source(name) for name in available_codecs()}
    paths = [Path(source) for source in sources if source and source != BUILT_IN]
    return sorted(path for path in paths if path.exists())  # entry points name no path


def pack(source: Path) -> ShippedPlugin:
    """One plugin file, or a package folder with every file under it (compiled caches left out)."""
    if source.is_dir():
        files = tuple((str(path.relative_to(source.parent)), path.read_bytes())
                      for path in sorted(source.rglob("*"))
                      if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc")
    else:
        files = ((source.name, source.read_bytes()),)
    return ShippedPlugin(str(source), files, _digest(files))


def bundle() -> tuple[ShippedPlugin, ...]:
    return tuple(pack(source) for source in plugin_sources_in_use())


def _digest(files) -> str:
    digest = hashlib.sha256()
    for name, content in files:
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return digest.hexdigest()


def unpack(plugins: tuple[ShippedPlugin, ...], folder: Path) -> list[Path]:
    """Each plugin in a folder of its own (two plugins may share a file name); the folders, in order."""
    folders = []
    for index, plugin in enumerate(plugins):
        target = folder / f"{index:03d}"
        for name, content in plugin.files:
            path = target / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content)
        folders.append(target)
    return folders


class ShippedPluginManager(PluginManager):
    """Loads the unpacked bundle only, plus installed entry points (whose versions are compared)."""

    def __init__(self, folders: list[Path]):
        super().__init__(entry_points_enabled=True)
        self._shipped = folders

    @property
    def folders(self) -> list[Path]:
        return list(self._shipped)


def entry_point_versions() -> dict[str, str]:
    """Installed plugin packages: entry name -> 'distribution version'."""
    versions = {}
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(entry, "dist", None)
        versions[entry.name] = f"{dist.name} {dist.version}" if dist is not None else entry.value
    return versions


def record_problems(records: list[PluginRecord]) -> list[str]:
    """One line per plugin that did not load cleanly."""
    return [f"{Path(record.source).name}: {record.error}" for record in records if record.error]
