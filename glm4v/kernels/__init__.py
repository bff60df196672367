"""Optional C++ kernels for CPU decoding, compiled on first use.

Two builds, picked by the CPU: ``cpu_gemv.cpp`` for AVX512-BF16 + VNNI CPUs and ``cpu_gemv_avx2.cpp``
for AVX2 + FMA CPUs without bf16 units. Each has bf16, int8 and int4 GEMVs for 1-4 token rows:
torch's own decode kernels stream the weights at 35-75 % of the memory bandwidth on these CPUs, and
on AVX2 torch has no int4 kernel for our layout at all (docs/PERFORMANCE.md). Both also have a
decode-step attention over the KV cache (the AVX-512 build's with AMX tiles where the CPU has AMX:
Sapphire Rapids and later, ``GLM4V_NO_AMX=1`` declines them; otherwise, and in the AVX2 build, in
fp32 FMA with the query rows in the lanes, ``cpu_lane_attention.h``): SDPA reads a cache that the
step's weights pushed out of the CPU caches at a fraction of the bandwidth. A decode step's whole
decoder layer runs as one call of these kernels (``decode_block``). ``cpu_common.h`` holds the
rest of what both builds share. The AVX-512 build, where the CPU has AMX, also runs the vision
tower's attention (``vision_attention``: flash attention whose softmax overlaps the tile products;
SDPA elsewhere).

glm4v runs without them: when the CPU has neither, no compiler or ninja is found, the build fails,
or ``GLM4V_NO_KERNELS=1`` is set, ``cpu_kernels()`` returns None and callers use torch's own
kernels. A build takes ~30-60 s once and is cached per source, flags and torch version under
``$GLM4V_KERNEL_CACHE`` (default ``~/.cache/glm4v/kernels``). Every build is checked against
torch on random data before it is used. Builds into one folder take turns under an flock, which a
killed build cannot leave held (torch's own lock file it can: ``_build_lock``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

# kernel set -> (source, compiler flags)
BUILDS = {
    "avx512bf16": (Path(__file__).with_name("cpu_gemv.cpp"),
                   ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni",
                    "-mavx512vbmi", "-fopenmp"]),
    "avx2": (Path(__file__).with_name("cpu_gemv_avx2.cpp"), ["-O3", "-mavx2", "-mfma", "-fopenmp"]),
}
# Above this many token rows a decode kernel loses to torch's matmul (and the kernel takes 4 at most).
MAX_ROWS = 4


# On a CPU without bf16 units (AVX2-only, or AVX-512 without BF16) torch emulates bf16 matmuls at
# ~1/8 of its float32 speed; measured on an AVX2 EPYC, one thread, [M,1024]x[1024,2048]: M=512 409 ms
# in bf16 vs 56 ms converting both to float32 first, M=64 41 vs 11 ms, M=16 (1024 wide) 4.6 vs 2.2 ms,
# M=1 0.34 vs 0.55 ms. So from this many token rows on (prefill, the vision tower) products of bf16
# weights run in float32; below it (decode) reading the half-size bf16 weight wins.
UPCAST_MIN_ROWS = 8


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_has_avx512_bf16() -> bool:
    flags = _cpu_flags()
    return " avx512_bf16" in flags and " avx512bw" in flags


def kernel_set() -> str | None:
    """Which build of the decode kernels suits this CPU (a key of ``BUILDS``), or None."""
    # VNNI came with every AVX512-BF16 CPU; VBMI (the int4 loop's byte gather) did not come with
    # Cooper Lake, which takes the AVX2 build
    if cpu_has_avx512_bf16() and " avx512_vnni" in _cpu_flags() and " avx512vbmi" in _cpu_flags():
        return "avx512bf16"
    flags = _cpu_flags()
    return "avx2" if " avx2" in flags and " fma" in flags else None


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX); otherwise torch emulates it."""
    return cpu_has_avx512_bf16() or " amx_bf16" in _cpu_flags()


def bf16_is_emulated(x: torch.Tensor) -> bool:
    """Whether products with the bf16 CPU tensor ``x`` would run on torch's bf16 emulation."""
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and not cpu_has_native_bf16()


