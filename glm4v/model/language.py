"""GLM-4 decoder: RMSNorm, RoPE on half of each head, grouped-query attention, SwiGLU, KV cache.

Module and parameter names follow the official checkpoint (``transformer.encoder.layers.N...``)
so that a state dict loads without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

from glm4v.config import GLM4VConfig
from glm4v.kernels import (
    decode_attention,
    decode_block,
    decode_rms_norm,
    decode_rope,
    decode_rope_into_cache,
    decode_swiglu,
    linear,
    upcast_attention,
)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The variance is taken in fp32 even for bf16 activations (as the official code), and the
        # product with the weight happens in fp32 before the cast back: that is what the
        # reference does, and bf16 rounding at either point changes the logits visibly.
        fused = decode_rms_norm(x, self.weight, self.eps)  # the same steps in one call, for decode
        if fused is not None:
            return fused
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (self.weight * (x * torch.rsqrt(variance + self.eps))).to(x.dtype)


def rope_table(config: GLM4VConfig, device=None) -> torch.Tensor:
    """[seq_length, rope_dim/2, 2] table of (cos, sin), computed in fp32 like the reference."""
    dim = config.rope_dim
    theta = 1.0 / (config.rope_base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))
    angles = torch.outer(torch.arange(config.seq_length, dtype=torch.float, device=device), theta)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of the first half of each head (GPT-J layout).

    x: [B, heads, L, head_dim]; rope: [B, L, rope_dim/2, 2] in x's dtype.
    """
    fused = decode_rope(x, rope)  # the same roundings in one call, for decode
    if fused is not None:
        return fused
    rot_dim = rope.shape[-2] * 2
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    pairs = x_rot.unflatten(-1, (-1, 2))
    cos, sin = rope[:, None, :, :, 0], rope[:, None, :, :, 1]
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, x_pass], dim=-1)


class KVCache:
    """Preallocated keys/values for every layer: [layers, batch, kv_heads, max_len, head_dim].

    Each batch row fills its own slots from 0 upward (``lengths``), so rows of different lengths
    can decode together (continuous batching). ``valid`` marks which slots hold a real token:
    left padding and stale slots are masked out. Keys are stored after RoPE and before the
    grouped-query expansion, as in the official cache. ``narrow`` gives a view on a range of rows
    that writes through to the same storage.
    """

    def __init__(self, k, v, valid, lengths, positions):
        self.k, self.v, self.valid, self.lengths, self.positions = k, v, valid, lengths, positions

    @classmethod
    def allocate(cls, config: GLM4VConfig, batch_size: int, max_len: int, dtype, device) -> "KVCache":
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
        return cls(
            k=torch.zeros(shape, dtype=dtype, device=device),
            v=torch.zeros(shape, dtype=dtype, device=device),
            valid=torch.zeros(batch_size, max_len, dtype=torch.bool, device=device),
            lengths=torch.zeros(batch_size, dtype=torch.long, device=device),
            positions=torch.zeros(batch_size, dtype=torch.long, device=device),
        )

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def narrow(self, start: int, count: int) -> "KVCache":
        return KVCache(
            self.k.narrow(1, start, count), self.v.narrow(1, start, count), self.valid.narrow(0, start, count),
            self.lengths.narrow(0, start, count), self.positions.narrow(0, start, count),
        )

    def reset(self) -> None:
        self.valid.zero_()
        self.lengths.zero_()
        self.positions.zero_()

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class StepContext:
    """What every layer needs for one forward step, computed once per step instead of per layer.

    ``slots`` [B, L] are the cache slots the new tokens are written to, ``rope`` their rotary
    rows, and ``mask`` the boolean attention mask ([B, 1, L, T], True = may attend) or None when a
    plain causal / full attention is exact. ``key_len`` is how many cache slots attention reads.
    ``first_slot`` is set when every row writes the same slots (one sequence, or a batch that
    started together): the layers then write their keys/values with a slice copy instead of an
    indexed scatter, which matters in a decode step where everything but the matmuls is overhead.
    """

    def __init__(self, rope, mask, causal, cache: KVCache | None, slots, key_len, first_slot: int | None = None):
        self.rope, self.mask, self.causal, self.cache = rope, mask, causal, cache
        self.slots, self.key_len, self.first_slot = slots, key_len, first_slot
        self.rows = None if slots is None else torch.arange(slots.shape[0], device=slots.device)[:, None]


