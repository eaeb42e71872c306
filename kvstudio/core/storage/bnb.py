"""bnb-int8 and bnb-int4: bitsandbytes' blockwise quantization, CUDA only.

Dettmers et al., "8-bit Optimizers via Block-wise Quantization" (ICLR 2022, arXiv:2110.02861) and
"QLoRA" (NeurIPS 2023, arXiv:2305.14314). The rule: each block of `group_size` consecutive values
of one entry's row is scaled by its absolute maximum (one fp32 per block) and mapped to the nearest
of 256 levels of the dynamic 8-bit map (bnb-int8) or of the 16 NF4 levels (bnb-int4, packed two a
byte). Blocks lie inside one entry's row, so keys and values are both quantized per token (the
kernels have no per-channel mode), and an evicted entry takes its codes and scales with it.
"""

from __future__ import annotations

import torch

from kvstudio.core.storage.base import Codec, CodecError, Encoded


def _bitsandbytes():
    try:
        import bitsandbytes.functional as functional
    except ImportError as error:
        raise CodecError("the bnb codecs need the bitsandbytes package and a CUDA GPU "
                         "(pip install bitsandbytes); on CPU use --codec int8 or int4") from error
    return functional


class BitsAndBytesCodec(Codec):
    four_bit = False
    grouped_kinds = frozenset()  # blocks lie inside one entry's row: nothing waits for a group

    def check(self, device: torch.device) -> None:
        if torch.device(device).type != "cuda":
            raise CodecError(f"--codec {self.name} runs on CUDA only (bitsandbytes kernels), and this model is on "
                             f"{device}; use --codec {'int4' if self.four_bit else 'int8'} instead")
        _bitsandbytes()
        if self.group_size < 64 or self.group_size & (self.group_size - 1):
            raise CodecError(f"--codec {self.name} needs --group-size a power of two of at least 64 "
                             f"(bitsandbytes block sizes), got {self.group_size}")

    def _block(self, head_dim: int) -> int:
        if head_dim % self.group_size:
            raise CodecError(f"--codec {self.name}: --group-size {self.group_size} must divide the head dimension "
                             f"{head_dim}, so that each block lies inside one entry")
        return self.group_size

    def encode(self, x, kind):
        functional = _bitsandbytes()
        kv_heads, n, head_dim = x.shape
        block = self._block(head_dim)
        flat = x.contiguous().view(-1)
        if self.four_bit:
            codes, state = functional.quantize_4bit(flat, blocksize=block, quant_type="nf4")
            codes = codes.view(kv_heads, n, head_dim // 2)
        else:
            codes, state = functional.quantize_blockwise(flat, blocksize=block)
            codes = codes.view(kv_heads, n, head_dim)
            self._code = state.code  # the dynamic map: one 256-entry table shared by every block
        return Encoded({"codes": codes, "absmax": state.absmax.view(kv_heads, n, head_dim // block)})

    def decode(self, per_entry, per_group, kind, dtype):
        functional = _bitsandbytes()
        codes, absmax = per_entry["codes"], per_entry["absmax"]
        kv_heads, n = codes.shape[:2]
        head_dim = absmax.shape[-1] * self.group_size
        shape = torch.Size((kv_heads * n * head_dim,))
        if self.four_bit:
            state = functional.QuantState(absmax=absmax.reshape(-1).contiguous(), shape=shape, dtype=dtype,
                                          blocksize=self.group_size, quant_type="nf4",
                                          code=functional.get_4bit_type("nf4", device=codes.device))
            flat = functional.dequantize_4bit(codes.reshape(-1, 1).contiguous(), quant_state=state)
        else:
            state = functional.QuantState(absmax=absmax.reshape(-1).contiguous(), shape=shape, dtype=dtype,
                                          blocksize=self.group_size, code=self._code)
            flat = functional.dequantize_blockwise(codes.reshape(-1).contiguous(), quant_state=state)
        return flat.view(kv_heads, n, head_dim).to(dtype)


class BnbInt8Codec(BitsAndBytesCodec):
    name = "bnb-int8"
    summary = "bitsandbytes blockwise dynamic 8-bit, per token (CUDA only)"


class BnbInt4Codec(BitsAndBytesCodec):
    name = "bnb-int4"
    summary = "bitsandbytes NF4, packed two a byte, per token (CUDA only)"
    four_bit = True
