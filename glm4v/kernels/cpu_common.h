// Scalar helpers shared by both builds of the decode kernels (cpu_gemv.cpp, cpu_gemv_avx2.cpp):
// argument checks, the rounding of the activations to integers that the int8 and int4 loops
// multiply with, and where the weight streams prefetch. Nothing here depends on the instruction set.
#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace glm4v_kernels {

constexpr int kMaxRows = 4;  // token rows per call

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Scales and zeros arrive in the model dtype: bf16 or fp32.
inline float scalar_at(const void* base, bool is_bf16, int64_t i) {
  return is_bf16 ? bf16_to_float(static_cast<const uint16_t*>(base)[i]) : static_cast<const float*>(base)[i];
}

// x rows -> int16 codes with one scale per row (code = round(x / scale), |code| <= 32767): finer
// than bf16 for the row's large values, so an int8 weight times these codes loses almost nothing.
inline void quantize_rows_int16(const float* x, int64_t M, int64_t K, int16_t* codes, float* scales) {
  for (int64_t m = 0; m < M; ++m) {
    float peak = 0.f;
    for (int64_t k = 0; k < K; ++k) peak = std::max(peak, std::fabs(x[m * K + k]));
    const float scale = peak > 0.f ? peak / 32767.f : 1.f;
    const float inv = 1.f / scale;
    for (int64_t k = 0; k < K; ++k)
      codes[m * K + k] = static_cast<int16_t>(std::max(-32767.f, std::min(32767.f, std::nearbyint(x[m * K + k] * inv))));
    scales[m] = scale;
  }
}

// x rows -> int8 codes per group of columns (scale max|x| / 127 over the group, as llama.cpp's q8
// blocks), [M, K] in column order; per row and group the scale and the sum of the rounded values.
inline void quantize_groups_int8(const float* x, int64_t M, int64_t K, int64_t group, int8_t* codes, float* scales,
                                 float* sums) {
  const int64_t groups = K / group;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t gi = 0; gi < groups; ++gi) {
      const float* xg = x + m * K + gi * group;
      int8_t* cg = codes + m * K + gi * group;
      float peak = 0.f;
      for (int64_t k = 0; k < group; ++k) peak = std::max(peak, std::fabs(xg[k]));
      const float scale = peak > 0.f ? peak / 127.f : 1.f, inv = 1.f / scale;
      int32_t code_sum = 0;
      for (int64_t k = 0; k < group; ++k) {
        cg[k] = static_cast<int8_t>(std::max(-127.f, std::min(127.f, std::nearbyint(xg[k] * inv))));
        code_sum += cg[k];
      }
      scales[m * groups + gi] = scale;
      // The sum of the rounded activations, not of the exact ones: then the zero term and the code
      // term see the same x, and the error is (x_rounded - x) times the weights, as it should be.
      // (With the exact sum it is multiplied by the codes, 0..15, mean 7.5: ~3x larger.)
      sums[m * groups + gi] = scale * static_cast<float>(code_sum);
    }
}

inline void check_x(const torch::Tensor& x, int64_t K, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat, name, ": bf16 or float32 activations");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, name, ": x must be [M, K] with K = ", K);
  TORCH_CHECK(x.size(0) >= 1 && x.size(0) <= kMaxRows, name, ": 1 to 4 rows");
}

inline bool scales_are_bf16(const torch::Tensor& s, const char* name) {
  TORCH_CHECK(s.device().is_cpu() && s.is_contiguous(), name, ": scales must be contiguous CPU tensors");
  TORCH_CHECK(s.scalar_type() == at::kBFloat16 || s.scalar_type() == at::kFloat, name, ": bf16 or float32 scales");
  return s.scalar_type() == at::kBFloat16;
}

// The int8 and int4 argument checks, the same for both builds.
inline void check_int8(const torch::Tensor& x, const torch::Tensor& w, const torch::Tensor& scale, bool& scale_bf16) {
  TORCH_CHECK(w.scalar_type() == at::kChar && w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(),
              "int8_gemv: w must be a contiguous int8 CPU [N, K]");
  check_x(x, w.size(1), "int8_gemv");
  scale_bf16 = scales_are_bf16(scale, "int8_gemv");
  TORCH_CHECK(scale.numel() == w.size(0), "int8_gemv: one scale per output row");
}

