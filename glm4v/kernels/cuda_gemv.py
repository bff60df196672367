"""Weight-only int8 / int4 GEMVs for CUDA GPUs (Triton), reading glm4v's own storage layouts.

A decode step multiplies a few token rows by every weight once, so it is as fast as the weights are
streamed. On a GPU torch offers little for that: its CUDA ``_weight_int8pack_mm`` runs one fp32
thread per output, each walking a whole weight row, and its ``_weight_int4pack_mm`` reads only its
own tiled layout (a second copy of every weight, or a repack per call). These two kernels read the
int8 [N, K] codes and the int4 64-row-block layout (``glm4v.quant``) in place, coalesced, and apply
the scales (and int4 zeros) per group after the dot product. Steps of more tokens (prefill, the
vision tower) expand the weight and use cuBLAS instead (``QuantizedLinear._expand_and_matmul``).

Triton ships with CUDA builds of torch; without it (or when the self-check on the first use fails),
``ready()`` is False and quantised layers on a GPU take the expand-and-matmul path. Runs on a CPU
too under ``TRITON_INTERPRET=1``, which is how the tests check the kernels without a GPU.
"""

from __future__ import annotations

import functools
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU builds of torch come without it
    triton = None

# Up to this many token rows a GPU step takes the GEMV (rows are separate programs re-reading the
# weights from L2); above it the expanded weight and a cuBLAS matmul win.
GPU_GEMV_MAX_TOKENS = 8
INT8_BLOCK_N = 16
INT8_BLOCK_K = 256
# Enough programs to keep every multiprocessor streaming (split over K where a layer has few rows).
PROGRAMS_PER_SM = 4


