"""int8 and int4 codecs: asymmetric integer quantization with the groups of KIVI.

Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache" (ICML 2024,
arXiv:2402.02750). Keys have a few outlier *channels*, values do not, so the rule is: keys are
quantized per channel (each channel of a group of G consecutive entries shares one scale and zero
point), values per token (each entry's channels, G at a time, share one). Asymmetric: a group's
minimum is its zero point and (max - min) / (2^bits - 1) its scale, both stored in fp16; a value
x is held as round((x - zero) / scale), decoded as code * scale + zero, so the error of one value
is at most scale / 2. int4 packs two codes in one byte (low nibble first). Values, quantized per
token, are encoded as soon as they leave the residual window; keys once the policy has run, in
groups of the G oldest entries a KV head holds that no group holds yet (not G consecutive token
positions as in KIVI: under eviction those keep a few scattered survivors that pay a whole group's
scales), the fewer than G left over held in 8 bits per token (fp16 under int8) until their group is complete, not in
full precision as in KIVI (the storage does that, from `grouped_kinds`; layer_stores.py says more).
"""

from __future__ import annotations

import torch

from kvstudio.core.storage.base import Codec, CodecError, Encoded, Kind

FP16_MAX = 65504.0


def _scale_and_zero(low: torch.Tensor, high: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 scale and zero point of groups spanning [low, high]; a flat group gets scale 1 (codes 0)."""
    zero = low.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    span = high - zero.float()
    scale = torch.where(span > 0, span / levels, torch.ones_like(span)).clamp(max=FP16_MAX).to(torch.float16)
    return scale, zero


def _codes(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, levels: int) -> torch.Tensor:
    # The stored (fp16-rounded) scale and zero are used here, so decoding errs by rounding only.
    return ((x - zero.float()) / scale.float()).round_().clamp_(0, levels).to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., d) codes in 0..15 -> (..., d/2) bytes: even channels in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


class IntegerCodec(Codec):
    bits: int = 8
    grouped_kinds = frozenset({"key"})  # keys per channel over G entries; values per token

    @property
    def levels(self) -> int:
        return 2 ** self.bits - 1

    def value_group(self, head_dim: int) -> int:
        """Channels per value group: the group size, or the whole row when it does not divide it."""
        return self.group_size if head_dim % self.group_size == 0 else head_dim

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        return pack_nibbles(codes) if self.bits == 4 else codes

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        return unpack_nibbles(packed) if self.bits == 4 else packed

    def encode(self, x: torch.Tensor, kind: Kind) -> Encoded:
        if self.bits == 4 and x.shape[-1] % 2:
            raise CodecError(f"int4 packs two channels a byte and needs an even head dimension, got {x.shape[-1]}")
        x = x.float()
        if kind == "key":  # per channel: statistics over the group's entries (dim 1)
            scale, zero = _scale_and_zero(x.amin(dim=1), x.amax(dim=1), self.levels)
            codes = _codes(x, scale[:, None], zero[:, None], self.levels)
            return Encoded({"codes": self._pack(codes)}, {"scale": scale, "zero": zero})
        kv_heads, n, head_dim = x.shape
        group = self.value_group(head_dim)
        grouped = x.view(kv_heads, n, head_dim // group, group)
        scale, zero = _scale_and_zero(grouped.amin(dim=-1), grouped.amax(dim=-1), self.levels)
        codes = _codes(grouped, scale[..., None], zero[..., None], self.levels).view(kv_heads, n, head_dim)
        return Encoded({"codes": self._pack(codes), "scale": scale, "zero": zero})

    def decode(self, per_entry, per_group, kind, dtype):
        codes = self._unpack(per_entry["codes"]).float()
        if kind == "key":
            return (codes * per_group["scale"].float() + per_group["zero"].float()).to(dtype)
        kv_heads, n, head_dim = codes.shape
        scale, zero = per_entry["scale"].float(), per_entry["zero"].float()
        grouped = codes.view(kv_heads, n, scale.shape[-1], -1)
        return (grouped * scale[..., None] + zero[..., None]).view(kv_heads, n, head_dim).to(dtype)


class Int8Codec(IntegerCodec):
    name = "int8"
    summary = "8-bit integers, keys per channel and values per token (KIVI), fp16 scales and zero points"
    bits = 8


class Int4Codec(IntegerCodec):
    name = "int4"
    summary = "4-bit integers packed two a byte, keys per channel and values per token (KIVI)"
    bits = 4
