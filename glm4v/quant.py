"""Weight-only int8 / int4 linear layers, and the kernel choice that makes them fast on a CPU.

A decode step multiplies one token (M = 1) by every weight, so its speed is set by how many bytes
the weights take: int8 halves them and int4 quarters them. A prefill or the vision tower multiplies
hundreds or thousands of tokens by each weight; there the time goes into arithmetic, and the fastest
arithmetic on these CPUs is a bf16 matmul (AVX512-BF16 / AMX). So each ``QuantizedLinear`` picks
its kernel by the number of tokens in the step:

* few tokens -> a weight-only kernel (weights read once, never expanded in memory): glm4v's own
  GEMVs (``glm4v/kernels``: AVX-512 + VNNI or AVX2 builds), which read the weights 1.4-2x faster
  than torch's ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu``; torch's where they are
  not built (and on AVX2 torch's int4 kernel does not read our layout at all);
* many tokens -> the weight is expanded to bf16 a slice of output rows at a time, into a reused
  scratch buffer, and multiplied with a plain bf16 matmul (the expansion costs O(N*K) against the
  matmul's O(M*N*K)). Nothing is cached: the model stays at its quantised size.

Formats (all weight-only; activations stay in the model dtype, norms and softmax keep their fp32
math):

* ``int8``: symmetric, one scale per output channel. ``weight`` int8 [N, K], ``weight_scale`` [N].
* ``int4``: asymmetric, one (scale, zero) per ``group_size`` input channels (32, 64, 128 or 256).
  ``weight`` uint8 [N, K/2] holding two 4-bit codes per byte in blocks of 64 output rows: byte
  (k, j) of block b holds row 64b+j (low nibble) and row 64b+j+32 (high nibble) of input column k
  (the layout torch's CPU kernel reads). ``weight_scales_zeros`` [K/g, N, 2]; a code q decodes to
  (q - 8) * scale + zero. A layer whose shape does not fit (N not a multiple of 64, K not a
  multiple of the group) is stored as int8 instead.

The scale (and zero) are rounded to the storage dtype before the codes are computed, so the
rounding of the scale is not added on top of the rounding of the codes.

Pre-quantised checkpoints keep the official layout and tensor names (``...dense_h_to_4h.weight``
is now int8 or uint8, with a ``weight_scale`` or ``weight_scales_zeros`` beside it) and say so in
config.json under ``glm4v_quantization``; ``glm4v.load`` memory-maps them without ever holding a
bf16 copy. ``python -m glm4v.quant SRC DST --format int4`` writes one.
"""

from __future__ import annotations

import argparse
import functools
import json
import struct
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from glm4v.errors import CheckpointError, InputError
from glm4v.kernels import MAX_ROWS as KERNEL_ROWS_PER_CALL
from glm4v.kernels import TORCH_KERNELS_CROSSOVERS, cpu_kernels, gemv_max_tokens, scratch_buffer, upcast_helps