inline void check_int4(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales_zeros,
                       int64_t group, int64_t group_multiple, bool& sz_bf16) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.device().is_cpu() && packed.dim() == 2 &&
                  packed.is_contiguous(), "int4_gemv: packed must be a contiguous uint8 CPU [N, K/2]");
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  check_x(x, K, "int4_gemv");
  TORCH_CHECK(N % 64 == 0, "int4_gemv: N must be a multiple of 64");
  TORCH_CHECK(group > 0 && K % group == 0, "int4_gemv: K must be a multiple of the group size");
  TORCH_CHECK(group % group_multiple == 0, "int4_gemv: the group size must be a multiple of ", group_multiple);
  sz_bf16 = scales_are_bf16(scales_zeros, "int4_gemv");
  TORCH_CHECK(scales_zeros.dim() == 3 && scales_zeros.size(0) == K / group && scales_zeros.size(1) == N &&
                  scales_zeros.size(2) == 2, "int4_gemv: scales_zeros must be [K/group, N, 2]");
}

// The software prefetch address `ahead` elements into a weight row read `rows` rows at a time.
// Near the row's end it is the start of the same row of the next group (rows + r): the stream
// goes on there, and a row of 4-8 KB is one or two pages, too short for the hardware prefetcher
// to start on its own (without this, int8 read 4096-wide rows at ~70 % of the speed it reaches).
// (Integer arithmetic: the address may lie past the tensor, which a prefetch may touch.)
template <typename T>
inline const char* ahead_in_stream(const T* row, int64_t ahead, int64_t K, int rows) {
  const int64_t at = ahead < K ? ahead : static_cast<int64_t>(rows) * K + (ahead - K);
  return reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(row) + at * static_cast<int64_t>(sizeof(T)));
}

// Calls f with the row count as a compile-time constant (1-4), so each count gets its own loop.
template <typename F>
void by_rows(int M, F&& f) {
  switch (M) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    default: f(std::integral_constant<int, 4>{}); break;
  }
}

// fp32 -> the nearest bf16 (ties to even), as torch rounds; NaN stays a (quiet) NaN
inline uint16_t float_to_bf16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7F800000u) == 0x7F800000u && (bits & 0x007FFFFFu)) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// RMSNorm of a few bf16 rows with a bf16 weight, as glm4v.model.language.RMSNorm computes it:
// the mean square in fp32 (summed here in double, so it is at least as exact as torch's fp32
// reduction), r = 1 / sqrt(mean + eps) in fp32, then weight * (x * r) in fp32 rounded once to bf16.
// A decode step's norm is 8 torch ops on 4,096 numbers; with 2 threads each op's dispatch cost
// 10-70 us, ~0.18 ms per norm, against a few us here.
inline torch::Tensor rms_norm(torch::Tensor x, torch::Tensor weight, double eps) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && weight.scalar_type() == at::kBFloat16, "rms_norm: bf16 tensors only");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "rms_norm: CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && x.size(-1) == weight.size(0), "rms_norm: x [..., D] and weight [D]");
  const auto xc = x.contiguous(), wc = weight.contiguous();
  const int64_t D = wc.size(0), rows = D ? xc.numel() / D : 0;
  auto out = torch::empty_like(xc);
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(wc.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* xr = xp + r * D;
    double squares = 0.0;
    for (int64_t d = 0; d < D; ++d) {
      const double v = bf16_to_float(xr[d]);
      squares += v * v;
    }
    const float mean = static_cast<float>(squares / static_cast<double>(D));
    const float inv = 1.f / std::sqrt(mean + static_cast<float>(eps));
    for (int64_t d = 0; d < D; ++d) op[r * D + d] = float_to_bf16(bf16_to_float(wp[d]) * (bf16_to_float(xr[d]) * inv));
  }
  return out;
}

