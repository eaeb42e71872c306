"""Policy plugins: every way in, every way to fail, and the shipped examples checked like built-ins.

Plugin files are written by the tests into temporary folders and loaded for real.
"""

from __future__ import annotations

import gc
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstudio.cli.dispatch import main
from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.errors import PolicyError
from kvstudio.core.plugins.loader import PluginManager
from kvstudio.core.policies import BUILT_IN, available_policies, policy_class, source_of
from kvstudio.core.spec import create_policy

from .helpers import check_policy_invariants, random_ids

GOOD = '''
from dataclasses import dataclass
from kvstudio.core.policies.base import Policy, PolicyConfig, keep_all_if_within, parameter
import torch

@dataclass
class OddConfig(PolicyConfig):
    offset: int = parameter(1, help="keep positions with this parity", minimum=0, maximum=1)

class OddPolicy(Policy):
    name = "{name}"
    summary = "{summary}"
    Config = OddConfig

    def select(self, view, state):
        if keep_all_if_within(view):
            return None
        newest = torch.arange(view.n_entries - view.budget, view.n_entries)
        return newest.expand(view.kv_heads, -1)
'''


def write(folder: Path, filename: str, code: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(textwrap.dedent(code))
    return path


@pytest.fixture
def manager(tmp_path, monkeypatch):
    """A plugin manager over an empty user folder and a temporary plugin folder; unloads after."""
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("KVSTUDIO_PLUGIN_PATH", raising=False)
    plugins = PluginManager([tmp_path / "plugins"], entry_points_enabled=False)
    yield plugins
    plugins.unload()


def record_for(manager, filename):
    return next(r for r in manager.records if r.source.endswith(filename))


def test_a_plugin_file_defines_a_policy_that_runs(manager, tmp_path, llama_engine):
    write(tmp_path / "plugins", "odd.py", GOOD.format(name="newest_only", summary="keeps the newest"))
    manager.load()
    record = record_for(manager, "odd.py")
    assert (record.status, record.policies, record.error) == ("loaded", ["newest_only"], None)
    assert source_of("newest_only") == str(tmp_path / "plugins" / "odd.py")
    result = llama_engine.generate(random_ids(30), create_policy("newest_only", budget=8),
                                   GenerationSettings(max_new_tokens=3), keep_cache=True)
    assert result.kept_per_layer == [8] * 4
    assert result.cache.positions(0)[0].tolist() == list(range(24, 32))
    assert [spec.name for spec in policy_class("newest_only").Config.parameters()] == ["budget", "rerotate", "offset"]


def test_a_package_folder_is_a_plugin(manager, tmp_path):
    package = tmp_path / "plugins" / "mypackage"
    write(package, "__init__.py", "from .impl import *\n")
    write(package, "impl.py", GOOD.format(name="from_package", summary="in a package"))
    manager.load()
    assert record_for(manager, "mypackage").policies == ["from_package"]


@pytest.mark.parametrize("code, message", [
    ("def broken(:\n", r"bad.py failed to import \(line 1\): SyntaxError"),
    ("import does_not_exist_anywhere\n", r"bad.py failed to import \(line 1\): ModuleNotFoundError"),
    ("x = 1\nraise RuntimeError('plugin exploded')\n", r"bad.py failed to import \(line 2\): RuntimeError: plugin exploded"),
    ("import sys\nsys.exit(3)\n", r"bad.py failed to import \(line 2\): SystemExit"),
    ("VALUE = 42\n", r"bad.py defines no policy"),
])
def test_a_broken_plugin_is_reported_and_everything_else_works(manager, tmp_path, code, message, llama_engine):
    write(tmp_path / "plugins", "bad.py", code)
    write(tmp_path / "plugins", "good.py", GOOD.format(name="still_fine", summary="ok"))
    manager.load()
    bad = record_for(manager, "bad.py")
    assert bad.status in ("error",) and re.search(message, bad.error), bad.error
    assert record_for(manager, "good.py").policies == ["still_fine"]
    assert llama_engine.generate([1, 2, 3], create_policy("h2o", budget=2), GenerationSettings(max_new_tokens=2))


def test_a_name_clash_is_refused_and_the_first_keeps_the_name(manager, tmp_path):
    write(tmp_path / "plugins", "a_first.py", GOOD.format(name="twin", summary="first"))
    write(tmp_path / "plugins", "b_second.py", GOOD.format(name="twin", summary="second"))
    write(tmp_path / "plugins", "c_h2o.py", GOOD.format(name="h2o", summary="an impostor"))
    manager.load()
    assert policy_class("twin").summary == "first"
    assert "policy 'twin' in b_second.py clashes with the one from" in record_for(manager, "b_second.py").error
    assert "clashes with the one from built-in" in record_for(manager, "c_h2o.py").error
    assert source_of("h2o") == BUILT_IN and policy_class("h2o").summary.startswith("heavy hitters")


def test_a_plugin_that_raises_during_a_run_stops_it_cleanly(manager, tmp_path, llama_engine):
    write(tmp_path / "plugins", "explodes.py", '''
        from kvstudio.core.policies.base import Policy

        class Explodes(Policy):
            name = "explodes"
            summary = "raises at decode"

            def select(self, view, state):
                if view.phase == "decode":
                    raise ValueError("no decoding for me")
                return None
        ''')
    manager.load()
    gc.collect()
    before = sum(type(o).__name__ == "PolicyCache" for o in gc.get_objects())
    with pytest.raises(PolicyError) as caught:
        llama_engine.generate(random_ids(10), create_policy("explodes", budget=64), GenerationSettings(max_new_tokens=4))
    assert f"policy 'explodes' (plugin {tmp_path / 'plugins' / 'explodes.py'}) raised in layer 0" in str(caught.value)
    assert "ValueError: no decoding for me" in str(caught.value)
    del caught
    gc.collect()
    assert sum(type(o).__name__ == "PolicyCache" for o in gc.get_objects()) == before  # the cache was freed
    assert llama_engine.generate([1, 2, 3], create_policy("window", budget=2), GenerationSettings(max_new_tokens=2))


def test_reload_picks_up_edits_and_removals(manager, tmp_path):
    path = write(tmp_path / "plugins", "edited.py", GOOD.format(name="edited", summary="version one"))
    manager.load()
    assert policy_class("edited").summary == "version one"
    path.write_text(textwrap.dedent(GOOD.format(name="edited", summary="version two")))
    manager.load()
    assert policy_class("edited").summary == "version two"
    path.unlink()
    manager.load()
    assert "edited" not in available_policies()


def test_user_folder_and_plugin_path_are_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("KVSTUDIO_PLUGIN_PATH", str(tmp_path / "env_a") + ":" + str(tmp_path / "env_b"))
    write(tmp_path / "data" / "plugins", "mine.py", GOOD.format(name="from_user_folder", summary="u"))
    write(tmp_path / "env_b", "envp.py", GOOD.format(name="from_env_path", summary="e"))
    plugins = PluginManager(entry_points_enabled=False)
    try:
        plugins.load()
        assert {"from_user_folder", "from_env_path"} <= set(available_policies())
        folders = plugins.folders
        assert folders.index((tmp_path / "data" / "plugins").resolve()) < folders.index((tmp_path / "env_b").resolve())
    finally:
        plugins.unload()


def test_installed_packages_register_through_entry_points(tmp_path, monkeypatch):
    """A real distribution on sys.path declaring the kvstudio.policies entry point."""
    site = tmp_path / "site"
    write(site / "kvs_example_plugin", "__init__.py", GOOD.format(name="from_entry_point", summary="installed"))
    write(site / "kvs_example_plugin-1.0.dist-info", "METADATA", "Metadata-Version: 2.1\nName: kvs-example-plugin\n"
                                                                 "Version: 1.0\n")
    write(site / "kvs_example_plugin-1.0.dist-info", "entry_points.txt",
          "[kvstudio.policies]\nfrom_entry_point = kvs_example_plugin:OddPolicy\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path / "data"))
    plugins = PluginManager()
    try:
        plugins.load()
        record = next(r for r in plugins.records if r.source.startswith("entry point from_entry_point"))
        assert record.policies == ["from_entry_point"]
    finally:
        plugins.unload()
        sys.modules.pop("kvs_example_plugin", None)


def test_the_documented_example_runs_as_written(manager, tmp_path, llama_engine):
    text = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    example = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    write(tmp_path / "plugins", "peak_attention.py", example)
    manager.load()
    assert record_for(manager, "peak_attention.py").policies == ["peak_attention"]
    check_policy_invariants(create_policy("peak_attention", budget=12, recent=4), 60, 16, 6, seed=5)


def test_cli_lists_and_runs_plugins_like_builtins(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path / "data"))
    folder = tmp_path / "cli_plugins"
    write(folder, "odd.py", GOOD.format(name="cli_newest", summary="keeps the newest, from the CLI"))
    write(folder, "broken.py", "raise ImportError('missing dependency')\n")
    assert main(["policies", "--plugins", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"cli_newest: keeps the newest, from the CLI  [plugin {folder / 'odd.py'}]" in out
    assert "--offset" in out
    assert "plugin not loaded: broken.py failed to import (line 1): ImportError: missing dependency" in out
    code = main(["run", "--plugins", str(folder), "--model", "tiny-llama", "--policy", "cli_newest",
                 "--budget", "8", "--offset", "0", "--prompt", "x" * 30, "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "entries kept per layer: 8 in every layer" in out
    assert "plugin not loaded: broken.py" in err
    assert main(["policies", "--plugins", str(tmp_path / "nope")]) == 2
    assert "--plugins" in capsys.readouterr().err


def test_a_prompt_never_loads_code(tmp_path, capsys, monkeypatch):
    """A prompt file holding a plugin is text: nothing in it is imported or registered."""
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path / "data"))
    prompt = write(tmp_path, "prompt.py", GOOD.format(name="smuggled", summary="from a prompt"))
    assert main(["run", "--model", "tiny-llama", "--prompt-file", str(prompt), "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert "smuggled" not in available_policies()


# --- the shipped examples, checked like built-ins ---------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    plugins = PluginManager(entry_points_enabled=False)
    plugins.load()
    yield plugins
    plugins.unload()


def test_the_shipped_plugins_load(shipped):
    loaded = {name for record in shipped.records for name in record.policies}
    assert {"decayed_h2o", "value_norm", "separators"} <= loaded
    assert not [r for r in shipped.records if "plugins" in r.source and r.error]


def test_decayed_h2o_with_no_decay_is_h2o(shipped, llama_engine):
    prompt, run = random_ids(70, seed=3), GenerationSettings(max_new_tokens=10, chunk_size=16)
    plain = llama_engine.generate(prompt, create_policy("h2o", budget=20, recent=6), run, keep_cache=True)
    decayed = llama_engine.generate(prompt, create_policy("decayed_h2o", budget=20, recent=6, decay=1.0), run,
                                    keep_cache=True)
    for layer in range(4):
        assert torch.equal(plain.cache.positions(layer), decayed.cache.positions(layer))
    faster = llama_engine.generate(prompt, create_policy("decayed_h2o", budget=20, recent=6, decay=0.5), run,
                                   keep_cache=True)
    assert any(not torch.equal(plain.cache.positions(l), faster.cache.positions(l)) for l in range(4))


def test_decayed_h2o_scores_follow_the_rule():
    from kvstudio.core.policies.base import LayerState, LayerView

    policy, state = create_policy("decayed_h2o", budget=2, recent=1, decay=0.5), LayerState()

    def view(rows):
        attention = torch.tensor(rows)
        n = attention.shape[-1]
        return LayerView(0, 1, 0, "decode", torch.zeros(1, n, 2), torch.zeros(1, n, 2), torch.arange(n)[None],
                         1, 2, attention)

    assert policy.select(view([[[0.8, 0.2]]]), state) is None
    kept = policy.select(view([[[0.1, 0.6, 0.3]]]), state)
    # scores: 0.5*0.8+0.1 = 0.5, 0.5*0.2+0.6 = 0.7, 0.3 -> entry 1 beats entry 0; entry 2 is recent.
    assert kept.tolist() == [[1, 2]]


def test_value_norm_keeps_the_largest_values_plus_the_newest(shipped, llama_engine):
    prompt = random_ids(40, seed=8)
    full = llama_engine.generate(prompt, create_policy("full"), GenerationSettings(max_new_tokens=0, chunk_size=40),
                                 keep_cache=True)
    kept = llama_engine.generate(prompt, create_policy("value_norm", budget=12, recent=4),
                                 GenerationSettings(max_new_tokens=0, chunk_size=40), keep_cache=True)
    for layer in range(4):
        norms = full.cache.layers[layer].values[0].norm(dim=-1)
        for head in range(2):
            top = sorted(torch.sort(norms[head, :36], descending=True, stable=True).indices[:8].tolist())
            assert kept.cache.positions(layer)[head].tolist() == top + [36, 37, 38, 39]


def test_separators_keep_sinks_punctuation_and_the_newest(shipped, llama_engine):
    text = "ab, cd. ef gh; ij kl mn op? qr st uv wx yz ab cd ef gh ij"
    ids = llama_engine.tokenizer(text)["input_ids"]
    result = llama_engine.generate(ids, create_policy("separators", budget=14, sink=2, recent=5),
                                   GenerationSettings(max_new_tokens=0, chunk_size=len(ids)), keep_cache=True)
    punctuation = [i for i, ch in enumerate(text) if ch in ",.;?"]  # byte tokens: position = character
    n = len(ids)
    expected = sorted({0, 1} | set(punctuation) | set(range(n - 5, n)))
    spare = 14 - len(expected)
    others = [p for p in range(n - 1, -1, -1) if p not in expected][:spare]
    assert result.cache.positions(0)[0].tolist() == sorted(expected + others)


_PLUGIN_CASES = st.one_of(
    st.integers(2, 20).map(lambda b: ("decayed_h2o", {"budget": b, "recent": b // 3, "decay": 0.8})),
    st.integers(2, 20).map(lambda b: ("value_norm", {"budget": b, "recent": b // 2})),
    st.integers(4, 20).map(lambda b: ("separators", {"budget": b, "sink": 1, "recent": b // 2})),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(case=_PLUGIN_CASES, prompt_length=st.integers(1, 60), chunk_size=st.integers(1, 24),
       new_tokens=st.integers(0, 6), seed=st.integers(0, 500))
def test_shipped_plugin_invariants(shipped, case, prompt_length, chunk_size, new_tokens, seed):
    name, params = case
    check_policy_invariants(create_policy(name, **params), prompt_length, chunk_size, new_tokens, seed,
                            sink=params.get("sink", 0))


def test_one_registry_keeps_policies_and_codecs_apart_from_plugins_that_reuse_a_name():
    from kvstudio.core.errors import KVStudioError
    from kvstudio.core.policies import available_policies, register, unregister
    from kvstudio.core.policies.window import WindowPolicy
    from kvstudio.core.storage import Int8Codec, available_codecs, register_codec, unregister_codec

    class Shadow(WindowPolicy):
        name = "window"

    with pytest.raises(KVStudioError, match="two policies are named 'window': built-in and shadow.py"):
        register(Shadow, source="shadow.py")
    with pytest.raises(KVStudioError, match="two codecs are named 'int8': built-in and shadow.py"):
        register_codec(type("ShadowInt8", (Int8Codec,), {}), source="shadow.py")
    unregister("window")  # a plugin's name only: built-ins stay
    unregister_codec("int8")
    assert "window" in available_policies() and "int8" in available_codecs()
