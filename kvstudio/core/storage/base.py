"""The codec contract: how the entries a policy keeps are held. Built-in codecs and plugins use it.

Selection (which entries stay) is the policy's job; storage (how they are held) is a codec's. A
cache is named `<policy>-<codec>` (`h2o-int4`), the naming of the KeysAndValues library.

A codec encodes a *group* of entries of one layer (all KV heads at once) and decodes what it
produced. The engine's storage (`kvstudio.core.storage.layer_stores`) does the rest: it keeps the
newest entries in full precision until they leave the residual window, hands the codec each group
as it leaves (for a kind in `grouped_kinds`, G entries of each KV head: the oldest a head holds that
no group holds yet, once the policy has run, so a group's entries need not be consecutive tokens;
else whatever left this step), holds the fewer than G left over in 8 bits per token (fp16 under int8) meanwhile, stores
the encoded tensors in preallocated per-layer buffers, compacts them in place when the policy
evicts, and counts their bytes. Write a codec in three parts:

1. `encode(x, kind) -> Encoded`: x is (kv_heads, G, head_dim) in the model's dtype, `kind` is
   "key" or "value". Return `Encoded(per_entry, per_group)`:
   - `per_entry`: tensors of shape (kv_heads, G, ...), one row per entry; they follow the entry
     when the cache compacts, and are dropped with it when the policy evicts it;
   - `per_group`: tensors of shape (kv_heads, ...) shared by the G entries (a per-channel scale),
     kept while any KV head still holds an entry of the group.
2. `decode(per_entry, per_group, kind, dtype) -> (kv_heads, n, head_dim)`: per_entry rows of n
   entries, per_group already expanded to each entry's group: shape (kv_heads, n, ...).
3. `name` (an identifier) and `summary` (one line). Optionally `check(device)`: raise
   `CodecError` when the codec cannot run there (bitsandbytes without CUDA), and `grouped_kinds`:
   the kinds whose encoding spans the G entries of a group (KIVI's per-channel keys: {"key"}).
   Those wait (in 8 bits per token, fp16 under int8) until a head holds a whole group; the other kinds are quantized
   per entry (`per_group` empty) and encoded the step they leave the residual window. The default,
   both kinds, is always correct, only larger.

Every byte of every tensor returned by `encode` counts towards the cache's bytes, so a codec's
savings are reported honestly. A plugin file (in any plugin folder) that defines a subclass of
`Codec` adds it: `--codec NAME` and `--policy h2o-NAME` then work.

The `fp` codec is special: it stores the model's tensors as they are (no groups, no window) in the
same preallocated buffers, and is bit-identical to an unquantized cache.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch

from kvstudio.core.errors import KVStudioError
from kvstudio.core.params import ParameterSpec, check_value, declared, parameter

Kind = Literal["key", "value"]
TIERS = ("device", "host")
MERGE_METHODS = ("none", "minicache")  # cross-layer merging (storage/minicache.py)


class CodecError(KVStudioError):
    """A codec cannot be used as asked (unknown name, bad option, missing hardware)."""


@dataclass
class Encoded:
    per_entry: dict[str, torch.Tensor]
    per_group: dict[str, torch.Tensor] = field(default_factory=dict)


class Codec(ABC):
    """Base class of every codec. See the module docstring for the contract."""

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    grouped_kinds: ClassVar[frozenset[str]] = frozenset({"key", "value"})  # see the module docstring

    def __init__(self, group_size: int = 64):
        self.group_size = group_size

    def check(self, device: torch.device) -> None:
        """Raise CodecError if this codec cannot run on `device`."""

    @abstractmethod
    def encode(self, x: torch.Tensor, kind: Kind) -> Encoded:
        """(kv_heads, G, head_dim) -> the tensors that hold it."""

    @abstractmethod
    def decode(self, per_entry: dict[str, torch.Tensor], per_group: dict[str, torch.Tensor], kind: Kind,
               dtype: torch.dtype) -> torch.Tensor:
        """Back to (kv_heads, n, head_dim) in `dtype`."""


@dataclass
class StorageConfig:
    """How a run's cache is stored: codec, its options, and where evicted entries go.

    Each field is declared once (core/params.py): its help, range and choices drive `kvstudio run`'s
    options (cli/storage_options.py), the studio's storage fields (gui/widgets/storage_form.py) and
    eval variants typed as text (policy_storage.storage_from_options)."""

    codec: str = parameter("fp", help="how kept entries are stored: fp is the model's dtype; int8/int4 quantize "
                                      "keys per channel and values per token (KIVI); bnb-* need CUDA")
    group_size: int = parameter(64, minimum=2, maximum=4096,
                                help="entries per key group and channels per value group, KIVI-style")
    # Newest entries kept in full precision until they leave this window. 0 (the default) is what holds
    # the byte targets under bounded policies: values are then quantized the step they arrive, keys
    # when the policy has run, and each KV head's incomplete key group (at most group_size - 1 keys)
    # waits in 8 bits per token, fp16 under int8 (storage/layer_stores.py).
    residual: int = parameter(0, minimum=0, maximum=1_000_000,
                              help="newest entries kept in full precision until they leave this window (0: values "
                                   "are quantized at once, keys once the policy has run)")
    tier: str = parameter("device", choices=TIERS, help="device: evicted entries are dropped; host: they move to "
                                                        "host memory and can be recalled")
    recall: int = parameter(0, minimum=0, maximum=1_000_000, label="recall blocks",
                            help="host blocks the current query brings back each step (tier host)")
    block_size: int = parameter(16, minimum=1, maximum=1_000_000, help="entries per host block (one summary each)")
    measure_error: bool = parameter(False, help="report the codec's relative error of keys and values and the KL "
                                                "divergence of the next-token distribution from the same run stored "
                                                "in fp (runs the sequence twice more)")
    # Cross-layer merging (storage/minicache.py): adjacent layers from merge_from on share directions.
    merge: str = parameter("none", choices=MERGE_METHODS, label="merge layers",
                           help="minicache: from merge_from on, adjacent layers share one direction per token (SLERP "
                                "of their states) and keep their own magnitudes (Liu et al. 2024)")
    merge_from: int | None = parameter(None, minimum=0, maximum=1024, label="merge from layer", metavar="L",
                                       help="the first merged layer (None: half depth): pairs (L, L+1), (L+2, L+3), ...")
    merge_threshold: float = parameter(0.05, minimum=0.0, maximum=2.0, label="retention threshold", metavar="T",
                                       help="tokens whose two states are farther apart than this fraction of the "
                                            "pair's distance range stay unmerged; 0 keeps every token unmerged, above "
                                            "1 merges every token both layers hold (0.05: the paper's)")
    merge_t: float = parameter(0.6, minimum=0.0, maximum=1.0, label="SLERP t", metavar="T",
                               help="SLERP interpolation parameter, 0 = the earlier layer's direction, 1 = the "
                                    "later's (0.6: the paper's)")

    @classmethod
    def parameters(cls) -> list[ParameterSpec]:
        return declared(cls)

    def validate(self) -> None:
        from kvstudio.core.storage import codec_class

        codec_class(self.codec)  # an unknown name raises with the list of codecs
        for spec in self.parameters():
            setattr(self, spec.name, check_value(spec, getattr(self, spec.name), CodecError))
        if self.recall and self.tier != "host":
            raise CodecError("--recall N needs --tier host (evicted entries are dropped on the device tier, so there "
                             "is nothing to recall)")

    def describe(self) -> str:
        parts = [self.codec]
        if self.codec != "fp":
            parts.append(f"group {self.group_size}, residual {self.residual}")
        if self.tier == "host":
            parts.append(f"host tier, recall {self.recall} blocks of {self.block_size}")
        if self.merge != "none":
            start = "half depth" if self.merge_from is None else f"layer {self.merge_from}"
            parts.append(f"{self.merge} from {start} (threshold {self.merge_threshold:g}, t {self.merge_t:g})")
        return ", ".join(parts)