def _outside_autograd(*tensors: torch.Tensor) -> bool:
    # under autograd a float32 copy of each operand would stay alive for backward
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def upcast_helps(x: torch.Tensor) -> bool:
    """Whether a bf16 product with ``x`` (token rows x features) is faster in float32 here."""
    return (bf16_is_emulated(x) and x.dim() > 0 and x.shape[-1] > 0
            and x.numel() // x.shape[-1] >= UPCAST_MIN_ROWS)


# Float32 slice of a bf16 weight that upcast_linear expands at a time (128 MB, at least 256 rows).
# On a Zen 3 EPYC, slices of 1-32 M elements ran within noise of a product with the whole float32
# weight at 300 and 1,600 token rows, but at 6,401 (the vision tower) 8 M-element slices took up
# to 2x as long as 32 M ones: each slice's output is fresh memory there.
UPCAST_CHUNK_ELEMENTS = 32 * 1024 * 1024
UPCAST_MIN_SLICE_ROWS = 256

_scratch = threading.local()


def scratch_buffer(numel: int, dtype: torch.dtype, device: torch.device, slot: str = "weight") -> torch.Tensor:
    """A reused per-thread buffer for expanded weight slices: a fresh allocation per call costs page
    faults (expanding into new memory is ~5x slower than into warm memory)."""
    key = (slot, dtype, device)
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel:
        # an ordinary tensor (not an inference tensor), so that it can be written in and out of
        # inference mode alike
        with torch.inference_mode(False):
            buf = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ weight.T (+ bias) computed in float32 and returned in bf16, or None when that is not faster.

    The weight is widened a slice of rows at a time into a reused buffer: ``weight.float()`` into
    fresh memory cost 0.25 s for a 27392x4096 weight on a Zen 3 EPYC, a third of its product with
    300 token rows. Not under autograd: backward would keep a float32 copy of every weight alive.
    """
    if weight.dtype != torch.bfloat16 or not upcast_helps(x) or not _outside_autograd(x, weight):
        return None
    N, K = weight.shape
    xf = x.float()
    rows = min(N, max(UPCAST_MIN_SLICE_ROWS, UPCAST_CHUNK_ELEMENTS // K))
    buf = scratch_buffer(rows * K, torch.float32, x.device, "upcast")
    out = None
    for start in range(0, N, rows):
        stop = min(N, start + rows)
        w = buf[: (stop - start) * K].view(stop - start, K)
        w.copy_(weight[start:stop])
        part = F.linear(xf, w, None if bias is None else bias[start:stop].float())
        if stop - start == N:
            return part.to(torch.bfloat16)
        if out is None:
            out = torch.empty(*x.shape[:-1], N, dtype=torch.bfloat16, device=x.device)
        out[..., start:stop] = part
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias) on the fastest path here: the decode GEMV, float32 where bf16 is
    emulated, else ``F.linear``."""
    out = bf16_linear(x, weight, bias)
    if out is None:
        out = upcast_linear(x, weight, bias)
    return F.linear(x, weight, bias) if out is None else out


def upcast_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stride) -> torch.Tensor | None:
    """The vision tower's patch and 2x2 convolutions (unpadded) like ``upcast_linear``: float32 or None."""
    if weight.dtype != torch.bfloat16 or not bf16_is_emulated(x) or not _outside_autograd(x, weight):
        return None
    out = F.conv2d(x.float(), weight.float(), None if bias is None else bias.float(), stride)
    return out.to(torch.bfloat16)


def upcast_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, query_tokens: int | None = None,
                     **kwargs) -> torch.Tensor:
    """SDPA in float32 when bf16 would be emulated and the query is long enough; else as given.

    ``query_tokens`` (default: q's length) counts the step's tokens when q is folded (grouped
    heads as extra rows). Decode (a few tokens against a long cache) stays in bf16: converting the
    cache every step would cost more than the product.
    """
    tokens = q.shape[-2] if query_tokens is None else query_tokens
    if tokens < UPCAST_MIN_ROWS or not bf16_is_emulated(q) or not _outside_autograd(q):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    mask = kwargs.get("attn_mask")
    if mask is not None and mask.dtype != torch.bool:
        kwargs["attn_mask"] = mask.float()
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs).to(q.dtype)


def runnable_kernel_sets() -> list[str]:
    """Every build this CPU can run, the one ``kernel_set()`` picks first (an AVX-512 CPU runs the AVX2 build too)."""
    flags = _cpu_flags()
    runnable = [kernel_set()] if kernel_set() == "avx512bf16" else []
    if " avx2" in flags and " fma" in flags:
        runnable.append("avx2")
    return runnable


