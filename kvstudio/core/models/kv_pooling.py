"""KV-head pooling: a model's key/value heads merged into G groups at load time (a derived model).

GQA (Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head
Checkpoints", EMNLP 2023, arXiv:2305.13245). The rule, the paper's uptraining initialisation: the
KV heads are split into G groups of consecutive heads, and each group's key and value projection
becomes the *mean* of its heads' projections (weights, and biases where the architecture has them,
e.g. Qwen2). The query heads keep their own projections; every query head that read one of a
group's heads now reads the group's pooled head, which is what transformers' `repeat_kv` does once
`num_key_value_heads` (the config and each attention module) says G. The paper then uptrains for a
few percent of pre-training steps; here the pooled model is used as is, or fine-tuned with
`kvstudio finetune` like any model.

G must divide the model's KV heads (pooling to as many groups as it has is the identity). The
cache shrinks by G / kv_heads: each layer stores G heads.

The other way: G a multiple of the KV heads that divides the query heads *expands* them, each KV
head's projection repeated for G / kv_heads query heads (what transformers' `repeat_kv` does at every
step, done once in the weights). The model computes exactly what it did, but its cache holds G heads
and each selects its own entries: with G = the query heads (`default+kv9` on SmolLM2, 3x the
entries and bytes), every query head keeps its own cache, the layout of KVCache-Factory's published
tables (its query_head granularity, keys and values repeated before compression).

A pooled model is named by a spec suffix, `default+kv1`, `tiny-llama+kv1`, `PATH+kv2`
(`split_kv_groups`), so it is a model like any other: run, eval, finetune, compare, saved caches
(its config and weights fingerprint differently).
"""

from __future__ import annotations

import re

import torch

from kvstudio.core.errors import ModelLoadError

SUFFIX = re.compile(r"^(?P<base>.+)\+kv(?P<groups>\d+)$")


def split_kv_groups(spec: str) -> tuple[str, int | None]:
    """'default+kv1' -> ('default', 1); 'default' -> ('default', None)."""
    match = SUFFIX.match(spec)
    if match is None:
        return spec, None
    return match["base"], int(match["groups"])


def with_kv_groups(spec: str, groups: int | None) -> str:
    """The spec of `spec` pooled to `groups` KV heads (None: unchanged)."""
    if groups is None:
        return spec
    base, existing = split_kv_groups(spec)
    if existing is not None and existing != groups:
        raise ModelLoadError(f"--kv-groups {groups} and the model spec {spec} name different KV groups; give one")
    return f"{base}+kv{groups}"


def describe_groups(groups: int) -> str:
    return f"{groups} KV group" + ("" if groups == 1 else "s")


def _pool_rows(tensor: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """(heads * head_dim, ...) rows -> (groups * head_dim, ...): the mean of each group's heads."""
    head_dim = tensor.shape[0] // heads
    rest = tensor.shape[1:]
    grouped = tensor.reshape(groups, heads // groups, head_dim, *rest)
    return grouped.mean(dim=1).reshape(groups * head_dim, *rest)


def _expand_rows(tensor: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    """(heads * head_dim, ...) rows -> (groups * head_dim, ...): each head repeated groups / heads times,
    in repeat_kv's order (KV head h serves query heads h * r .. h * r + r - 1)."""
    head_dim = tensor.shape[0] // heads
    rest = tensor.shape[1:]
    return tensor.reshape(heads, head_dim, *rest).repeat_interleave(groups // heads, dim=0).reshape(
        groups * head_dim, *rest)


def _regroup_rows(tensor: torch.Tensor, heads: int, groups: int) -> torch.Tensor:
    return _pool_rows(tensor, heads, groups) if groups < heads else _expand_rows(tensor, heads, groups)


def _pooled_linear(linear: torch.nn.Linear, heads: int, groups: int) -> torch.nn.Linear:
    pooled = torch.nn.Linear(linear.in_features, linear.out_features // heads * groups, bias=linear.bias is not None,
                             device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        pooled.weight.copy_(_regroup_rows(linear.weight, heads, groups))
        if linear.bias is not None:
            pooled.bias.copy_(_regroup_rows(linear.bias, heads, groups))
    return pooled


def _attention_modules(model) -> list:
    return [module for name, module in model.named_modules() if name.endswith("self_attn")]


def pool_kv_heads(model, groups: int) -> None:
    """Pool `model`'s KV heads into `groups`, in place. Raises ModelLoadError when G does not divide
    the KV heads or the attention layout is not one this knows (k_proj/v_proj, or Phi-3's qkv_proj)."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    choices = [g for g in range(1, heads + 1) if kv_heads % g == 0 or (g % kv_heads == 0 and heads % g == 0)]
    if groups not in choices:
        raise ModelLoadError(f"--kv-groups {groups}: this model has {kv_heads} KV heads and {heads} query heads; G "
                             f"divides the KV heads (pooling) or is a multiple of them dividing the query heads "
                             f"(each query head's own entries at {heads}): choose one of "
                             f"{', '.join(map(str, choices))}")
    if groups == kv_heads:
        return  # the identity
    modules = _attention_modules(model)
    if not modules:
        raise ModelLoadError(f"--kv-groups: no attention modules named *.self_attn in {type(model).__name__}; "
                             "KV pooling does not know this architecture")
    for module in modules:
        if hasattr(module, "k_proj") and hasattr(module, "v_proj"):
            module.k_proj = _pooled_linear(module.k_proj, kv_heads, groups)
            module.v_proj = _pooled_linear(module.v_proj, kv_heads, groups)
        elif hasattr(module, "qkv_proj"):
            _pool_fused(module, heads, kv_heads, groups)
        else:
            raise ModelLoadError(f"--kv-groups: {type(module).__name__} has neither k_proj/v_proj nor qkv_proj; "
                                 "KV pooling does not know this architecture")
        # transformers repeats each KV head num_key_value_groups times for the query heads.
        if hasattr(module, "num_key_value_groups"):
            module.num_key_value_groups = heads // groups
        if hasattr(module, "num_key_value_heads"):
            module.num_key_value_heads = groups
    text_config.num_key_value_heads = groups


def _pool_fused(module, heads: int, kv_heads: int, groups: int) -> None:
    """Phi-3: one qkv_proj whose rows are [queries | keys | values]."""
    linear = module.qkv_proj
    head_dim = linear.out_features // (heads + 2 * kv_heads)
    q_rows, kv_rows = heads * head_dim, kv_heads * head_dim

    def pooled(tensor):
        queries, keys, values = tensor[:q_rows], tensor[q_rows:q_rows + kv_rows], tensor[q_rows + kv_rows:]
        return torch.cat([queries, _regroup_rows(keys, kv_heads, groups), _regroup_rows(values, kv_heads, groups)])

    fused = torch.nn.Linear(linear.in_features, q_rows + 2 * groups * head_dim, bias=linear.bias is not None,
                            device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(pooled(linear.weight))
        if linear.bias is not None:
            fused.bias.copy_(pooled(linear.bias))
    module.qkv_proj = fused