if triton is not None:

    @triton.jit
    def _int8_gemv_kernel(x_ptr, w_ptr, scale_ptr, out_ptr, N, K, stride_xm, stride_om,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        m = tl.program_id(1)
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        row_base = w_ptr + rows.to(tl.int64)[:, None] * K
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            x = tl.load(x_ptr + m * stride_xm + cols, mask=col_ok, other=0.0).to(tl.float32)
            w = tl.load(row_base + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + m * stride_om + rows, acc * scale, mask=row_ok)

    @triton.jit
    def _int4_gemv_kernel(x_ptr, w_ptr, sz_ptr, out_ptr, N, K, stride_xm, stride_os, stride_om,
                          groups_per_split, GROUP: tl.constexpr):
        # One program: one 64-row block (its bytes for input column k are 32 contiguous bytes, low
        # nibbles rows 0-31, high nibbles rows 32-63), a run of groups along K, one token row.
        block = tl.program_id(0)
        split = tl.program_id(1)
        m = tl.program_id(2)
        j = tl.arange(0, 32)
        kk = tl.arange(0, GROUP)
        base = w_ptr + block.to(tl.int64) * K * 32
        rows_lo = block * 64 + j
        rows_hi = rows_lo + 32
        acc_lo = tl.zeros((32,), dtype=tl.float32)
        acc_hi = tl.zeros((32,), dtype=tl.float32)
        first = split * groups_per_split
        last = tl.minimum(first + groups_per_split, K // GROUP)
        for g in range(first, last):
            cols = g * GROUP + kk
            x = tl.load(x_ptr + m * stride_xm + cols).to(tl.float32)
            b = tl.load(base + cols[:, None] * 32 + j[None, :])
            lo = (b & 15).to(tl.float32)
            hi = (b >> 4).to(tl.float32)
            sx = tl.sum(x, axis=0)
            # (q - 8) * scale + zero, summed against x: scale * (sum x*q - 8 sum x) + zero * sum x
            dot_lo = tl.sum(lo * x[:, None], axis=0) - 8.0 * sx
            dot_hi = tl.sum(hi * x[:, None], axis=0) - 8.0 * sx
            sz_lo = sz_ptr + (g * N + rows_lo).to(tl.int64) * 2
            sz_hi = sz_ptr + (g * N + rows_hi).to(tl.int64) * 2
            acc_lo += tl.load(sz_lo).to(tl.float32) * dot_lo + tl.load(sz_lo + 1).to(tl.float32) * sx
            acc_hi += tl.load(sz_hi).to(tl.float32) * dot_hi + tl.load(sz_hi + 1).to(tl.float32) * sx
        out = out_ptr + split * stride_os + m * stride_om
        tl.store(out + rows_lo, acc_lo)
        tl.store(out + rows_hi, acc_hi)


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: a few programs are enough to exercise the split
    return torch.cuda.get_device_properties(device).multi_processor_count


def int8_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ (int8 weight [N, K] * scale [N]).T -> [M, N] in x's dtype."""
    M, K = x.shape
    N = weight.shape[0]
    x = x.contiguous()
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(N, INT8_BLOCK_N), M)
    _int8_gemv_kernel[grid](x, weight, scale, out, N, K, x.stride(0), out.stride(0),
                            BLOCK_N=INT8_BLOCK_N, BLOCK_K=INT8_BLOCK_K, num_warps=4)
    return out


def int4_gemv(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [M, K] @ W.T for the int4 weight ``packed`` [N, K/2] (64-row blocks) with
    ``scales_zeros`` [K/g, N, 2] -> [M, N] in x's dtype."""
    M, K = x.shape
    N = packed.shape[0]
    x = x.contiguous()
    blocks, groups = N // 64, K // group_size
    wanted = max(1, -(-PROGRAMS_PER_SM * _multiprocessors(x.device) // blocks))
    per_split = -(-groups // min(wanted, groups))
    splits = -(-groups // per_split)
    if splits == 1:
        out = torch.empty(M, N, dtype=x.dtype, device=x.device)
        partial = out.view(1, M, N)
    else:
        partial = torch.empty(splits, M, N, dtype=torch.float32, device=x.device)
    _int4_gemv_kernel[(blocks, splits, M)](x, packed, scales_zeros, partial, N, K, x.stride(0), partial.stride(0),
                                           partial.stride(1), per_split, GROUP=group_size, num_warps=4)
    return out if splits == 1 else partial.sum(0).to(x.dtype)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """True when a step of ``x`` on a GPU should take these kernels (few rows, a kernel that passed
    its self-check on this device)."""
    return (0 < x.shape[0] <= GPU_GEMV_MAX_TOKENS and x.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and x.is_cuda and weight.device == x.device and ready(x.device))


@functools.lru_cache(maxsize=None)
def ready(device: torch.device) -> bool:
    """Triton is there and both kernels match a plain computation on ``device`` (checked once)."""
    if triton is None:
        return False
    try:
        return _self_check(device)
    except Exception as e:  # a Triton that cannot compile for this GPU: use the fallback, say why
        warnings.warn(f"glm4v: the GPU int8/int4 GEMVs are off ({type(e).__name__}: {e}); using expand-and-matmul")
        return False


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||; the kernels' bf16 outputs land near 3e-3 (NaN fails any bound)."""
    got, want = got.float(), want.float()
    error = float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want))
    return error if error == error else float("inf")


def _self_check(device: torch.device) -> bool:
    from glm4v.quant import dequantize_int4, quantize_int4, quantize_int8

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(128, 256, generator=gen)
    x = torch.randn(3, 256, generator=gen).to(device=device, dtype=torch.bfloat16)
    codes, scale = quantize_int8(w, torch.bfloat16)
    codes, scale = codes.to(device), scale.to(device)
    want8 = x.float() @ (codes.float() * scale.float()[:, None]).t()
    packed, sz = quantize_int4(w, 64, torch.bfloat16)
    packed, sz = packed.to(device), sz.to(device)
    want4 = x.float() @ dequantize_int4(packed, sz, 64).float().t()
    ok = (relative_error(int8_gemv(x, codes, scale), want8) < 1e-2
          and relative_error(int4_gemv(x, packed, sz, 64), want4) < 1e-2)
    if not ok:
        warnings.warn("glm4v: the GPU int8/int4 GEMVs disagree with a plain matmul here; using expand-and-matmul")
    return ok