@contextlib.contextmanager
def _build_lock(cache: Path):
    """Hold an flock on ``cache/glm4v.lock`` while torch builds or loads into ``cache``.

    torch's own lock is a file that ``load`` creates and deletes (its FileBaton): a process killed
    between the two leaves it behind, and every later ``load`` into that folder waits for it forever.
    An flock is released by the kernel when its holder dies, and every glm4v build takes it first, so
    a torch lock file found while holding it belongs to no live build and is removed.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: no flock, torch's lock alone
        yield
        return
    with open(cache / "glm4v.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        try:
            stale = cache / "lock"
            if stale.exists():
                warnings.warn(f"glm4v: removing {stale}, left by a kernel build that was killed", stacklevel=3)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


@functools.lru_cache(maxsize=None)
def build(chosen: str):
    """Compile (or find in the cache) the kernel set ``chosen``, check it against torch, return the module.

    Raises when it cannot be built or fails its check; ``cpu_kernels()`` is the forgiving entry.
    """
    source, flags = BUILDS[chosen]
    from torch.utils.cpp_extension import load

    # the shared headers are part of every build: a change to one must rebuild both
    code = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))
    digest = hashlib.sha256(code + " ".join(flags).encode() + torch.__version__.encode()).hexdigest()[:16]
    cache = Path(os.environ.get("GLM4V_KERNEL_CACHE", Path.home() / ".cache" / "glm4v" / "kernels")) / digest
    cache.mkdir(parents=True, exist_ok=True)
    with _build_lock(cache):
        module = load(name=f"glm4v_cpu_{digest}", sources=[str(source)], extra_cflags=flags,
                      extra_ldflags=["-fopenmp"], build_directory=str(cache), verbose=False)
    _self_check(module)
    module.kernel_set = chosen
    return module


@functools.lru_cache(maxsize=None)
def cpu_kernels():
    """The compiled kernel module for this CPU, or None when it cannot be used here (see the module docstring)."""
    chosen = kernel_set()
    if os.environ.get("GLM4V_NO_KERNELS", "") not in ("", "0") or chosen is None:
        return None
    try:
        return build(chosen)
    except Exception as e:  # a missing compiler, ninja or header must never break glm4v
        warnings.warn(f"glm4v: CPU decode kernels unavailable, using torch's ({type(e).__name__}: {e})", stacklevel=2)
        return None


def _self_check(module) -> None:
    gen = torch.Generator().manual_seed(0)

    def check(got, want, what):
        if not torch.allclose(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item()):
            raise RuntimeError(f"self-check of {what} against torch failed")

    for rows, n, k in ((1, 67, 200), (4, 64, 4096)):
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
        check(module.bf16_gemv(x, w), x.float() @ w.float().t(), "bf16_gemv")
    if hasattr(module, "int8_gemv"):
        x = torch.randn(3, 200, generator=gen)
        codes = torch.randint(-127, 128, (67, 200), generator=gen, dtype=torch.int8)
        scale = torch.rand(67, generator=gen)
        check(module.int8_gemv(x, codes, scale), x @ (codes.float() * scale[:, None]).t(), "int8_gemv")
    if hasattr(module, "int4_gemv"):
        from glm4v.quant import pack_int4

        x = torch.randn(2, 256, generator=gen)
        codes = torch.randint(0, 16, (128, 256), generator=gen, dtype=torch.uint8)
        sz = torch.rand(256 // 64, 128, 2, generator=gen)
        weight = ((codes.float().view(128, 4, 64) - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]).view(128, 256)
        check(module.int4_gemv(x, pack_int4(codes), sz, 64), x @ weight.t(), "int4_gemv")


def _decode_op(name: str, tokens: int, *tensors: torch.Tensor):
    """The kernel module's ``name`` for a decode step (1 to ``MAX_ROWS`` tokens) on bf16 CPU
    tensors outside autograd, or None where it does not apply or is not built."""
    if not 0 < tokens <= MAX_ROWS or not _outside_autograd(*tensors):
        return None
    # a plain loop and ``is_cpu``: this runs ~10 times a layer in every decode step, and a generator
    # with ``t.device`` objects cost ~6 us a call, 5-10 % of a tiny model's step
    for t in tensors:
        if t.dtype is not torch.bfloat16 or not t.is_cpu:
            return None
    module = cpu_kernels()
    return None if module is None else getattr(module, name, None)


def _tokens(x: torch.Tensor) -> int:
    """Rows of ``x`` along its last dimension (0 for an empty or 0-d tensor)."""
    return x.numel() // x.shape[-1] if x.dim() > 0 and x.shape[-1] > 0 else 0


def decode_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm of a decode step's rows (bf16, at most ``MAX_ROWS``) in one kernel call, or None.

    Computed as ``glm4v.model.language.RMSNorm`` does (fp32 mean square, fp32 product with the
    weight, one rounding to bf16); only the summation order differs. Worth it because the eight
    torch ops of a norm each cost 10-70 us of dispatch on 4,096 numbers with two threads.
    """
    op = _decode_op("rms_norm", _tokens(x), x, weight)
    return None if op is None else op(x, weight, eps)


