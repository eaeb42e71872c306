"""Policy scores in the attention pass, on CUDA: Triton kernels that never hold heads x queries x keys.

On a GPU, SDPA's fused kernel is so fast that the separate float32 scoring pass of
`attention.attention_sums` (a batched matmul, a mask, a softmax and a sum per query tile, each its
own launch) dominates a step under H2O. Here the same sums come from two kernels:

  1. `_forward`: flash attention (Dao et al. 2022, arXiv:2205.14135) over query tiles: the online
     softmax keeps a running max and denominator per query, so each query's log-sum-exp (LSE) falls
     out at the end; with `WITH_OUTPUT` it also accumulates P @ V, giving the attention output in the
     same pass (used when the policy scores every query, as H2O does), else it reads no values (the
     LSE of the observation window's rows only; SDPA gives the output).
  2. `_sums`: one pass over key tiles without values: each program owns one key tile of one query
     head and walks the scored queries, p = exp(q.k * scale - LSE), summing p over the queries. So the
     sums cost one more Q K^T, and no atomics are needed.

Both mask from positions exactly as the PyTorch path does (`attention.LogitRule`): a query at
position p sees a key at position t when t <= p and, on a sliding layer, t > p - W. Soft-capped and
sink layers, dropout and autograd stay on the PyTorch path (`usable` says no). Scores are summed per
query head, (heads, k_len) float32, as `attention_sums` returns them: each policy then combines the
heads of a GQA group as it declares (mean, max or sum: `LayerView.attention_sums_per_kv_head`).

Triton is imported at the first call, not with this module, so the core imports without it and the
tests can set TRITON_INTERPRET=1 (which runs these kernels on the CPU) before it is imported.
"""

from __future__ import annotations

import functools
import math

import torch

# Tile sizes: queries x keys per program. 64 x 64 fits head dims up to 128 in shared memory on any
# recent GPU; the tests run other sizes through the interpreter.
BLOCK_M = 64
BLOCK_N = 64


@functools.cache
def available() -> bool:
    """Whether Triton can be imported here (it is Linux x86-64 only on PyPI)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def usable(query: torch.Tensor, rule, dropout: float, setting: str | None) -> bool:
    """Whether this layer's scores come from the kernels. `setting`: "triton" (wherever Triton runs,
    the CPU included through its interpreter), "torch" (never), None (on CUDA when Triton is there).
    Never for soft-capped or sink layers, dropout, or with autograd on."""
    if setting == "torch" or (setting is None and query.device.type != "cuda"):
        return False
    if rule is not None and rule.needs_own_path:
        return False
    return not dropout and not torch.is_grad_enabled() and available()


@functools.cache
def _kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def _forward(Q, K, V, O, LSE, KPOS, QPOS, scale, q_len, k_len, q_start, group, head_dim, window,
                 s_qh, s_qm, s_kh, s_kn, s_vh, s_vn, s_om, s_oh, s_kp,
                 WITH_OUTPUT: tl.constexpr, HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        head = tl.program_id(1)
        kv_head = head // group
        rows = q_start + tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        row_ok = rows < q_len
        dim_ok = dims < head_dim
        q = tl.load(Q + head * s_qh + rows[:, None] * s_qm + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :],
                    other=0.0)
        q_pos = tl.load(QPOS + rows, mask=row_ok, other=0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        # The chunk's own keys are the last q_len: keys after the tile's last query are in its future.
        stop = tl.minimum(k_len, k_len - q_len + q_start + (tl.program_id(0) + 1) * BLOCK_M)
        for start in range(0, stop, BLOCK_N):
            cols = start + tl.arange(0, BLOCK_N)
            col_ok = cols < k_len
            k = tl.load(K + kv_head * s_kh + cols[:, None] * s_kn + dims[None, :],
                        mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
            k_pos = tl.load(KPOS + kv_head * s_kp + cols, mask=col_ok, other=0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            visible = col_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile this row sees nothing of
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if WITH_OUTPUT:
                v = tl.load(V + kv_head * s_vh + cols[:, None] * s_vn + dims[None, :],
                            mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        l_i = tl.where(row_ok, l_i, 1.0)  # padding rows of the last tile: never stored
        tl.store(LSE + head * q_len + rows, m_i + tl.log(l_i), mask=row_ok)
        if WITH_OUTPUT:
            out = acc / l_i[:, None]
            tl.store(O + rows[:, None] * s_om + head * s_oh + dims[None, :], out.to(O.dtype.element_ty),
                     mask=row_ok[:, None] & dim_ok[None, :])

    @triton.jit
    def _sums(Q, K, LSE, SUMS, KPOS, QPOS, scale, q_len, k_len, q_start, group, head_dim, window,
              s_qh, s_qm, s_kh, s_kn, s_kp,
              HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        head = tl.program_id(1)
        kv_head = head // group
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, BLOCK_D)
        col_ok = cols < k_len
        dim_ok = dims < head_dim
        k = tl.load(K + kv_head * s_kh + cols[:, None] * s_kn + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :],
                    other=0.0)
        k_pos = tl.load(KPOS + kv_head * s_kp + cols, mask=col_ok, other=0)
        total = tl.zeros([BLOCK_N], tl.float32)
        # Query i (of the chunk) sees storage index j only if j <= k_len - q_len + i: earlier queries
        # see nothing of this tile.
        first = tl.maximum(q_start, tl.program_id(0) * BLOCK_N - (k_len - q_len))
        for start in range(first, q_len, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = rows < q_len
            q = tl.load(Q + head * s_qh + rows[:, None] * s_qm + dims[None, :],
                        mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
            q_pos = tl.load(QPOS + rows, mask=row_ok, other=0)
            lse = tl.load(LSE + head * q_len + rows, mask=row_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            visible = row_ok[:, None] & col_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
            p = tl.where(visible, tl.exp(s - lse[:, None]), 0.0)
            total += tl.sum(p, axis=0)
        tl.store(SUMS + head * k_len + cols, total, mask=col_ok)

    return triton, _forward, _sums


def _positions(rule, q_len: int, k_len: int, kv_heads: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(key positions (rows, k_len), query positions (q_len,), the key rows' stride: 0 when one row
    serves every KV head), int64 and contiguous. Without stored positions the last q_len keys are the
    chunk's and every earlier one is older (what `LogitRule` assumes): storage indices serve."""
    if rule is None or rule.key_positions is None:
        keys = torch.arange(k_len, device=device)[None]
        queries = torch.arange(k_len - q_len, k_len, device=device)
    else:
        keys = rule.key_positions[:, :k_len].to(device=device, dtype=torch.long).contiguous()
        queries = rule.query_positions.to(device=device, dtype=torch.long).contiguous()
    stride = 0 if keys.shape[0] == 1 else keys.stride(0)
    if keys.shape[0] not in (1, kv_heads):
        raise ValueError(f"key positions for {keys.shape[0]} rows, {kv_heads} KV heads")
    return keys, queries, stride