// One head of one token: the first 2 * half numbers rotate in pairs with the (cos, sin) table,
// each product, difference and sum rounded to bf16 as torch's bf16 ops round; the rest pass through.
inline void rotate_head(const uint16_t* src, int64_t stride, const uint16_t* table, int64_t half, int64_t D, uint16_t* dst) {
  auto round = [](float f) { return bf16_to_float(float_to_bf16(f)); };
  for (int64_t i = 0; i < half; ++i) {
    const float even = bf16_to_float(src[2 * i * stride]), odd = bf16_to_float(src[(2 * i + 1) * stride]);
    const float cos = bf16_to_float(table[2 * i]), sin = bf16_to_float(table[2 * i + 1]);
    dst[2 * i] = float_to_bf16(round(even * cos) - round(odd * sin));
    dst[2 * i + 1] = float_to_bf16(round(odd * cos) + round(even * sin));
  }
  for (int64_t d = 2 * half; d < D; ++d) dst[d] = src[d * stride];
}

// RoPE of a decode step's query and key heads, as glm4v.model.language.apply_rope computes it in
// bf16: x [B, heads, L, D] (any strides; the model passes a transposed view), rope [B, L, R/2, 2]
// (cos, sin) -> [B, heads, L, D] contiguous. Every product, difference and sum is rounded to bf16
// as torch's bf16 ops round each result, so the output is bit for bit the same; the first R
// numbers of each head rotate in pairs (GPT-J layout), the rest pass through. ~15 torch ops
// become one call.
inline torch::Tensor rope_bf16(torch::Tensor x, torch::Tensor rope) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && rope.scalar_type() == at::kBFloat16, "rope: bf16 tensors only");
  TORCH_CHECK(x.device().is_cpu() && rope.device().is_cpu(), "rope: CPU tensors only");
  TORCH_CHECK(x.dim() == 4 && rope.dim() == 4 && rope.size(3) == 2, "rope: x [B, heads, L, D], rope [B, L, R/2, 2]");
  const int64_t B = x.size(0), H = x.size(1), L = x.size(2), D = x.size(3), half = rope.size(2);
  TORCH_CHECK(rope.size(0) == B && rope.size(1) == L && 2 * half <= D, "rope: shapes do not match");
  const auto rc = rope.contiguous();
  auto out = torch::empty({B, H, L, D}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr());
  const auto* rp = reinterpret_cast<const uint16_t*>(rc.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t s0 = x.stride(0), s1 = x.stride(1), s2 = x.stride(2), s3 = x.stride(3);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t l = 0; l < L; ++l)
        rotate_head(xp + b * s0 + h * s1 + l * s2, s3, rp + (b * L + l) * half * 2, half, D, op + ((b * H + h) * L + l) * D);
  return out;
}

