"""Torch calls and seconds per all-decode packed step: 8 rows of h2o (budget 64) on the default model,
the grouped decode (decode_attention_group, fused scoring) against the per-row path with SDPA at decode.

The call counts do not depend on the machine's load (a TorchFunctionMode counts them); the seconds do.
usage: python -m benchmarks.batch_decode_calls
"""
import sys, time, statistics

import torch
from torch.overrides import TorchFunctionMode
from benchmarks.common import prompt_of_length
from kvstudio.core.models.loading import load_model
from kvstudio.core.runtime import attention, batch_cache, batch as batch_module
from kvstudio.core.runtime.batch import BatchRow, generate_batch
from kvstudio.core.runtime.engine import Engine, GenerationSettings
from kvstudio.core.spec import create_policy

class Count(TorchFunctionMode):
    def __init__(self): super().__init__(); self.n = 0
    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))

engine = Engine(load_model("default", device="cpu"))
prompts = [prompt_of_length(engine, n, key=f"{57314+i}") for i, n in enumerate(range(70, 110, 5))]
settings = GenerationSettings(max_new_tokens=6, chunk_size=512, ignore_eos=True, memory_sample_hz=0)
original_step, original_fusable, original_groups = batch_module._BatchLoop._step, attention._fusable, batch_cache.groups_decode

def measure(label):
    calls, seconds = [], []
    def step(self):
        decoding = all(run.fed >= len(run.ids) for run in self.active)
        if not decoding:
            return original_step(self)
        mode = Count(); started = time.perf_counter()
        with mode:
            original_step(self)
        seconds.append(time.perf_counter() - started); calls.append(mode.n)
    batch_module._BatchLoop._step = step
    result = generate_batch(engine, [BatchRow(p, create_policy("h2o", budget=64)) for p in prompts], settings)
    batch_module._BatchLoop._step = original_step
    print(f"{label}: {statistics.median(calls)} torch calls per all-decode step of 8 rows, median "
          f"{statistics.median(seconds):.3f} s ({len(calls)} steps)", flush=True)
    return [r.result.token_ids for r in result.rows]

def before(kvstudio_cache, query, form, policy_queries):
    return query.shape[2] > 1 and original_fusable(kvstudio_cache, query, form, policy_queries)

for round_ in range(2):
    attention._fusable, batch_cache.groups_decode = before, (lambda *a: False)
    old = measure("before (per row, SDPA + separate scoring at decode)")
    attention._fusable, batch_cache.groups_decode = original_fusable, original_groups
    new = measure("after  (decoding rows grouped, fused scoring)")
    print("same tokens:", old == new)