def decode_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor | None:
    """``glm4v.model.language.apply_rope`` for a decode step's heads (bf16, at most ``MAX_ROWS``
    tokens) in one kernel call, bit for bit the same; or None."""
    if x.dim() != 4 or rope.dim() != 4 or x.numel() == 0:
        return None
    op = _decode_op("rope", x.shape[2], x, rope)
    return None if op is None else op(x, rope)


def decode_rope_into_cache(qkv: torch.Tensor, rope: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                           slot: int, heads: int, groups: int) -> torch.Tensor | None:
    """A decode step's attention input in one kernel call, or None: from the projection's
    ``qkv`` [B, L, (H + 2G) * D], the rotated query heads [B, H, L, D], with the rotated keys and
    the values written into cache slots ``slot`` .. ``slot + L - 1`` of one layer's ``cache_k``,
    ``cache_v`` [B, G, slots, D]. Bit for bit what ``apply_rope`` and the cache writes give."""
    if qkv.dim() != 3 or rope.dim() != 4 or cache_k.dim() != 4:
        return None
    op = _decode_op("rope_into_cache", qkv.shape[1], qkv, rope, cache_k, cache_v)
    return None if op is None else op(qkv, rope, cache_k, cache_v, slot, heads, groups)


def decode_swiglu(h: torch.Tensor) -> torch.Tensor | None:
    """``silu(gate) * up`` of a decode step's ``[gate | up]`` rows (bf16, at most ``MAX_ROWS``) in one
    kernel call, with the same two bf16 roundings as torch's ops; or None."""
    if h.dim() == 0 or h.shape[-1] % 2:
        return None
    op = _decode_op("swiglu", _tokens(h), h)
    return None if op is None else op(h)


# Up to how many token rows a product goes through glm4v's GEMVs (MAX_ROWS rows a pass), per build
# and weight format; above, the alternative wins: for int8/int4 a matmul on the expanded weight, for
# bf16 the plain product. The GEMVs' time grows about linearly with the rows, the expansion is a
# fixed cost per weight (int8 ~0.15-0.4 ns a weight, int4 ~0.5-1 ns, so int4's GEMV stays ahead
# longer). docs/PERFORMANCE.md has the measurements.
#   avx512bf16: a 2-core AVX-512/AMX Xeon, 4096x27392 and 13696x4096, the alternative a bf16 matmul
#     on AMX. These crossovers also hold for torch's own int8/int4 kernels where glm4v's are not built.
#   avx2: a 2-core Zen 3 EPYC, where the alternative is a float32 product after widening the weight:
#     bf16 27392x4096 at 48 rows 99 vs 156 ms, at 128 even (350 vs 352), 4096x13696 at 16 rows 21 vs
#     53, at 64 even; int8 27392x4096 at 128 rows 207 vs 347 ms, int4 205 vs 443, at 512 rows still
#     711 vs 860 and 713 vs 935; 4096x13696 at 256 rows int8 199 vs 204. 128 leaves a margin for
#     CPUs not measured.
GEMV_MAX_TOKENS = {
    "avx512bf16": {"bf16": MAX_ROWS, "int8": 12, "int4": 32},
    "avx2": {"bf16": 48, "int8": 128, "int4": 128},
}
TORCH_KERNELS_CROSSOVERS = "avx512bf16"


def gemv_max_tokens(fmt: str, kernel_set: str | None = None) -> int:
    """Up to how many token rows a ``fmt`` product takes the GEMV of build ``kernel_set`` (default:
    this CPU's; torch's own kernels, where glm4v's are not built, take the AVX-512 crossovers)."""
    chosen = kernel_set or getattr(cpu_kernels(), "kernel_set", None) or TORCH_KERNELS_CROSSOVERS
    return GEMV_MAX_TOKENS[chosen][fmt]