// The rest of a decode step's attention input in one call: qkv [B, L, (H + 2G) * D] (the
// projection's output, rows [q heads | k heads | v heads]) -> q rotated as [B, H, L, D], while
// the rotated keys and the values go straight into the cache slots slot .. slot + L - 1 of
// cache_k, cache_v [B, G, slots, D] (one layer's views). Rounded as rope_bf16 rounds. Instead of
// ~12 torch ops (split, views, RoPE, two cache writes, slicing) that cost ~0.2 ms a layer in a
// decode step, where each op starts with its code and data pushed out of the CPU caches by the
// weights streamed since it last ran.
inline torch::Tensor rope_into_cache(torch::Tensor qkv, torch::Tensor rope, torch::Tensor cache_k, torch::Tensor cache_v,
                                     int64_t slot, int64_t H, int64_t G) {
  for (const auto* t : {&qkv, &rope, &cache_k, &cache_v})
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->device().is_cpu(), "rope_into_cache: bf16 CPU tensors only");
  TORCH_CHECK(qkv.dim() == 3 && rope.dim() == 4 && rope.size(3) == 2 && cache_k.dim() == 4 && cache_k.sizes() == cache_v.sizes(),
              "rope_into_cache: qkv [B, L, (H + 2G) * D], rope [B, L, R/2, 2], caches [B, G, slots, D]");
  const int64_t B = qkv.size(0), L = qkv.size(1), D = cache_k.size(3), half = rope.size(2);
  TORCH_CHECK(H > 0 && G > 0 && qkv.size(2) == (H + 2 * G) * D && cache_k.size(0) == B && cache_k.size(1) == G,
              "rope_into_cache: qkv's width is not (H + 2G) x the cache's head size");
  TORCH_CHECK(rope.size(0) == B && rope.size(1) == L && 2 * half <= D, "rope_into_cache: rope does not match");
  TORCH_CHECK(slot >= 0 && slot + L <= cache_k.size(2), "rope_into_cache: slots past the cache");
  TORCH_CHECK(cache_k.stride(3) == 1 && cache_v.stride(3) == 1, "rope_into_cache: caches with a contiguous last dimension");
  const auto qc = qkv.contiguous();
  const auto rc = rope.contiguous();
  auto q = torch::empty({B, H, L, D}, qkv.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(qc.data_ptr());
  const auto* rp = reinterpret_cast<const uint16_t*>(rc.data_ptr());
  auto* qp = reinterpret_cast<uint16_t*>(q.data_ptr());
  auto* kp = reinterpret_cast<uint16_t*>(cache_k.data_ptr());
  auto* vp = reinterpret_cast<uint16_t*>(cache_v.data_ptr());
  const int64_t width = (H + 2 * G) * D;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t l = 0; l < L; ++l) {
      const uint16_t* row = xp + (b * L + l) * width;
      const uint16_t* table = rp + (b * L + l) * half * 2;
      for (int64_t h = 0; h < H; ++h) rotate_head(row + h * D, 1, table, half, D, qp + ((b * H + h) * L + l) * D);
      for (int64_t g = 0; g < G; ++g) {
        uint16_t* k_dst = kp + b * cache_k.stride(0) + g * cache_k.stride(1) + (slot + l) * cache_k.stride(2);
        uint16_t* v_dst = vp + b * cache_v.stride(0) + g * cache_v.stride(1) + (slot + l) * cache_v.stride(2);
        rotate_head(row + (H + g) * D, 1, table, half, D, k_dst);
        std::memcpy(v_dst, row + (H + G + g) * D, D * sizeof(uint16_t));
      }
    }
  return q;
}

// The memory probe of `glm4v bench`: reads every byte of ``buf`` once, the way the decode loops
// read weights (several streams per thread, software prefetch), and returns a checksum so the
// reads cannot be dropped. torch's own streaming reads (sum, mv) start one stream per thread and
// stop at ~75 % of the rate the decode loops reach here, which made a roofline on them read above
// 100 %. Plain C++ with GCC vector types: each build compiles it for its own instruction set.
inline int64_t stream_read(const torch::Tensor& buf) {
  TORCH_CHECK(buf.device().is_cpu() && buf.is_contiguous(), "stream_read: a contiguous CPU tensor");
  typedef uint64_t lane8 __attribute__((vector_size(64), aligned(1)));
  constexpr int kStreams = 8;
  constexpr int64_t kChunk = 1 << 20;  // bytes per task (kStreams streams of 128 KB)
  const auto* base = static_cast<const char*>(buf.data_ptr());
  const int64_t bytes = buf.numel() * buf.element_size(), chunks = bytes / kChunk;
  std::atomic<uint64_t> checksum{0};
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    lane8 acc[kStreams] = {};
    for (int64_t c = c0; c < c1; ++c) {
      const char* chunk = base + c * kChunk;
      constexpr int64_t stride = kChunk / kStreams;
      for (int64_t i = 0; i < stride; i += 64)
        for (int s = 0; s < kStreams; ++s) {
          __builtin_prefetch(chunk + s * stride + i + 1024);
          acc[s] += *reinterpret_cast<const lane8*>(chunk + s * stride + i);
        }
    }
    uint64_t folded = 0;
    for (int s = 0; s < kStreams; ++s)
      for (int l = 0; l < 8; ++l) folded += acc[s][l];
    checksum += folded;
  });
  uint64_t tail = 0;  // the last partial chunk, byte by byte (at most 1 MB)
  for (int64_t i = chunks * kChunk; i < bytes; ++i) tail += static_cast<uint8_t>(base[i]);
  return static_cast<int64_t>(checksum.load() + tail);
}

// The wrappers below convert and allocate without aten calls: in a decode step each GEMV's
// x.to(float), out.to(bf16) and scratch tensors cost 40-60 us of dispatch and allocation with two
// threads, next to 0.4-0.6 ms for a 4096-wide int4 layer. Scratch lives in per-thread buffers.

