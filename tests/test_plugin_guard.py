"""The plugin guard: a policy that breaks its contract anywhere ends in one line naming its file.

Every hostile plugin here is a real file written to a temporary folder and loaded by the real
plugin manager; runs are real tiny-llama runs through the CLI's main() or a real subprocess.
"""

from __future__ import annotations

import gc
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvstudio.cli.dispatch import main
from kvstudio.core.runtime.engine import GenerationSettings
from kvstudio.core.errors import PolicyConfigError, PolicyError
from kvstudio.core.plugins.loader import PluginManager
from kvstudio.core.policies import available_policies, policy_class
from kvstudio.core.spec import create_policy

from .conftest import engine_for
from .helpers import random_ids

HEADER = '''
import sys
from dataclasses import dataclass
import torch
from kvstudio.core.policies.base import LayerState, Policy, PolicyConfig, keep_all_if_within, parameter
'''

# name -> (plugin body, the message the run must end with). {line} is the plugin's faulty line.
HOSTILE = {
    "validate_raises": ('''
        @dataclass
        class Config(PolicyConfig):
            def validate(self):
                super().validate()
                raise ValueError("validate is broken")  # FAULT

        class P(Policy):
            name = "validate_raises"
            summary = "s"
            Config = Config
            def select(self, view, state):
                return None
        ''', r"raised in its configuration \(Config, validate\(\) or __init__\): ValueError: validate is broken "
             r"\(at {file} line {line}\)"),
    "budget_raises": ('''
        class P(Policy):
            name = "budget_raises"
            summary = "s"
            def budget_for(self, layer_idx, n_layers):
                return 1 // 0  # FAULT
            def select(self, view, state):
                return None
        ''', r"raised in layer 0: ZeroDivisionError: .* \(budget_for\(\) at {file} line {line}\)"),
    "select_returns_list": ('''
        class P(Policy):
            name = "select_returns_list"
            summary = "s"
            def select(self, view, state):  # FAULT
                return list(range(view.n_entries))
        ''', r"returned list \[0, 1, .*\] from select\(\) at {file} line {line} in layer 0; "
             r"expected None or a tensor of indices"),
    "select_exits": ('''
        class P(Policy):
            name = "select_exits"
            summary = "s"
            def select(self, view, state):
                sys.exit(0)  # FAULT
        ''', r"raised in layer 0: called sys.exit\(0\); a policy must raise an exception, never exit "
             r"\(select\(\) at {file} line {line}\)"),
    "limit_is_text": ('''
        class P(Policy):
            name = "limit_is_text"
            summary = "s"
            def limit_for(self, layer_idx, n_layers, phase):  # FAULT
                return "ten"
            def select(self, view, state):
                return None
        ''', r"returned str 'ten' from limit_for\(\) at {file} line {line} for layer 0; expected an int >= 1 "
             r"or None"),
    "state_is_dict": ('''
        class P(Policy):
            name = "state_is_dict"
            summary = "s"
            def new_layer_state(self, layer_idx):  # FAULT
                return {}
            def select(self, view, state):
                return None
        ''', r"returned dict \{\} from new_layer_state\(\) at {file} line {line} in layer 0; expected a LayerState"),
    "queries_raise": ('''
        class P(Policy):
            name = "queries_raise"
            summary = "s"
            needs_attention = True
            def attention_queries(self, n_new, phase):
                raise KeyError("no queries")  # FAULT
            def select(self, view, state):
                return None
        ''', r"raised in layer 0: KeyError: 'no queries' \(attention_queries\(\) at {file} line {line}\)"),
    "init_raises": ('''
        class P(Policy):
            name = "init_raises"
            summary = "s"
            def __init__(self, **params):
                super().__init__(**params)
                self.table = {}["missing"]  # FAULT
            def select(self, view, state):
                return None
        ''', r"raised in its configuration \(Config, validate\(\) or __init__\): KeyError: 'missing' "
             r"\(at {file} line {line}\)"),
}


