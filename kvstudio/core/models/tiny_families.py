"""Tiny random configs of the decoder families KV Studio is checked against (tests/test_conformance.py,
benchmarks): 4 layers, hidden size 64, 4 query / 2 KV heads of size 16, the byte tokenizer's 258
tokens, and a sliding window of `window` tokens wherever the family has sliding layers, so that a
prompt longer than the window really exercises it."""

from __future__ import annotations

import torch

from kvstudio.core.errors import ModelLoadError
from kvstudio.core.models.tiny import TINY_SEED, TINY_VOCAB

WINDOW = 8

COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              bos_token_id=256, eos_token_id=257, pad_token_id=257, tie_word_embeddings=False)
MIXED = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def _configs(window: int) -> dict:
    import transformers as t

    c = COMMON
    moe = dict(num_local_experts=4, num_experts_per_tok=2)
    return {
        "llama": lambda: t.LlamaConfig(**c),
        "mistral": lambda: t.MistralConfig(**c, sliding_window=window),
        "mixtral": lambda: t.MixtralConfig(**c, **moe, sliding_window=None),
        "qwen2": lambda: t.Qwen2Config(**c, use_sliding_window=True, sliding_window=window, max_window_layers=2),
        "qwen3": lambda: t.Qwen3Config(**c, head_dim=16),
        "qwen3_moe": lambda: t.Qwen3MoeConfig(**c, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                              moe_intermediate_size=32),
        "gemma": lambda: t.GemmaConfig(**c, head_dim=16),
        "gemma2": lambda: t.Gemma2Config(**c, head_dim=16, sliding_window=window, query_pre_attn_scalar=16),
        "gemma3_text": lambda: t.Gemma3TextConfig(**c, head_dim=16, sliding_window=window,
                                                  layer_types=MIXED[:1] * 3 + ["full_attention"]),
        "phi3": lambda: t.Phi3Config(**c, sliding_window=window),
        "olmo2": lambda: t.Olmo2Config(**c),
        "cohere2": lambda: t.Cohere2Config(**c, sliding_window=window),
        "exaone4": lambda: t.Exaone4Config(**c, sliding_window=window),
        "granite": lambda: t.GraniteConfig(**c),
        "starcoder2": lambda: t.Starcoder2Config(**c, sliding_window=window),
        "gpt2": lambda: t.GPT2Config(vocab_size=TINY_VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=512,
                                     bos_token_id=256, eos_token_id=257),
        "gpt_neox": lambda: t.GPTNeoXConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=512,
                                            bos_token_id=256, eos_token_id=257),
        "gpt_oss": lambda: t.GptOssConfig(**{**c, "intermediate_size": 64}, head_dim=16, sliding_window=window,
                                          num_local_experts=4, num_experts_per_tok=2),
        # MLA: one latent per token; as in the released models, KV heads = query heads after expansion
        "deepseek_v3": lambda: t.DeepseekV3Config(**{**c, "num_key_value_heads": 4}, kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8,
                                                  qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=4,
                                                  num_experts_per_tok=2, first_k_dense_replace=1,
                                                  moe_intermediate_size=32, n_group=1, topk_group=1),
        "smollm3": lambda: t.SmolLM3Config(**c),
        "glm": lambda: t.GlmConfig(**c, head_dim=16),
        "lfm2": lambda: t.Lfm2Config(**{k: v for k, v in c.items() if k != "intermediate_size"},
                                     intermediate_size=128, full_attn_idxs=[1, 3]),
        # Linear attention (Gated DeltaNet) in layers 0-2, global attention in layer 3, as Qwen3-Next's 3:1
        "qwen3_next": lambda: t.Qwen3NextConfig(**c, head_dim=16, linear_conv_kernel_dim=4, linear_key_head_dim=16,
                                                linear_value_head_dim=16, linear_num_key_heads=2,
                                                linear_num_value_heads=4, num_experts=4, num_experts_per_tok=2,
                                                moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                                layer_types=["linear_attention"] * 3 + ["full_attention"]),
        # Mamba layers (left to transformers as linear-attention state) between attention layers 1 and 3
        "jamba": lambda: t.JambaConfig(**{k: v for k, v in c.items() if k != "max_position_embeddings"},
                                       attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2,
                                       num_experts=2, mamba_d_state=8, mamba_expand=2, use_mamba_kernels=False),
        # Every layer both Mamba and attention at once: refused (a PolicyLayer cannot also hold the state)
        "falcon_h1": lambda: t.FalconH1Config(**c, mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16,
                                              mamba_d_state=8, mamba_n_groups=1, head_dim=16),
        "falcon": lambda: t.FalconConfig(vocab_size=TINY_VOCAB, hidden_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, bos_token_id=256, eos_token_id=257),
    }


FAMILIES = tuple(_configs(WINDOW))


def family_config(family: str, window: int = WINDOW):
    configs = _configs(window)
    if family not in configs:
        raise ModelLoadError(f"no tiny config for family {family!r}: one of {', '.join(configs)}")
    return configs[family]()


def build_family_model(family: str, window: int = WINDOW, seed: int = TINY_SEED):
    """A tiny model of the family, random weights from `seed`, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    config = family_config(family, window)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    return model.eval()
