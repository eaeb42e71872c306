"""The host tier: entries the policy evicts move to host memory, and the blocks the current query
would attend to come back for the step.

Quest (Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference", ICML
2024, arXiv:2406.10774) and InfLLM (Xiao et al. 2024, arXiv:2402.04617). The rule: host entries
form blocks of B, in the order they were evicted, per KV head; each block keeps a summary, the
channel-wise max and min of its keys. For a query q, sum_d max(q_d * max_d, q_d * min_d) is an
upper bound of q . k for every key k in the block, computed as two small matmuls
(q+ . max + q- . min). Each KV head takes its query heads' highest bound (over the step's last
query), and the top `recall` blocks come back for this step only: attention sees them beside the
device entries, the policy does not score or keep them, and they stay on the host. Keys were
stored already rotated at their own positions, so recalled entries keep their true positions.

Rectangular recall: every KV head holds the same number of host entries (evictions are
rectangular), so only the newest block may be partial, for every head alike. It comes back first
(its summary is still filling), then the top `recall - 1` complete blocks: every head recalls the
same number of entries, and recall >= the number of blocks brings back everything.

On CUDA the host copies are pinned and run on a side stream, so a layer's eviction copy overlaps
the following layers' compute; on CPU the same code runs with plain copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvstudio.core.storage.buffers import EntryBuffers


@dataclass
class Recalled:
    keys: torch.Tensor  # (1, kv_heads, r, head_dim) on the compute device
    values: torch.Tensor
    positions: torch.Tensor  # (kv_heads, r) long, CPU: the token positions that came back


class HostTier:
    def __init__(self, block_size: int, recall: int, device: torch.device):
        self.block_size, self.recall_blocks = block_size, recall
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        self.entries = EntryBuffers()
        self.entries.pin_memory = self.on_cuda
        self.block_max: torch.Tensor | None = None  # (kv_heads, blocks, head_dim) float32 on the device
        self.block_min: torch.Tensor | None = None
        self.stream = torch.cuda.Stream(self.device) if self.on_cuda else None

    @property
    def count(self) -> int:
        return self.entries.count

    def byte_count(self) -> int:
        if not self.entries.count:
            return 0
        return self.entries.count * self.entries.row_bytes(("keys", "values"))

    def summary_bytes(self) -> int:
        """The block summaries live on the device (they are scored every step)."""
        if self.block_max is None:
            return 0
        return 2 * self.block_max.numel() * self.block_max.element_size()

    def add(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Evicted entries (kv_heads, m, head_dim) and their positions (kv_heads, m), in eviction order."""
        start, m = self.entries.count, keys.shape[1]
        self._update_summaries(keys.detach(), start)
        new = {"keys": keys.detach(), "values": values.detach(), "positions": positions.detach()}
        if not self.on_cuda:
            self.entries.append(new, m)
            return
        # Earlier copies must land before the buffers may move (growth copies them on the CPU).
        self.stream.synchronize()
        self.entries.append({name: torch.empty(t.shape, dtype=t.dtype) for name, t in new.items()}, m)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):  # device -> pinned host rows, overlapping the next layers' compute
            for name, tensor in new.items():
                self.entries.view(name)[:, start:start + m].copy_(tensor, non_blocking=True)
                tensor.record_stream(self.stream)

    def _update_summaries(self, keys: torch.Tensor, start: int) -> None:
        kv_heads, m, head_dim = keys.shape
        blocks_needed = (start + m + self.block_size - 1) // self.block_size
        have = 0 if self.block_max is None else self.block_max.shape[1]
        if blocks_needed > have:
            capacity = max(blocks_needed, 2 * have)
            grown_max = torch.full((kv_heads, capacity, head_dim), float("-inf"), device=keys.device)
            grown_min = torch.full((kv_heads, capacity, head_dim), float("inf"), device=keys.device)
            if have:
                grown_max[:, :have], grown_min[:, :have] = self.block_max, self.block_min
            self.block_max, self.block_min = grown_max, grown_min
        block = (torch.arange(start, start + m, device=keys.device) // self.block_size)
        index = block[None, :, None].expand(kv_heads, m, head_dim)
        self.block_max.scatter_reduce_(1, index, keys.float(), "amax")
        self.block_min.scatter_reduce_(1, index, keys.float(), "amin")

    def recall(self, query: torch.Tensor) -> Recalled | None:
        """The blocks the step's last query would attend to most, or None (recall 0, empty tier)."""
        count = self.entries.count
        if not self.recall_blocks or not count:
            return None
        if self.on_cuda:
            self.stream.synchronize()  # the eviction copies into host memory have landed
        size = self.block_size
        n_blocks = (count + size - 1) // size
        complete = count // size
        partial = n_blocks - complete
        kv_heads = self.block_max.shape[0]
        chosen = []
        if partial:
            chosen.append(torch.full((kv_heads, 1), complete, dtype=torch.long))
        wanted = min(self.recall_blocks - partial, complete)
        if wanted > 0:
            scores = self._bounds(query, complete)
            top = torch.topk(scores, wanted, dim=-1).indices.sort(dim=-1).values.cpu()
            chosen.insert(0, top)
        if not chosen:
            return None
        blocks = torch.cat(chosen, dim=1)  # (kv_heads, b), increasing
        index = (blocks[:, :, None] * size + torch.arange(size)).flatten(1)
        index = index[:, index[0] < count]  # the partial block's missing tail: same columns for every head
        keys = self._gather("keys", index)
        values = self._gather("values", index)
        positions = self._gather("positions", index)
        return Recalled(keys.to(self.device, non_blocking=True).unsqueeze(0),
                        values.to(self.device, non_blocking=True).unsqueeze(0), positions)

    def state(self) -> dict[str, torch.Tensor]:
        """Everything the tier holds, as exact CPU copies: its entries and the summaries of their blocks."""
        if self.on_cuda:
            self.stream.synchronize()  # the eviction copies into host memory have landed
        tensors = {name: self.entries.view(name) for name in self.entries.tensors}
        if self.block_max is not None:
            blocks = (self.entries.count + self.block_size - 1) // self.block_size
            tensors["block_max"], tensors["block_min"] = self.block_max[:, :blocks], self.block_min[:, :blocks]
        return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """The inverse of `state()`, into a fresh tier."""
        entries = {name: t for name, t in tensors.items() if not name.startswith("block_")}
        if entries:
            with torch.no_grad():  # into preallocated buffers, as a run without autograd would have them
                self.entries.append(entries, next(iter(entries.values())).shape[1])
        if "block_max" in tensors:
            self.block_max = tensors["block_max"].to(self.device)
            self.block_min = tensors["block_min"].to(self.device)

    def _bounds(self, query: torch.Tensor, blocks: int) -> torch.Tensor:
        """Quest's upper bound of q . k per (KV head, complete block), max over the group's query heads."""
        heads, head_dim = query.shape[1], query.shape[-1]
        kv_heads = self.block_max.shape[0]
        last = query[0, :, -1].float().reshape(kv_heads, heads // kv_heads, head_dim)
        upper = (last.clamp(min=0) @ self.block_max[:, :blocks].transpose(1, 2)
                 + last.clamp(max=0) @ self.block_min[:, :blocks].transpose(1, 2))
        return upper.amax(dim=1).cpu()

    def _gather(self, name: str, index: torch.Tensor) -> torch.Tensor:
        tensor = self.entries.view(name)
        expanded = index if tensor.dim() == 2 else index[..., None].expand(-1, -1, tensor.shape[-1])
        return tensor.gather(1, expanded)


def splice(key: torch.Tensor, value: torch.Tensor, recalled: Recalled | None):
    """Recalled entries go in front of the layer's entries (all older than the new chunk, so the
    chunk's causal mask sees them). Returns key, value, and how many columns were put in front."""
    if recalled is None:
        return key, value, 0
    key = torch.cat([recalled.keys.to(key.dtype), key], dim=2)
    value = torch.cat([recalled.values.to(value.dtype), value], dim=2)
    return key, value, recalled.keys.shape[2]