// Activations as fp32 rows: fp32 ones in place, bf16 ones widened (exact) into `keep`.
inline const float* float_rows(const torch::Tensor& xc, std::vector<float>& keep) {
  if (xc.scalar_type() == at::kFloat) return xc.data_ptr<float>();
  keep.resize(xc.numel());
  const auto* p = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  for (int64_t i = 0; i < xc.numel(); ++i) keep[i] = bf16_to_float(p[i]);
  return keep.data();
}

// fp32 products -> bf16 as float_to_bf16 (and torch's .to(bf16)) round: ties to even, NaN stays a
// quiet NaN, subnormals kept (VCVTNEPS2BF16 would flush them to zero). Plain C++ with GCC vector
// types, as stream_read: each build compiles it for its own instruction set.
inline void store_bf16(const float* src, uint16_t* dst, int64_t n) {
#ifdef __AVX512F__
  constexpr int kLanes = 16;
#else
  constexpr int kLanes = 8;  // 16 lanes of these types compile to ~6x slower code for AVX2
#endif
  typedef uint32_t u32v __attribute__((vector_size(4 * kLanes), aligned(4)));
  typedef int32_t i32v __attribute__((vector_size(4 * kLanes), aligned(4)));
  typedef uint16_t u16v __attribute__((vector_size(2 * kLanes), aligned(2)));
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    u32v bits;
    std::memcpy(&bits, src + i, sizeof bits);
    const u32v high = bits >> 16;
    const u32v rounded = (bits + 0x7FFFu + (high & 1u)) >> 16;
    const u32v nan = (u32v)((i32v)(bits & 0x7FFFFFFFu) > 0x7F800000);  // all ones where NaN
    const u16v packed = __builtin_convertvector((rounded & ~nan) | ((high | 0x40u) & nan), u16v);  // NaN: quiet, sign kept
    std::memcpy(dst + i, &packed, sizeof packed);
  }
  for (; i < n; ++i) dst[i] = float_to_bf16(src[i]);
}

// Where the products go: straight into the fp32 result, or into a per-thread buffer that
// finish() rounds into a bf16 result.
struct Products {
  torch::Tensor out;
  float* data;
  Products(int64_t M, int64_t N, const torch::Tensor& x) {
    out = torch::empty({M, N}, x.options());
    if (x.scalar_type() == at::kFloat) {
      data = out.data_ptr<float>();
    } else {
      thread_local std::vector<float> scratch;
      scratch.resize(M * N);
      data = scratch.data();
    }
  }
  torch::Tensor finish() {
    if (out.scalar_type() != at::kFloat)
      store_bf16(data, reinterpret_cast<uint16_t*>(out.data_ptr()), out.numel());
    return out;
  }
};

// ---- decode attention: the shape both builds' kernels take ---------------------------------
// q [B, H, L, D], k and v [B, G, T, D] (bf16, any strides, the last dimension contiguous; k and v
// are views of the KV cache): the H / G heads of group g share its keys and values, and the
// heads x tokens of a group are one set of query rows (row = head offset * L + token).

struct AttentionShape {
  int64_t T, D, L, rep;
  int64_t q_b, q_h, q_l;  // strides, in elements; the last dimension is contiguous
  int64_t k_b, k_g, k_t, v_b, v_g, v_t;
  float scale;
  int64_t B, H, G;
};

inline AttentionShape attention_shape(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                      double scale) {
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->device().is_cpu(), "decode_attention: bf16 CPU tensors only");
    TORCH_CHECK(t->dim() == 4 && t->stride(3) == 1, "decode_attention: 4-d tensors with a contiguous last dimension");
  }
  const int64_t B = q.size(0), H = q.size(1), L = q.size(2), D = q.size(3), G = k.size(1), T = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D, "decode_attention: k and v [B, G, T, D] with q [B, H, L, D]");
  TORCH_CHECK(G > 0 && H % G == 0 && T > 0 && L > 0 && D % 32 == 0, "decode_attention: H a multiple of G, T > 0, D a multiple of 32");
  return AttentionShape{T, D, L, H / G, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                        v.stride(0), v.stride(1), v.stride(2), static_cast<float>(scale), B, H, G};
}

