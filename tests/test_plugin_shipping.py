"""Plugins shipped to a cluster worker (core/plugins/shipping.py): packed from what the registry
holds, unpacked into another folder, loaded from there alone, the same bytes on both sides."""

from __future__ import annotations

import pytest

from kvstudio.core.plugins import shipping
from kvstudio.core.plugins.loader import PluginManager
from kvstudio.core.policies import available_policies, source_of

from .test_plugins import GOOD, write


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("KVSTUDIO_PLUGIN_PATH", raising=False)


def test_plugins_in_use_travel_as_bytes_and_load_from_the_unpacked_folder_alone(isolated, tmp_path):
    package = tmp_path / "plugins" / "shippedpkg"
    write(package, "__init__.py", "from .impl import *\n")
    write(package, "impl.py", GOOD.format(name="shipped_from_package", summary="in a package"))
    write(package / "__pycache__", "impl.cpython-311.pyc", "not shipped")
    write(tmp_path / "plugins", "single.py", GOOD.format(name="shipped_single", summary="one file"))
    driver = PluginManager([tmp_path / "plugins"], entry_points_enabled=False)
    driver.load()
    try:
        plugins = {plugin.name: plugin for plugin in shipping.bundle()}
        assert {"shippedpkg", "single.py"} <= set(plugins)
        assert [name for name, _ in plugins["shippedpkg"].files] == ["shippedpkg/__init__.py", "shippedpkg/impl.py"]
        sent = (plugins["shippedpkg"], plugins["single.py"])
    finally:
        driver.unload()  # what the worker has: none of these
    assert "shipped_single" not in available_policies()
    folders = shipping.unpack(sent, tmp_path / "worker")
    worker = shipping.ShippedPluginManager(folders)
    worker.load()
    try:
        assert not worker.errors
        assert {"shipped_from_package", "shipped_single"} <= set(available_policies())
        assert source_of("shipped_single").startswith(str(tmp_path / "worker"))
        # Only the shipped folders were read: not the repository's plugins/ nor the user folder.
        assert {str(folder) for folder in worker.folders} == {str(folder) for folder in folders}
        assert "decayed_h2o" not in {name for record in worker.records for name in record.policies}
        # The same bytes: packing the unpacked copies gives the same digests.
        again = {shipping.pack(folder / plugin.name).digest for folder, plugin in zip(folders, sent)}
        assert again == {plugin.digest for plugin in sent}
    finally:
        worker.unload()