def attention_and_sums(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, scaling: float | None,
                       n_queries: int, rule=None, block_m: int = BLOCK_M,
                       block_n: int = BLOCK_N) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The attention output of every query (when `value` is given) and, over the newest `n_queries`,
    each key's softmax weight summed per query head: what `attention.attention_and_sums` returns,
    output (1, q_len, heads, d_v) in the query's dtype and sums (heads, k_len) float32, or
    (None, sums) without `value` (the output then comes from SDPA). query (1, heads, q_len, d), key
    and value (1, kv_heads, k_len, d), not GQA-repeated."""
    triton, forward, sums_kernel = _kernels()
    _, heads, q_len, head_dim = query.shape
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scale = scaling if scaling is not None else 1.0 / math.sqrt(head_dim)
    device = query.device
    q = query[0].contiguous()
    k = key[0].contiguous()
    key_positions, query_positions, s_kp = _positions(rule, q_len, k_len, kv_heads, device)
    window = rule.window if rule is not None and rule.window is not None else 0
    has_window = rule is not None and rule.window is not None
    # float32 products exactly as the PyTorch path (no TF32); bf16/fp16 products are exact in float32 anyway
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    block_d = max(16, triton.next_power_of_2(head_dim))
    with_output = value is not None
    q_start = 0 if with_output else q_len - n_queries
    lse = torch.empty(heads, q_len, dtype=torch.float32, device=device)
    if with_output:
        v = value[0].contiguous()
        output = torch.empty(1, q_len, heads, v.shape[-1], dtype=query.dtype, device=device)
        if v.shape[-1] != head_dim:
            raise ValueError("the fused kernel needs values as wide as keys")
    else:
        v, output = k, lse  # unread (WITH_OUTPUT off): any tensor fills the slots
    grid = (triton.cdiv(q_len - q_start, block_m), heads)
    forward[grid](q, k, v, output, lse, key_positions, query_positions, scale, q_len, k_len, q_start, group, head_dim,
                  window, q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                  output.stride(1) if with_output else 0, output.stride(2) if with_output else 0, s_kp,
                  WITH_OUTPUT=with_output, HAS_WINDOW=has_window, PRECISION=precision,
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)
    sums = torch.zeros(heads, k_len, dtype=torch.float32, device=device)
    if n_queries:
        grid = (triton.cdiv(k_len, block_n), heads)
        sums_kernel[grid](q, k, lse, sums, key_positions, query_positions, scale, q_len, k_len, q_len - n_queries,
                          group, head_dim, window, q.stride(0), q.stride(1), k.stride(0), k.stride(1), s_kp,
                          HAS_WINDOW=has_window, PRECISION=precision, BLOCK_M=block_m, BLOCK_N=block_n,
                          BLOCK_D=block_d)
    return (output if with_output else None), sums