FORMATS = ("bf16", "int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_BLOCK_ROWS = 64
CONFIG_KEY = "glm4v_quantization"

# Largest slice of an expanded weight, in elements (64 MB of bf16): big enough for matmuls near the
# peak and few passes per layer, small enough to stay a fixed, small scratch buffer.
EXPAND_CHUNK_ELEMENTS = 32 * 1024 * 1024


def normalize_format(quantize) -> str:
    """None / "none" / "bf16" -> "bf16"; "int8", "int4" as they are; anything else is an error."""
    if quantize is None or quantize is False:
        return "bf16"
    name = str(quantize).lower()
    if name in ("none", "bf16", "bfloat16", "fp", "float"):
        return "bf16"
    if name not in FORMATS:
        raise InputError(f"unknown quantisation {quantize!r}; use one of int8, int4 or None")
    return name


def check_group_size(group_size) -> int:
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size not in INT4_GROUP_SIZES:
        raise InputError(f"group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}, got {group_size!r}")
    return group_size


# -- quantisation of one weight ------------------------------------------------------------------

# Rows quantised at a time: the fp32 working copy of a [151552, 4096] output layer would be 2.5 GB.
_ROWS_PER_PASS = 2048


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (codes int8 [N, K], scale [N] in ``scale_dtype``)."""
    N = weight.shape[0]
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty(N, dtype=scale_dtype, device=weight.device)
    for start in range(0, N, _ROWS_PER_PASS):
        rows = weight[start : start + _ROWS_PER_PASS].to(torch.float32, copy=True)
        lo, hi = torch.aminmax(rows, dim=1)
        scale = (torch.maximum(-lo, hi) / 127).clamp_(min=1e-12).to(scale_dtype)
        rows.mul_((1 / scale.float())[:, None])
        codes[start : start + len(rows)] = rows.round_().clamp_(-127, 127)
        scales[start : start + len(rows)] = scale
    return codes, scales


def int4_fits(out_features: int, in_features: int, group_size: int) -> bool:
    return out_features % INT4_BLOCK_ROWS == 0 and in_features % group_size == 0


def quantize_int4(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4: (packed uint8 [N, K/2], scales_zeros [K/g, N, 2] in ``scale_dtype``)."""
    N, K = weight.shape
    if not int4_fits(N, K, group_size):
        raise ValueError(f"int4 needs out_features % {INT4_BLOCK_ROWS} == 0 and in_features % {group_size} == 0, got {N}x{K}")
    groups = K // group_size
    packed = torch.empty(N, K // 2, dtype=torch.uint8, device=weight.device)
    scales_zeros = torch.empty(groups, N, 2, dtype=scale_dtype, device=weight.device)
    for start in range(0, N, _ROWS_PER_PASS):  # a multiple of 64: slices keep whole blocks
        rows = weight[start : start + _ROWS_PER_PASS].to(torch.float32, copy=True).view(-1, groups, group_size)
        n = rows.shape[0]
        lo, hi = torch.aminmax(rows, dim=-1)
        scale = ((hi - lo) / 15).clamp_(min=1e-12).to(scale_dtype)
        zero = (lo + 8 * scale.float()).to(scale_dtype)  # code 0 decodes to lo
        inv = 1 / scale.float()
        # code = round((w - zero) / scale + 8) = round(w * inv + offset), in place
        rows.mul_(inv[..., None]).add_((8 - zero.float() * inv)[..., None])
        codes = rows.round_().clamp_(0, 15).to(torch.uint8)
        packed[start : start + n] = pack_int4(codes.view(n, K))
        scales_zeros[:, start : start + n, 0] = scale.t()
        scales_zeros[:, start : start + n, 1] = zero.t()
    return packed, scales_zeros


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [N, K] -> [N, K/2] in the 64-row block layout (see the module docstring)."""
    N, K = codes.shape
    blocks = codes.view(N // INT4_BLOCK_ROWS, INT4_BLOCK_ROWS, K)
    half = INT4_BLOCK_ROWS // 2
    pairs = blocks[:, :half] | (blocks[:, half:] << 4)  # [nb, 32, K]
    return pairs.transpose(1, 2).contiguous().view(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: [N, K/2] -> uint8 codes [N, K]."""
    N, half_k = packed.shape
    K = half_k * 2
    blocks = packed.view(N // INT4_BLOCK_ROWS, K, INT4_BLOCK_ROWS // 2)
    codes = torch.cat([blocks & 15, blocks >> 4], dim=-1)  # [nb, K, 64]
    return codes.transpose(1, 2).reshape(N, K)


def dequantize(layer: "QuantizedLinear") -> torch.Tensor:
    """The weight a quantised layer stands for, [N, K] in its scale dtype (for tests and tooling)."""
    if layer.bits == 8:
        return layer.weight.to(layer.weight_scale.dtype) * layer.weight_scale[:, None]
    return dequantize_int4(layer.weight, layer.weight_scales_zeros, layer.group_size)


def dequantize_int4(packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The [N, K] weight of int4 codes ``packed`` [N, K/2] with ``scales_zeros`` [K/g, N, 2]."""
    N = packed.shape[0]
    codes = unpack_int4(packed).float().view(N, -1, group_size)
    sz = scales_zeros
    scale, zero = sz[..., 0].t().float()[..., None], sz[..., 1].t().float()[..., None]
    return ((codes - 8) * scale + zero).view(N, -1).to(sz.dtype)


# -- kernels -------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def cpu_int4_kernel_ok() -> bool:
    """True when this torch has the CPU int4 kernel and it reads our packed layout.

    The layout is torch's own choice; if a future version changes it we fall back to the
    expand-and-matmul path instead of computing garbage.
    """
    ops = torch.ops.aten
    if not (hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (128, 64), generator=gen, dtype=torch.int32)
        theirs = ops._convert_weight_to_int4pack_for_cpu(codes, 1)
        if not torch.equal(theirs, pack_int4(codes.to(torch.uint8))):
            return False
        x = torch.randn(1, 64, generator=gen).to(torch.bfloat16)
        sz = torch.ones(2, 128, 2, dtype=torch.bfloat16)
        got = ops._weight_int4pack_mm_for_cpu(x, theirs, 32, sz).float()
        want = x.float() @ (codes.float() - 7).t()
        return bool(torch.allclose(got, want, rtol=2e-2, atol=0.5))
    except (RuntimeError, NotImplementedError):
        return False


@functools.lru_cache(maxsize=None)
def cpu_int8_kernel_ok() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


class QuantizedLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` holding an int8 or int4 weight (see the module docstring)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group_size: int | None = None,
                 scale_dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if bits == 4 else None
        if bits == 8:
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("weight_scale", torch.empty(out_features, dtype=scale_dtype, device=device))
        else:
            if not int4_fits(out_features, in_features, group_size):
                raise ValueError(f"int4 with group {group_size} does not fit a {out_features}x{in_features} weight")
            self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer(
                "weight_scales_zeros",
                torch.empty(in_features // group_size, out_features, 2, dtype=scale_dtype, device=device),
            )
        self.bias = nn.Parameter(torch.empty(out_features, dtype=scale_dtype, device=device), requires_grad=False) if bias else None

    @property
    def format(self) -> str:
        return f"int{self.bits}"

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group_size: int = 128, dtype: torch.dtype | None = None):
        """Quantise an existing linear layer (its weight may be a memory-mapped view)."""
        return cls.from_weight(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(),
                               fmt, group_size, dtype or linear.weight.dtype)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, fmt: str, group_size: int,
                    dtype: torch.dtype) -> "QuantizedLinear":
        N, K = weight.shape
        bits = 4 if fmt == "int4" and int4_fits(N, K, group_size) else 8
        with torch.device("meta"):
            layer = cls(K, N, bias is not None, bits, group_size, dtype)
        if bits == 8:
            layer.weight, layer.weight_scale = quantize_int8(weight, dtype)
        else:
            layer.weight, layer.weight_scales_zeros = quantize_int4(weight, group_size, dtype)
        if bias is not None:
            layer.bias = nn.Parameter(bias.to(device=weight.device, dtype=dtype), requires_grad=False)
        return layer

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.format}{group}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A decode step (1-4 tokens on a CPU) goes straight to glm4v's GEMV: the checks below cost
        # ~35 us a call, as much as the kernel itself on a small layer
        if x.device.type == "cpu" and 0 < x.numel() <= KERNEL_ROWS_PER_CALL * self.in_features:
            gemv = self._decode_gemv(x.dtype)
            if gemv is not None:
                out = gemv(x.reshape(-1, self.in_features), self.weight, *self._gemv_scale_args)
                if self.bias is not None:
                    out = out + self.bias.to(out.dtype)
                return out.view(*x.shape[:-1], self.out_features)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        gpu = self._gpu_kernels(x2)
        if gpu is not None:
            out = (gpu.int8_gemv(x2, self.weight, self.weight_scale) if self.bits == 8
                   else gpu.int4_gemv(x2, self.weight, self.weight_scales_zeros, self.group_size))
        elif x2.shape[0] <= self.max_kernel_tokens(x2) and self._kernel_available(x2):
            out = self._kernel(x2)
        else:
            return self._expand_and_matmul(x2).view(*shape[:-1], self.out_features)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*shape[:-1], self.out_features)

    def decode_gemv_args(self, x: torch.Tensor) -> tuple | None:
        """What ``glm4v.kernels.decode_block`` needs of this layer for a decode step of ``x``
        (bits, weight, scales, bias, group), or None where it must run on its own: the same GEMV
        that ``forward`` takes for a decode step."""
        if self.weight.device.type != "cpu" or self._decode_gemv(x.dtype) is None:
            return None
        if self.bias is not None and self.bias.dtype != x.dtype:
            return None
        return self.bits, self.weight, self._scales, self.bias, self.group_size or 0

    def max_kernel_tokens(self, x: torch.Tensor) -> int:
        """Up to how many token rows a step of ``x`` goes through the weight-only kernel, above it
        the matmul on the expanded weight (``glm4v.kernels.GEMV_MAX_TOKENS``; a GPU step's limit
        is ``cuda_gemv.GPU_GEMV_MAX_TOKENS``)."""
        return gemv_max_tokens(self.format, None if self._own_kernel(x) is not None else TORCH_KERNELS_CROSSOVERS)

    def _gpu_kernels(self, x: torch.Tensor):
        """glm4v.kernels.cuda_gemv when a step of ``x`` takes it (imported on a GPU only: Triton
        loads slowly), else None."""
        if not x.is_cuda:
            return None
        from glm4v.kernels import cuda_gemv

        return cuda_gemv if cuda_gemv.applies(x, self.weight) else None

    def _kernel_available(self, x: torch.Tensor) -> bool:
        if x.device.type != "cpu" or self.weight.device.type != "cpu":
            return False
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return False
        if self._own_kernel(x) is not None:
            return True
        return cpu_int8_kernel_ok() if self.bits == 8 else cpu_int4_kernel_ok()

    @property
    def _scales(self) -> torch.Tensor:
        """int8: the per-row scales [N]; int4: the per-group scales and zeros [K/g, N, 2]."""
        return self.weight_scale if self.bits == 8 else self.weight_scales_zeros

    def _own_kernel(self, x: torch.Tensor):
        """glm4v's GEMV for this layer (glm4v/kernels, the build for this CPU), or None.

        torch's int8 and int4 kernels stream the weights at 35-75 % of the memory bandwidth on the
        CPUs measured, and on AVX2 its int4 kernel does not read our layout (docs/PERFORMANCE.md).
        """
        scales = self._scales
        if (x.dtype not in (torch.bfloat16, torch.float32) or scales.dtype not in (torch.bfloat16, torch.float32)
                or not (self.weight.is_contiguous() and scales.is_contiguous())):
            return None
        module = cpu_kernels()
        return getattr(module, "int8_gemv" if self.bits == 8 else "int4_gemv", None)

    def _decode_gemv(self, dtype: torch.dtype):
        """glm4v's GEMV for activations of ``dtype``, or None: resolved once per dtype and weight
        storage (a moved or replaced weight resolves again)."""
        scales = self._scales
        key = (dtype, self.weight.data_ptr(), scales.data_ptr(), scales.dtype)
        cache = self.__dict__.setdefault("_decode_gemvs", {})
        if key not in cache:
            cache.clear()
            cache[key] = self._own_kernel(torch.empty(0, dtype=dtype)) if self.weight.device.type == "cpu" else None
        return cache[key]

    @property
    def _gemv_scale_args(self) -> tuple:
        return (self.weight_scale,) if self.bits == 8 else (self.weight_scales_zeros, self.group_size)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        own = self._own_kernel(x)
        if own is not None:
            extra = () if self.bits == 8 else (self.group_size,)
            pieces = [own(x[i : i + KERNEL_ROWS_PER_CALL], self.weight, self._scales, *extra)
                      for i in range(0, x.shape[0], KERNEL_ROWS_PER_CALL)]
            return pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        if self.bits == 8:
            return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.weight_scale.to(x.dtype))
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size,
                                                          self.weight_scales_zeros.to(x.dtype))

    def _expand_and_matmul(self, x: torch.Tensor) -> torch.Tensor:
        N, K = self.out_features, self.in_features
        out_dtype = x.dtype
        # bf16 activations on a CPU that emulates bf16: expand the weight to float32 instead
        dtype = torch.float32 if upcast_helps(x) else x.dtype
        x = x.to(dtype)
        rows = max(INT4_BLOCK_ROWS, (EXPAND_CHUNK_ELEMENTS // K) // INT4_BLOCK_ROWS * INT4_BLOCK_ROWS)
        buf = scratch_buffer(min(rows, N) * K, dtype, x.device)
        bias = None if self.bias is None else self.bias.to(dtype)
        pieces = []
        for start in range(0, N, rows):
            stop = min(N, start + rows)
            n = stop - start
            if self.bits == 8:
                # int8 codes are exact in bf16; the per-row scale is applied to the product.
                w = buf[: n * K].view(n, K)
                w.copy_(self.weight[start:stop])
                pieces.append(F.linear(x, w))
            else:
                wt = self._expand_int4_transposed(start, stop, buf[: n * K].view(K, n), dtype)
                # the bias goes in with the product (addmm), not as a pass over the output: a
                # separate add into new memory was 29 ms of a 6,401 x 15,360 product's 173
                pieces.append(x @ wt if bias is None else torch.addmm(bias[start:stop], x, wt))
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        if self.bits == 8:
            scale = self.weight_scale.to(dtype)
            if bias is None:
                out = out.mul_(scale)
            elif torch.is_grad_enabled() and out.requires_grad:  # autograd takes no out=
                out = torch.addcmul(bias, out, scale)
            else:  # scale and bias in one pass over the output, in place
                out = torch.addcmul(bias, out, scale, out=out)
        return out.to(out_dtype)

    def _expand_int4_transposed(self, start: int, stop: int, out_kn: torch.Tensor, dtype) -> torch.Tensor:
        """Decode rows [start, stop) into ``out_kn`` as W^T [K, n].

        The packed layout keeps, per 64-row block, each input column's 32 bytes together. The bytes
        are first regrouped column-major ([K, blocks, 32], a cheap byte shuffle), the nibbles split
        and widened into W^T, and the scales applied over whole rows of W^T: torch's elementwise
        kernels are fast on long contiguous runs and slow on short ones, and this order keeps every
        pass long (~3x faster than scaling in the block layout). The AVX-512 build's ``int4_expand_t``
        computes the same numbers ~3.5x faster still (one pass, no scratch; docs/PERFORMANCE.md).
        """
        K, g = self.in_features, self.group_size
        n = stop - start
        expand = getattr(cpu_kernels(), "int4_expand_t", None) if out_kn.device.type == "cpu" else None
        floats = (torch.bfloat16, torch.float32)
        if (expand is not None and dtype in floats and self.weight_scales_zeros.dtype in floats
                and self.weight.is_contiguous()):
            expand(self.weight, self.weight_scales_zeros.contiguous(), g, start, stop, out_kn)
            return out_kn
        nb, groups, half = n // INT4_BLOCK_ROWS, K // g, INT4_BLOCK_ROWS // 2
        device = out_kn.device
        by_column = scratch_buffer(K * nb * half, torch.uint8, device, "by_column").view(K, nb, half)
        low = scratch_buffer(K * nb * half, torch.uint8, device, "low").view(K, nb, half)
        by_column.copy_(self.weight[start:stop].view(nb, K, half).transpose(0, 1))
        torch.bitwise_and(by_column, 15, out=low)
        by_column.bitwise_right_shift_(4)
        widened = out_kn.view(K, nb, 2, half)
        widened[:, :, 0].copy_(low)
        widened[:, :, 1].copy_(by_column)
        sz = self.weight_scales_zeros[:, start:stop]  # [G, n, 2]
        scale = sz[..., 0].to(dtype).contiguous().unsqueeze(1)  # [G, 1, n]; contiguous: a strided operand slows addcmul 2x
        shift = (sz[..., 1].float() - 8 * sz[..., 0].float()).to(dtype).unsqueeze(1)
        rows = out_kn.view(groups, g, n)
        torch.addcmul(shift, rows, scale, out=rows)
        return out_kn


# -- whole models --------------------------------------------------------------------------------


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the linear layers to quantise: every nn.Linear of both towers and the output layer.

    (The embedding table is a lookup, not a matmul, and the two convolutions are small; they keep
    the model dtype.)
    """
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def plan_layers(model: nn.Module, fmt: str, group_size: int = 128) -> dict[str, str]:
    """{linear name: "int8" | "int4"} for ``fmt``; int4 layers whose shape does not fit become int8."""
    fmt = normalize_format(fmt)
    if fmt == "bf16":
        return {}
    if fmt == "int4":
        check_group_size(group_size)
    plan = {}
    for name in quantizable_linears(model):
        m = model.get_submodule(name)
        plan[name] = "int4" if fmt == "int4" and int4_fits(m.out_features, m.in_features, group_size) else "int8"
    return plan


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, module)


def quantize_model(model: nn.Module, fmt: str, group_size: int = 128) -> dict[str, str]:
    """Replace the linear layers of a loaded model by quantised ones, in place; returns the plan."""
    plan = plan_layers(model, fmt, group_size)
    for name, layer_fmt in plan.items():
        linear = model.get_submodule(name)
        _set_module(model, name, QuantizedLinear.from_linear(linear, layer_fmt, group_size))
    return plan


def install_empty(model: nn.Module, plan: dict[str, str], group_size: int, dtype: torch.dtype) -> None:
    """Swap the planned linears of a model built on ``meta`` for empty quantised ones, so that a
    pre-quantised checkpoint loads into them by name."""
    for name, layer_fmt in plan.items():
        linear = model.get_submodule(name)
        bits = 4 if layer_fmt == "int4" else 8
        with torch.device("meta"):
            layer = QuantizedLinear(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size, dtype)
        _set_module(model, name, layer)


class QuantizeOnLoad:
    """``load_weights`` hook: quantises each planned linear's weight as it streams in from the
    memory-mapped bf16 checkpoint (the source pages are released right after), then ``finish``
    swaps the quantised layers in. Peak memory is the quantised model plus one row slice."""

    def __init__(self, plan: dict[str, str], group_size: int, dtype: torch.dtype, device: torch.device):
        self.plan, self.group_size, self.dtype, self.device = plan, group_size, dtype, torch.device(device)
        self.weights: dict[str, QuantizedLinear] = {}

    def __call__(self, name: str, tensor: torch.Tensor, module: nn.Module, attr: str) -> bool:
        module_name = name.rpartition(".")[0]
        if attr != "weight" or module_name not in self.plan:
            return False
        if not tensor.is_floating_point():
            raise CheckpointError(f"'{name}' is already quantised ({tensor.dtype}); load it without quantize=")
        source = tensor if self.device.type == "cpu" else tensor.to(self.device)
        self.weights[module_name] = QuantizedLinear.from_weight(source, None, self.plan[module_name], self.group_size, self.dtype)
        return True

    def finish(self, model: nn.Module) -> None:
        for module_name, layer in self.weights.items():
            linear = model.get_submodule(module_name)
            if linear.bias is not None:
                layer.bias = linear.bias
            _set_module(model, module_name, layer)
        missing = set(self.plan) - set(self.weights)
        if missing:
            raise CheckpointError(f"{len(missing)} planned layer(s) were not quantised, e.g. {sorted(missing)[:3]}")


def read_checkpoint_quantization(config_extra: dict) -> dict | None:
    """The ``glm4v_quantization`` block of a config (None for an ordinary checkpoint), validated."""
    block = config_extra.get(CONFIG_KEY)
    if block is None:
        return None
    if not isinstance(block, dict) or block.get("format") not in ("int8", "int4") or not isinstance(block.get("layers"), dict):
        raise CheckpointError(f"config.json: malformed '{CONFIG_KEY}' block (expected format int8|int4 and a layers map)")
    if block["format"] == "int4":
        check_group_size(block.get("group_size"))
    if any(v not in ("int8", "int4") for v in block["layers"].values()):
        raise CheckpointError(f"config.json: '{CONFIG_KEY}.layers' values must be int8 or int4")
    return block


def prepare_load(model: nn.Module, config, quantize, group_size: int, dtype: torch.dtype,
                 device: torch.device) -> "QuantizeOnLoad | AlignOnLoad | None":
    """Get a model built on ``meta`` ready for ``load_weights``; used by ``glm4v.load``.

    A pre-quantised checkpoint (config.json says so) gets empty quantised layers that its tensors
    load into directly; ``quantize="int8"|"int4"`` on an ordinary checkpoint returns the hook that
    quantises while streaming. Returns the hook for ``load_weights`` (with a ``finish(model)`` to
    call afterwards), or None when there is nothing to hook.
    """
    fmt = normalize_format(quantize)
    stored = read_checkpoint_quantization(config.extra)
    if stored is not None:
        if fmt not in ("bf16", stored["format"]) or (fmt == "int4" and group_size != stored["group_size"]
                                                      and group_size != 128):
            raise InputError(
                f"this checkpoint is already quantised to {stored['format']}"
                + (f" (group size {stored['group_size']})" if stored["format"] == "int4" else "")
                + f"; load it with quantize=None or quantize='{stored['format']}'"
            )
        known = set(quantizable_linears(model))
        unknown = [n for n in stored["layers"] if n not in known]
        if unknown:
            raise CheckpointError(f"config.json: '{CONFIG_KEY}' names layers the model does not have, e.g. {unknown[:3]}")
        install_empty(model, stored["layers"], stored["group_size"], dtype)
        return AlignOnLoad(device)
    if fmt == "bf16":
        return None
    return QuantizeOnLoad(plan_layers(model, fmt, group_size), group_size, dtype, device)


def quantization_block(model: nn.Module) -> dict | None:
    layers = {name: m.format for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        return None
    groups = {m.group_size for m in model.modules() if isinstance(m, QuantizedLinear) and m.bits == 4}
    fmt = "int4" if groups else "int8"
    return {"format": fmt, "group_size": groups.pop() if groups else None, "layers": layers}


def model_nbytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer (the resident size of the weights)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_meta or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


# Address alignment the weight-only kernels need: torch's int8 kernel crashes on an int8 weight
# that is not 16-byte aligned once a step has 4+ tokens; 64 covers every SIMD width.
ALIGNMENT = 64


def save_quantized(pipe, folder: str | Path, max_shard_bytes: int = 2 << 30) -> None:
    """Write a loaded (quantised) pipeline as a checkpoint folder in the official layout.

    The shards are ordinary safetensors files, written tensor by tensor (never a whole shard in
    memory) and laid out so that every quantised weight starts 64-byte aligned: a memory-mapped
    load can then use them in place.
    """
    from glm4v.weights import atomic_folder, copy_files

    model = pipe.model
    block = quantization_block(model)
    if block is None:
        raise InputError("the model is not quantised; load it with quantize='int8' or 'int4' first")
    config = model.config.to_dict()
    config[CONFIG_KEY] = block
    tensors = dict(model.state_dict())
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    with atomic_folder(folder) as tmp:
        weight_map, total = {}, 0
        for shard_name, shard in zip(names, shards):
            total += write_aligned_safetensors(tmp / shard_name, shard)
            weight_map.update({k: shard_name for k in shard})
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if pipe.path is not None:
            copy_files(["tokenizer.model", "tokenizer_config.json", "generation_config.json",
                        "special_tokens_map.json", "tokenization_chatglm.py"], Path(pipe.path), tmp)


def write_aligned_safetensors(path: Path, tensors: dict[str, torch.Tensor]) -> int:
    """A safetensors file whose data starts 64-byte aligned, tensors whose size is a multiple of
    64 bytes first (so each of them starts aligned too). Returns the data bytes written."""
    from glm4v.weights import _DTYPE_NAMES

    order = sorted(tensors, key=lambda n: (tensors[n].numel() * tensors[n].element_size()) % ALIGNMENT != 0)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGNMENT)  # spaces are valid JSON padding
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            t = tensors[name].detach().contiguous().cpu()
            if t.numel():
                f.write(t.view(-1).view(torch.uint8).numpy().data)
    return offset


class AlignOnLoad:
    """``load_weights`` hook for pre-quantised checkpoints written elsewhere: on the CPU, a
    quantised weight that is not 64-byte aligned in the memory map is copied (and its mapped pages
    released)."""

    def __init__(self, device):
        self.cpu = torch.device(device).type == "cpu"

    def __call__(self, name: str, tensor: torch.Tensor, module: nn.Module, attr: str) -> bool:
        if not self.cpu or not isinstance(module, QuantizedLinear) or attr != "weight" or tensor.data_ptr() % ALIGNMENT == 0:
            return False
        setattr(module, attr, tensor.clone())  # torch's CPU allocator aligns to 64 bytes
        return True

    def finish(self, model: nn.Module) -> None:
        pass


def quantize_checkpoint(source, target, fmt: str = "int8", group_size: int = 128, progress: bool = True) -> None:
    """Quantise a bf16 checkpoint folder into a new folder, streaming (never the whole bf16 model)."""
    import glm4v

    pipe = glm4v.load(source, dtype="bfloat16", quantize=fmt, group_size=group_size, progress=progress)
    save_quantized(pipe, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm4v.quant",
                                     description="write a pre-quantised (int8/int4) copy of a GLM-4V checkpoint")
    parser.add_argument("source", help="model folder (official layout, bf16 or fp32 weights)")
    parser.add_argument("target", help="folder to write (replaced atomically)")
    parser.add_argument("--format", choices=("int8", "int4"), default="int8")
    parser.add_argument("--group-size", type=int, default=128, choices=INT4_GROUP_SIZES, help="int4 group size")
    args = parser.parse_args(argv)
    from glm4v.errors import Glm4vError

    try:
        quantize_checkpoint(args.source, args.target, args.format, args.group_size)
    except Glm4vError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
