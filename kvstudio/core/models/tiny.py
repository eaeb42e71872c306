"""Tiny randomly initialised models built in code (4 layers, fixed seed) with a byte-level tokenizer:
no files, seconds per test, instant demos (`--model tiny-llama`)."""

from __future__ import annotations

import torch

from kvstudio.core.errors import ModelLoadError

TINY_FAMILIES = ("llama", "qwen2", "mistral", "phi3", "gemma")
TINY_SEED = 1234


def byte_tokenizer():
    """A byte-level tokenizer with no merges: every UTF-8 byte is a token, plus BOS and EOS.

    Built in code so tiny models need no files. Vocabulary: 256 bytes, then <s> (256), </s> (257).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_to_unicode = sorted(alphabet, key=lambda ch: _byte_of(ch))
    vocab = {ch: index for index, ch in enumerate(byte_to_unicode)}
    vocab["<s>"], vocab["</s>"] = 256, 257
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def _byte_of(char: str) -> int:
    """Inverse of GPT-2's bytes_to_unicode map, used to order the byte alphabet."""
    code = ord(char)
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


TINY_VOCAB = 258


def tiny_config(family: str):
    """A small config of the family: 4 layers, 4 query / 2 KV heads (GQA), head size 16."""
    import transformers

    common = dict(
        vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        bos_token_id=256, eos_token_id=257, pad_token_id=257, tie_word_embeddings=False,
    )
    if family == "llama":
        return transformers.LlamaConfig(**common)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, use_sliding_window=False)
    if family == "mistral":
        return transformers.MistralConfig(**common, sliding_window=None)
    if family == "phi3":
        return transformers.Phi3Config(**common, sliding_window=None)
    if family == "gemma":
        return transformers.GemmaConfig(**common, head_dim=16)
    raise ModelLoadError(f"unknown tiny model 'tiny-{family}': use one of " + ", ".join(f"tiny-{f}" for f in TINY_FAMILIES))


def build_tiny_model(family: str):
    from transformers import AutoModelForCausalLM

    config = tiny_config(family)
    # A fixed seed makes the same spec give the same weights in every process.
    devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return model, byte_tokenizer()