def write_plugin(folder: Path, name: str, body: str) -> tuple[Path, int]:
    """The plugin file and the line number marked # FAULT in it."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    code = textwrap.dedent(HEADER) + textwrap.dedent(body)
    path.write_text(code)
    line = next((i for i, text in enumerate(code.splitlines(), 1) if "# FAULT" in text), 0)
    return path, line


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("KVSTUDIO_PLUGIN_PATH", raising=False)
    return tmp_path / "data"


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_plugin_ends_in_one_line_naming_its_file_and_line(name, tmp_path, data_dir, capsys):
    body, message = HOSTILE[name]
    path, line = write_plugin(tmp_path / "plugins", name, body)
    code, out, err = run_cli(capsys, "run", "--plugins", str(path.parent), "--model", "tiny-llama", "--policy", name,
                             "--budget", "8", "--prompt", "x" * 20, "--max-new-tokens", "3", "--chunk-size", "8")
    assert code == 2, err
    assert "Traceback" not in err
    [error_line] = [text for text in err.splitlines() if text.startswith("kvstudio: error:")]
    assert error_line.startswith(f"kvstudio: error: policy '{name}' (plugin {path})"), error_line
    assert re.search(message.replace("{file}", re.escape(path.name)).replace("{line}", str(line)), error_line), \
        error_line
    # A run that had started is in the history as failed (a fault while configuring stops it before).
    code, out, err = run_cli(capsys, "runs", "list")
    assert code == 0 and ("no runs stored yet" in out or out.split()[2] == "failed"), out


def test_parameter_errors_from_validate_keep_their_own_message(tmp_path, data_dir, capsys):
    write_plugin(tmp_path / "plugins", "strict", '''
        from kvstudio.core.errors import PolicyConfigError

        @dataclass
        class Config(PolicyConfig):
            window: int = parameter(4, help="w")
            def validate(self):
                super().validate()
                if self.window > 10:
                    raise PolicyConfigError(f"--window {self.window} is above 10")

        class P(Policy):
            name = "strict"
            summary = "s"
            Config = Config
            def select(self, view, state):
                return None
        ''')
    code, out, err = run_cli(capsys, "run", "--plugins", str(tmp_path / "plugins"), "--model", "tiny-llama",
                             "--policy", "strict", "--budget", "8", "--window", "11", "--prompt", "x")
    assert code == 2 and err.strip().splitlines()[-1] == "kvstudio: error: --window 11 is above 10"


UNDESCRIBABLE = {
    "unknown_annotation": ('''
        @dataclass
        class Config(PolicyConfig):
            shape: "NoSuchType" = parameter(None, help="h")  # FAULT
        ''', r"its Config cannot be described \(line {line} of {file}\)|NameError"),
    "list_parameter": ('''
        @dataclass
        class Config(PolicyConfig):
            layers: list = parameter((1, 2), help="h")
        ''', r"parameter 'layers' has type 'list'; a parameter must be int, float, bool or str"),
    "default_of_the_wrong_type": ('''
        @dataclass
        class Config(PolicyConfig):
            window: int = parameter("wide", help="h")
        ''', r"parameter 'window' has default 'wide', which is not a int"),
    "numeric_choices_for_text": ('''
        @dataclass
        class Config(PolicyConfig):
            mode: str = parameter("a", help="h", choices=(1, 2))
        ''', r"parameter 'mode' has choices \(1, 2\) that are not all str"),
}


@pytest.mark.parametrize("name", list(UNDESCRIBABLE))
def test_a_policy_that_cannot_describe_its_options_is_broken_and_everything_else_works(
        name, tmp_path, data_dir, capsys):
    config, message = UNDESCRIBABLE[name]
    body = config + f'''
        class P(Policy):
            name = "{name}"
            summary = "s"
            Config = Config
            def select(self, view, state):
                return None
        '''
    path, line = write_plugin(tmp_path / "plugins", name, body)
    folder = str(path.parent)
    # Commands that have nothing to do with the plugin keep working.
    os.environ["KVSTUDIO_PLUGIN_PATH"] = folder  # as a user's plugin path: loaded by every command
    try:
        code, out, err = run_cli(capsys, "runs", "list")
        assert code == 0 and "Traceback" not in err, err
        code, out, err = run_cli(capsys, "policies")
        assert code == 0, err
        [line_out] = [text for text in out.splitlines() if text.startswith("plugin broken:")]
        assert f"policy '{name}' in {path.name} is broken: " in line_out and str(path) in line_out
        assert re.search(message.replace("{file}", re.escape(path.name)).replace("{line}", str(line)), line_out), \
            line_out
        assert f"\n{name}:" not in out  # not offered as a policy
        code, out, err = run_cli(capsys, "run", "--model", "tiny-llama", "--policy", "window", "--budget", "4",
                                 "--prompt", "x" * 10, "--max-new-tokens", "2")
        assert code == 0 and f"kvstudio: warning: plugin broken: policy '{name}'" in err
    finally:
        del os.environ["KVSTUDIO_PLUGIN_PATH"]
    assert name not in available_policies()


def test_the_plugins_record_says_broken(tmp_path, data_dir):
    write_plugin(tmp_path / "plugins", "mixed", '''
        @dataclass
        class Bad(PolicyConfig):
            things: dict = parameter(None, help="h")

        class Broken(Policy):
            name = "mixed_broken"
            summary = "s"
            Config = Bad
            def select(self, view, state):
                return None

        class Fine(Policy):
            name = "mixed_fine"
            summary = "s"
            def select(self, view, state):
                return None
        ''')
    manager = PluginManager([tmp_path / "plugins"], entry_points_enabled=False)
    try:
        manager.load()
        [record] = [r for r in manager.records if r.source.endswith("mixed.py")]
        assert (record.status, record.policies, record.broken) == ("broken", ["mixed_fine"], ["mixed_broken"])
        assert "mixed_fine" in available_policies() and "mixed_broken" not in available_policies()
    finally:
        manager.unload()


def test_a_fault_mid_run_frees_the_cache_and_the_next_run_works(tmp_path, data_dir, llama_engine):
    write_plugin(tmp_path / "plugins", "late", '''
        class P(Policy):
            name = "late"
            summary = "s"
            def select(self, view, state):
                if view.step == 2 and view.layer_idx == 3:
                    return torch.zeros(view.kv_heads, 1)  # FAULT: float indices
                return None
        ''')
    manager = PluginManager([tmp_path / "plugins"], entry_points_enabled=False)
    manager.load()
    try:
        gc.collect()
        before = sum(type(o).__name__ == "PolicyCache" for o in gc.get_objects())
        with pytest.raises(PolicyError) as caught:
            llama_engine.generate(random_ids(12), create_policy("late", budget=64),
                                  GenerationSettings(max_new_tokens=4, chunk_size=4))
        assert "late.py" in str(caught.value) and "layer 3" in str(caught.value)
        del caught
        gc.collect()
        assert sum(type(o).__name__ == "PolicyCache" for o in gc.get_objects()) == before
        assert llama_engine.generate([1, 2, 3], create_policy("window", budget=2), GenerationSettings(max_new_tokens=2))
    finally:
        manager.unload()


def test_built_in_parameter_errors_are_unchanged():
    with pytest.raises(PolicyConfigError, match="--budget must be at least 1"):
        create_policy("window", budget=0)
    with pytest.raises(PolicyConfigError, match="policy 'full' has no parameter 'sink'"):
        create_policy("full", sink=2)


# --- the property: a hostile generated plugin always ends in a PolicyError naming its file ----------

TEMPLATE = '''
import sys
import weakref
from dataclasses import dataclass
import numpy
import torch
from kvstudio.core.errors import KVStudioError, PolicyError
from kvstudio.core.policies.base import LayerState, Policy, PolicyConfig

CALLS = {{}}
STATES = []  # weak references to every LayerState the engine asked for: all dead once the cache is freed


def hostile(hook):
    """True exactly once: at the chosen call of the chosen hook."""
    CALLS[hook] = CALLS.get(hook, 0) + 1
    return hook == {hook!r} and CALLS[hook] == {call} + 1


class Error(Exception):
    pass


@dataclass
class Config(PolicyConfig):
    def validate(self):
        super().validate()
        if hostile("validate"):
            {fault}


class Hostile(Policy):
    name = "hostile"
    summary = "misbehaves once, somewhere"
    Config = Config
    needs_attention = True

    def __init__(self, **params):
        super().__init__(**params)
        if hostile("__init__"):
            {fault}

    def budget_for(self, layer_idx, n_layers):
        if hostile("budget_for"):
            {fault}
        return self.config.budget

    def limit_for(self, layer_idx, n_layers, phase):
        if hostile("limit_for"):
            {fault}
        return self.config.budget

    def attention_queries(self, n_new, phase):
        if hostile("attention_queries"):
            {fault}
        return n_new

    def new_layer_state(self, layer_idx):
        if hostile("new_layer_state"):
            {fault}
        state = LayerState()
        STATES.append(weakref.ref(state))
        return state

    def select(self, view, state):
        if hostile("select"):
            {fault}
        if view.n_entries <= view.budget:
            return None
        return torch.arange(view.n_entries - view.budget, view.n_entries).expand(view.kv_heads, -1)
'''

# How often each hook is called in the run below (12-token prompt in chunks of 4, 3 new tokens,
# 4 layers): a hostile call is always reached.
CALLS = {"validate": 1, "__init__": 1, "budget_for": 4, "limit_for": 8, "new_layer_state": 4,
         "attention_queries": 5, "select": 20}  # attention_queries: once a step (its answer holds for every layer)
RAISES = ["raise ValueError('bad value')", "raise RuntimeError('bad state')", "raise KeyError('missing')",
          "raise ZeroDivisionError('divided')", "raise TypeError('wrong type')", "raise IndexError('too far')",
          "raise AttributeError('no such thing')", "raise Error('its own exception')", "assert False, 'assertion'",
          "raise NotImplementedError", "raise RecursionError('deep')", "raise StopIteration",
          "raise PolicyError('a policy error of its own')", "raise KVStudioError('borrowed error class')",
          "sys.exit(0)", "sys.exit(1)", "sys.exit('a message')", "raise SystemExit"]
# Values no hook may return: wrong types everywhere, and for select() wrong shapes, dtypes, ranges.
RETURNS = {
    "budget_for": ["'ten'", "-1", "0", "2.5", "[]", "True", "torch.tensor(6)"],
    "limit_for": ["'ten'", "-3", "0", "6.0", "{}", "False"],
    "attention_queries": ["-1", "'all'", "1.5", "None", "[n_new]"],
    "new_layer_state": ["None", "{}", "3", "LayerState"],
    "select": ["list(range(view.n_entries))", "7", "'all'", "(0, 1)", "{}", "numpy.arange(view.n_entries)",
               "torch.zeros(view.kv_heads, 1)", "torch.ones(view.kv_heads, 1, dtype=torch.bool)",
               "torch.arange(view.n_entries)", "torch.zeros(view.kv_heads, 1, 1, dtype=torch.long)",
               "torch.zeros(view.kv_heads + 1, 1, dtype=torch.long)",
               "torch.full((view.kv_heads, 1), view.n_entries)", "torch.full((view.kv_heads, 1), -1)",
               "torch.tensor([[1, 0]] * view.kv_heads)", "torch.zeros(view.kv_heads, 0, dtype=torch.long)",
               "torch.arange(view.n_entries + 1).expand(view.kv_heads, -1)",
               "torch.full((view.kv_heads, 1), 2**40)", "torch.arange(view.n_entries, dtype=torch.int32)[None]"
               ".expand(view.kv_heads, -1) * 9",
               "torch.arange(view.n_entries, dtype=torch.float64).expand(view.kv_heads, -1)"],
}


@st.composite
def hostile_plugins(draw):
    hook = draw(st.sampled_from(sorted(CALLS)))
    call = draw(st.integers(0, CALLS[hook] - 1))
    faults = RAISES + [f"return {value}" for value in RETURNS.get(hook, [])]
    return hook, call, draw(st.sampled_from(faults))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hostile_plugins())
def test_a_hostile_generated_plugin_always_ends_in_a_policy_error_naming_its_file(plugin):
    import tempfile

    hook, call, fault = plugin
    engine = engine_for("tiny-llama")
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "hostile.py"
        path.write_text(TEMPLATE.format(hook=hook, call=call, fault=fault))
        manager = PluginManager([folder], entry_points_enabled=False)
        manager.load()
        try:
            assert manager.records[-1].policies == ["hostile"], manager.records[-1].error
            with pytest.raises(PolicyError) as caught:
                engine.generate(random_ids(12, seed=call), create_policy("hostile", budget=6),
                                GenerationSettings(max_new_tokens=3, chunk_size=4, memory_sample_hz=0))
            assert f"policy 'hostile' (plugin {path})" in str(caught.value), (plugin, str(caught.value))
            del caught
            gc.collect()  # the cache and its layers form a cycle: only the collector frees them
            states = sys.modules[policy_class("hostile").__module__].STATES
            assert all(state() is None for state in states), plugin  # the cache (which held them) is gone
        finally:
            manager.unload()


def test_plugin_code_outside_the_guarded_calls_is_still_named(tmp_path, data_dir, capsys):
    """describe() is not part of the contract's hooks, but a plugin may override it: the last net
    (its frames in the traceback) names the file and line all the same."""
    path, line = write_plugin(tmp_path / "plugins", "describe_raises", '''
        class P(Policy):
            name = "describe_raises"
            summary = "s"
            def describe(self):
                raise RuntimeError("cannot describe myself")  # FAULT
            def select(self, view, state):
                return None
        ''')
    code, out, err = run_cli(capsys, "run", "--plugins", str(path.parent), "--model", "tiny-llama", "--policy",
                             "describe_raises", "--budget", "4", "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"kvstudio: error: plugin {path} raised at line {line}: RuntimeError: "
                                            "cannot describe myself")


def test_integer_choices_are_listed(tmp_path, data_dir, capsys):
    write_plugin(tmp_path / "plugins", "int_choices", '''
        @dataclass
        class Config(PolicyConfig):
            group: int = parameter(2, help="group size", choices=(2, 4, 8))

        class P(Policy):
            name = "int_choices"
            summary = "s"
            Config = Config
            def select(self, view, state):
                return None
        ''')
    code, out, err = run_cli(capsys, "policies", "--plugins", str(tmp_path / "plugins"))
    assert code == 0 and "group size (2|4|8)" in out, err