def build_step(
    rope_rows: torch.Tensor,
    token_mask: torch.Tensor | None,
    cache: KVCache | None,
) -> StepContext:
    """Prepare masks and cache slots for a step of L new tokens per row.

    token_mask [B, L] (1 = real token, 0 = padding). Semantics follow the reference: causal
    attention over real keys; a padding query row attends to every key (its output is unused
    but must stay finite).
    """
    B, L = rope_rows.shape[:2]
    device = rope_rows.device
    if cache is None:
        if token_mask is None or bool(token_mask.all()):
            return StepContext(rope_rows, None, L > 1, None, None, L)
        keep = token_mask.bool()
        mask = torch.ones(L, L, dtype=torch.bool, device=device).tril()[None, None] & keep[:, None, None, :]
        mask = mask | ~keep[:, None, :, None]
        return StepContext(rope_rows, mask, False, None, None, L)

    lengths = cache.lengths
    slots = lengths[:, None] + torch.arange(L, device=device)
    key_len = int(lengths.max()) + L
    if key_len > cache.max_len:
        raise RuntimeError(f"KV cache overflow: {key_len} slots needed, {cache.max_len} allocated")
    new_valid = torch.ones(B, L, dtype=torch.bool, device=device) if token_mask is None else token_mask.bool()
    rows = torch.arange(B, device=device)[:, None]
    cache.valid[rows, slots] = new_valid
    same_start = bool((lengths == lengths[0]).all())
    first_slot = int(lengths[0]) if same_start else None
    # Fast path: every row starts at the same slot with no padding anywhere -> plain causal
    # (prefill from empty) or full attention (a single new token).
    uniform = same_start and bool(cache.valid[:, :key_len].all())
    if uniform and (L == 1 or first_slot == 0):
        return StepContext(rope_rows, None, L > 1, cache, slots, key_len, first_slot)
    key_idx = torch.arange(key_len, device=device)
    mask = cache.valid[:, None, None, :key_len] & (key_idx[None, None, None, :] <= slots[:, None, :, None])
    mask = mask | ~new_valid[:, None, :, None]
    return StepContext(rope_rows, mask, False, cache, slots, key_len, first_slot)