def bf16_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """x @ weight.T (+ bias) with the decode kernel, or None when the kernel does not apply.

    Up to MAX_ROWS rows in one call, up to ``gemv_max_tokens("bf16")`` in passes of MAX_ROWS (the
    AVX2 build, where bf16 is emulated and the alternative is a float32 product).
    """
    rows = _tokens(x)
    passes = MAX_ROWS < rows <= gemv_max_tokens("bf16")
    op = _decode_op("bf16_gemv", MAX_ROWS if passes else rows, x, weight) if weight.is_contiguous() else None
    if op is None:
        return None
    x2 = x.reshape(rows, x.shape[-1])
    out = torch.cat([op(x2[i : i + MAX_ROWS], weight) for i in range(0, rows, MAX_ROWS)]) if passes else op(x2, weight)
    if bias is not None:
        out = out + bias
    return out.view(*x.shape[:-1], weight.shape[0])


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """``softmax(q k^T / sqrt(D)) v`` of a decode step's query heads ``q`` [B, H, L, D] (L at most
    ``MAX_ROWS``, no mask) against the cache's grouped keys and values [B, G, T, D] (rows of D
    contiguous, as cache views are), as [B, L, H * D] bf16 in one kernel call; or None. The AVX2
    build computes it in fp32, the AVX-512 build with AMX tiles where the CPU has them. SDPA's
    flash kernel reads a cache that the weights pushed out of the CPU caches at a fraction of the
    memory bandwidth (docs/PERFORMANCE.md)."""
    if q.dim() != 4 or q.shape[-1] % 32 or q.stride(-1) != 1:
        return None
    op = _attention_op("decode_attention", q.shape[2], k, v, q)
    return None if op is None else op(q, k, v, q.shape[-1] ** -0.5)


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """``softmax(q k^T / sqrt(D)) v`` without a mask, for the vision tower's heads ``q`` [B, H, L, D]
    and ``k``, ``v`` [B, G, T, D] (views of its QKV projection), as [B, L, H * D] bf16; or None where
    the AMX kernel does not apply (no AMX, not bf16 CPU tensors, under autograd). It overlaps the
    softmax with the tile products, which SDPA's flash kernel runs in turn (docs/PERFORMANCE.md)."""
    tensors = (q, k, v)
    if any(t.dim() != 4 or t.stride(-1) != 1 or t.dtype is not torch.bfloat16 or not t.is_cpu for t in tensors):
        return None
    if q.shape[-1] % 2 or any(s % 2 for s in q.stride()[:3]) or not _outside_autograd(*tensors):
        return None
    if 0 in q.shape or 0 in k.shape:  # nothing to attend (SDPA says what it makes of that)
        return None
    module = cpu_kernels()
    op = getattr(module, "vision_attention", None)
    if op is None or not module.amx_available():
        return None
    return op(q, k, v, q.shape[-1] ** -0.5)


def _attention_op(name: str, tokens: int, cache_k: torch.Tensor, cache_v: torch.Tensor, *tensors: torch.Tensor):
    """``_decode_op`` for a kernel that runs the decode attention over the cache views ``cache_k``,
    ``cache_v`` [B, G, T, D]: only where their rows are contiguous with D a multiple of 32; else None."""
    if cache_k.dim() != 4 or cache_k.shape[-1] % 32:
        return None
    if any(c.stride(-1) != 1 or c.stride(2) != c.shape[-1] for c in (cache_k, cache_v)):
        return None
    return _decode_op(name, tokens, *tensors, cache_k, cache_v)


_NONE = torch.empty(0, dtype=torch.bfloat16)  # an absent bias or scale, for decode_block


def decode_block(x: torch.Tensor, norms: tuple, eps: float, linears: list, rope: torch.Tensor,
                 cache_k: torch.Tensor, cache_v: torch.Tensor, slot: int, key_len: int, heads: int,
                 kv_heads: int) -> torch.Tensor | None:
    """A whole GLM-4 decoder layer for a decode step in one kernel call, or None where it does not apply.

    ``x`` [B, L, hidden] bf16 with at most ``MAX_ROWS`` token rows in all; ``norms`` the two
    RMSNorm weights; ``linears`` per projection (query_key_value, dense, dense_h_to_4h,
    dense_4h_to_h) a tuple ``(bits, weight, scales, bias, group)`` (bits 16 for a bf16 weight,
    scales None there; bias None or bf16), or None for one this cannot run. The keys and values
    of the step go into slots ``slot`` ..; attention reads ``key_len`` slots. The layer's own
    kernels in the layer's order, so the result is bit for bit that of its modules; what it saves
    is ~12 calls from Python a layer (docs/PERFORMANCE.md).
    """
    if x.dim() != 3 or rope.dim() != 4 or None in linears:
        return None
    op = _attention_op("decode_block", _tokens(x), cache_k, cache_v, x, *norms, rope)
    if op is None:
        return None
    if not _outside_autograd(*(t for lin in linears for t in lin[1:4] if t is not None)):
        return None  # a projection being trained: its module keeps autograd's graph
    params, bits, groups = list(norms), [], []
    for b, weight, scales, bias, group in linears:
        params += [weight, _NONE if scales is None else scales, _NONE if bias is None else bias]
        bits.append(b)
        groups.append(group)
    return op(x, params, bits, groups, rope, cache_k, cache_v, slot, key_len, heads, kv_heads, eps)
