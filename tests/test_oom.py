"""Out of memory names what ran out. Every error here is a real allocation failure of torch's
allocator (a petabyte asked for; expanded views give tensors that size without holding it),
raised in the real code path it is attributed to."""

from __future__ import annotations

import re
import textwrap

import pytest
import torch

from kvstudio.cli.dispatch import main
from kvstudio.core.runtime.attention import attention_rows
from kvstudio.core.runtime.cache import PolicyCache, StepContext
from kvstudio.core.runtime.oom import culprit, explain, is_out_of_memory
from kvstudio.core.spec import create_policy

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
HUGE = 2**40  # entries: with 2 heads of 16 float32 dims, far beyond any machine's memory


def failure(function, *args, **kwargs) -> BaseException:
    try:
        function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 - the point is to catch what the allocator raises
        return error
    raise AssertionError("the allocation did not fail")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_the_kv_cache_running_out_says_lower_the_budget(device):
    cache = PolicyCache(create_policy("full"), n_layers=1)
    cache.begin_step(StepContext(0, "prefill", torch.arange(4, device=device), torch.arange(4, device=device)))
    layer = cache.layers[0]
    layer.update(torch.zeros(1, 2, 4, 16, device=device), torch.zeros(1, 2, 4, 16, device=device))
    huge = torch.zeros(1, 2, 1, 16, device=device).expand(1, 2, HUGE, 16)  # what a runaway prompt would append
    cache.context = StepContext(1, "prefill", torch.arange(4, 5, device=device), torch.arange(4, 5, device=device))
    error = failure(layer.update, huge, huge)
    assert is_out_of_memory(error) and culprit(error) == "cache"
    message = explain(error, "run", chunk_size=512)
    assert message.startswith("out of memory growing the KV cache (it tried to allocate ")
    assert message.endswith(": lower --budget (or use a policy with a budget)")
    assert "the budget" in explain(error, "run", studio=True) and "--budget" not in explain(error, "run", studio=True)


def test_attention_for_a_chunk_running_out_says_lower_the_chunk_size():
    query = torch.zeros(1, 4, 1, 16).expand(1, 4, 2**22, 16)
    key = torch.zeros(1, 2, 1, 16).expand(1, 2, 2**22, 16)
    error = failure(attention_rows, query, key, None, 2**22)
    assert culprit(error) == "attention"
    assert explain(error, "run", chunk_size=4194304).startswith(
        "out of memory computing attention for a prefill chunk of 4194304 tokens (it tried to allocate ")
    assert explain(error, "run").endswith("lower --chunk-size")


def test_loading_and_tokenizing_name_themselves():
    error = failure(torch.empty, 2**50, dtype=torch.uint8)
    assert explain(error, "load", model="big/model").startswith("out of memory loading the model big/model (it tried "
                                                               "to allocate 1024.0 TiB): its weights do not fit")
    assert explain(error, "tokenize").startswith("out of memory tokenizing the prompt")
    assert not is_out_of_memory(ValueError("out of range")) and is_out_of_memory(MemoryError())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_a_policy_that_runs_memory_out_is_named_in_one_line(tmp_path, capsys, monkeypatch, device):
    monkeypatch.setenv("KVSTUDIO_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "greedy.py").write_text(textwrap.dedent('''
        import torch
        from kvstudio.core.policies.base import Policy

        class Greedy(Policy):
            name = "greedy_memory"
            summary = "asks for a petabyte of scores"

            def select(self, view, state):
                scores = torch.empty(2**50, dtype=torch.uint8, device=view.keys.device)
                return None
        '''))
    code = main(["run", "--plugins", str(tmp_path / "plugins"), "--model", "tiny-llama", "--device", device,
                 "--policy", "greedy_memory",
                 "--budget", "8", "--prompt", "hello", "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    [line] = [text for text in err.splitlines() if text.startswith("kvstudio: error:")]
    assert re.fullmatch(
        re.escape(f"kvstudio: error: out of memory inside the policy 'greedy_memory' (plugin "
                  f"{tmp_path / 'plugins' / 'greedy.py'}) while it chose what to keep (it tried to allocate ")
        + r"[0-9.]+ [KMGT]iB" + re.escape("): the policy's own tensors do not fit; check its code or lower --budget"),
        line), line
    if device == "cpu":
        assert "(it tried to allocate 1024.0 TiB)" in line