class Linear(nn.Linear):
    """``nn.Linear`` whose bf16 products on a CPU go to glm4v.kernels where that is faster.

    Same parameters and math; only the kernel differs: decode-sized products use the AVX512-BF16
    GEMV (torch's streams weights at a fraction of the memory bandwidth), and on CPUs that emulate
    bf16, prefill-sized ones run in float32. Training and other dtypes use F.linear.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def decode_gemv_args(self, x: torch.Tensor) -> tuple | None:
        """What ``glm4v.kernels.decode_block`` needs of this layer for a decode step of ``x``
        (bits, weight, scales, bias, group), or None where this layer must run on its own."""
        w, b = self.weight, self.bias
        if w.dtype is not torch.bfloat16 or not w.is_cpu or not w.is_contiguous():
            return None
        if b is not None and (b.dtype is not torch.bfloat16 or not b.is_cpu):
            return None
        return 16, w, None, b, 0


class SelfAttention(nn.Module):
    def __init__(self, config: GLM4VConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        qkv_out = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = Linear(config.hidden_size, qkv_out, bias=config.add_qkv_bias)
        self.dense = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor, step: StepContext, layer: int) -> torch.Tensor:
        B, L, _ = x.shape
        hd, H, G = self.head_dim, self.num_heads, self.num_kv_heads
        qkv = self.query_key_value(x)
        if step.cache is not None and step.first_slot is not None:
            cache_k, cache_v = step.cache.k[layer], step.cache.v[layer]
            q = decode_rope_into_cache(qkv, step.rope, cache_k, cache_v, step.first_slot, H, G)
            if q is not None:  # a decode step: the steps below in one kernel call
                k, v = cache_k[:, :, : step.key_len], cache_v[:, :, : step.key_len]
                return self._attend(q, k, v, step)
        # Output rows are contiguous blocks [q | k | v], not interleaved per head; q and k are
        # rotated in one call (RoPE is per head, the same for both).
        qk, v = qkv.split([(H + G) * hd, G * hd], dim=-1)
        qk = apply_rope(qk.view(B, L, H + G, hd).transpose(1, 2), step.rope)
        q, k = qk[:, :H], qk[:, H:]
        v = v.view(B, L, G, hd).transpose(1, 2)

        if step.cache is not None:
            cache_k, cache_v = step.cache.k[layer], step.cache.v[layer]
            if step.first_slot is not None:
                cache_k[:, :, step.first_slot : step.first_slot + L] = k
                cache_v[:, :, step.first_slot : step.first_slot + L] = v
            else:
                cache_k[step.rows, :, step.slots] = k.transpose(1, 2)
                cache_v[step.rows, :, step.slots] = v.transpose(1, 2)
            k = cache_k[:, :, : step.key_len]
            v = cache_v[:, :, : step.key_len]

        return self._attend(q, k, v, step)

    def _attend(self, q, k, v, step: StepContext) -> torch.Tensor:
        B, H, L, hd = q.shape
        if step.mask is None and not step.causal:  # a decode step: its own kernel where built
            out = decode_attention(q, k, v)
            if out is not None:
                return self.dense(out)
        out = grouped_attention(q, k, v, step.mask, step.causal)
        return self.dense(out.transpose(1, 2).reshape(B, L, H * hd))


def grouped_attention(q, k, v, mask, causal: bool) -> torch.Tensor:
    """Attention of H query heads over G shared key/value heads without repeating K/V.

    For few query tokens the H/G query heads of a group are folded into the query-length axis,
    so each group is one [rep*L, T] product against its own K/V: on CPU this is ~20-35x faster
    than SDPA's own GQA path for decode (see docs/PERFORMANCE.md). Long prefills use SDPA's
    causal kernel with ``enable_gqa``.
    """
    B, H, L, hd = q.shape
    G = k.shape[1]
    rep = H // G
    if causal:
        return upcast_attention(q, k, v, is_causal=True, enable_gqa=rep > 1)
    if L <= 16 or mask is not None:
        folded = q.reshape(B, G, rep * L, hd)
        folded_mask = None if mask is None else mask.repeat(1, 1, rep, 1)
        out = upcast_attention(folded, k, v, query_tokens=L, attn_mask=folded_mask)
        return out.view(B, H, L, hd)
    return upcast_attention(q, k, v, enable_gqa=rep > 1)


class MLP(nn.Module):
    def __init__(self, config: GLM4VConfig):
        super().__init__()
        # One projection produces [gate | up]; SwiGLU multiplies silu(gate) with up.
        self.dense_h_to_4h = Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.dense_h_to_4h(x)
        fused = decode_swiglu(gate_up)  # the same roundings in one call, for decode
        if fused is not None:
            return self.dense_4h_to_h(fused)
        gate, up = gate_up.chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(nn.Module):
    def __init__(self, config: GLM4VConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, step: StepContext, layer: int) -> torch.Tensor:
        fused = self._decode_in_one_call(x, step, layer)
        if fused is not None:
            return fused
        x = x + self.self_attention(self.input_layernorm(x), step, layer)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _decode_in_one_call(self, x: torch.Tensor, step: StepContext, layer: int) -> torch.Tensor | None:
        """This layer for a decode step as one kernel call (``glm4v.kernels.decode_block``: the
        same kernels as the modules below call, in their order), or None. Not when a module has
        hooks (they would not run) or is not one of ours (a LoRA wrapper, say)."""
        if step.cache is None or step.first_slot is None or step.mask is not None or step.causal:
            return None
        attention, mlp = self.self_attention, self.mlp
        norms = (self.input_layernorm, self.post_attention_layernorm)
        projections = (attention.query_key_value, attention.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h)
        if _hooked((attention, mlp, *norms, *projections)) or norms[0].eps != norms[1].eps:
            return None
        linears = [getattr(p, "decode_gemv_args", _not_ours)(x) for p in projections]
        cache = step.cache
        return decode_block(x, (norms[0].weight, norms[1].weight), norms[0].eps, linears, step.rope, cache.k[layer],
                            cache.v[layer], step.first_slot, step.key_len, attention.num_heads,
                            attention.num_kv_heads)


def _not_ours(x: torch.Tensor) -> None:
    return None


def _hooked(modules) -> bool:
    """Whether a forward hook would see any of ``modules`` (so they must run as modules)."""
    if getattr(module_globals, "_global_forward_hooks", None) or getattr(module_globals, "_global_forward_pre_hooks", None):
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


class GLMTransformer(nn.Module):
    """The decoder stack (``transformer.encoder`` in the official names)."""

    def __init__(self, config: GLM4VConfig):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)

    def forward(self, x: torch.Tensor, step: StepContext, output_hidden_states: bool = False):
        hidden_states = [x] if output_hidden_states else None
        for i, layer in enumerate(self.layers):
            x = layer(x, step, i)
            if output_hidden_states:
                hidden_states.append(x)
        return self.final_layernorm(x), hidden_states