// Key ranges per task: one when there are tasks enough for the threads; otherwise (GLM-4 has 2
// KV groups, so a batch of one gives 2 tasks) up to 64 ranges of at least 512 keys, whose parts
// the kernel merges as flash-decoding does.
inline int64_t attention_splits(int64_t tasks, int64_t T) {
  const int64_t threads = at::get_num_threads();
  return tasks >= threads ? 1 : std::max<int64_t>(1, std::min<int64_t>({(threads + tasks - 1) / tasks, T / 512, 64}));
}

}  // namespace glm4v_kernels

// ---- one decoder layer of a decode step in one call ---------------------------------------------
// Each build defines these (cpu_gemv.cpp, cpu_gemv_avx2.cpp).
torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor w);
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale);
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor scales_zeros, int64_t group);
torch::Tensor swiglu(torch::Tensor h);
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale);

namespace glm4v_kernels {

// x2 [rows, K] through one linear layer given as (weight, scales, bias); bits 16 (bf16 weight,
// scales empty), 8 or 4; an empty bias is none. The bias is added in bf16 as the layers add it.
inline torch::Tensor block_linear(const torch::Tensor& x2, const torch::Tensor* p, int64_t bits, int64_t group) {
  torch::Tensor out = bits == 16 ? bf16_gemv(x2, p[0])
                      : bits == 8 ? int8_gemv(x2, p[0], p[1])
                                  : int4_gemv(x2, p[0], p[1], group);
  return p[2].numel() ? out + p[2] : out;
}

// A GLM-4 decoder layer for a decode step's few tokens (glm4v.model.language.GLMBlock with a KV
// cache, every row writing the same slots, no mask): the same kernels in the same order as the
// layer's modules call them one by one, so the result is bit for bit theirs. One call instead of
// ~12 from Python: ~0.2 ms a layer less on a Zen 3 EPYC, 5 % of an int4 layer (docs/PERFORMANCE.md).
// params: the two norms' weights, then (weight, scales, bias) of query_key_value, dense,
// dense_h_to_4h and dense_4h_to_h; bits and groups: per linear.
inline torch::Tensor decode_block(torch::Tensor x, std::vector<torch::Tensor> params, std::vector<int64_t> bits,
                                  std::vector<int64_t> groups, torch::Tensor rope, torch::Tensor cache_k,
                                  torch::Tensor cache_v, int64_t slot, int64_t key_len, int64_t heads,
                                  int64_t kv_heads, double eps) {
  TORCH_CHECK(params.size() == 14 && bits.size() == 4 && groups.size() == 4, "decode_block: 2 norms and 4 linears");
  TORCH_CHECK(x.dim() == 3 && x.size(1) <= kMaxRows, "decode_block: x [B, L <= 4, hidden]");
  TORCH_CHECK(key_len >= slot + x.size(1) && key_len <= cache_k.size(2), "decode_block: key_len outside the cache");
  for (int64_t b : bits) TORCH_CHECK(b == 16 || b == 8 || b == 4, "decode_block: bits 16, 8 or 4");
  const int64_t B = x.size(0), L = x.size(1), hidden = x.size(2), D = cache_k.size(3);
  auto flat = [&](const torch::Tensor& t) { return t.reshape({B * L, t.size(-1)}); };
  const torch::Tensor* linear = params.data() + 2;
  auto qkv = block_linear(flat(rms_norm(x, params[0], eps)), linear, bits[0], groups[0]).view({B, L, -1});
  auto q = rope_into_cache(qkv, rope, cache_k, cache_v, slot, heads, kv_heads);
  auto attended = ::decode_attention(q, cache_k.narrow(2, 0, key_len), cache_v.narrow(2, 0, key_len),
                                     std::pow(static_cast<double>(D), -0.5));
  auto h = x + block_linear(flat(attended), linear + 3, bits[1], groups[1]).view({B, L, hidden});
  auto up = block_linear(flat(rms_norm(h, params[1], eps)), linear + 6, bits[2], groups[2]);
  return h + block_linear(::swiglu(up), linear + 9, bits[3], groups[3]).view({B, L, hidden});
}

}  // namespace glm4v_kernels
