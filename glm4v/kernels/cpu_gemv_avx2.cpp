// Decode-step matrix-vector products for CPUs with AVX2 + FMA but no bf16 units.
//
// A decode step multiplies 1-4 token rows by every weight of the model, so it should run at the
// speed the weights stream from memory. On an AVX2 EPYC torch reaches only half of that for bf16
// weights (F.linear at M = 1), 40 % for int8 (_weight_int8pack_mm) and, for int4, has no kernel at
// all (the int4 CPU kernel refuses our layout there, and expanding the weight per step is ~100x too
// slow). These loops read each weight once. bf16 weights are widened to fp32 in registers and
// accumulated with FMA; int8 and int4 weights are multiplied in integers, against activations
// rounded once per call (int16 per row for int8, int8 per group for int4; see each loop). Each
// thread takes a contiguous range of output rows (at::parallel_for: torch's own thread pool).
//
// Layouts are the ones glm4v stores (glm4v/quant.py):
//   bf16  w [N, K]
//   int8  w [N, K] int8, scale [N]                     w = code * scale
//   int4  w [N, K/2] uint8 in 64-row blocks: byte (k, j) of block b holds row 64b+j (low nibble) and
//         row 64b+32+j (high nibble) of column k; scales_zeros [K/g, N, 2]   w = (code - 8) * scale + zero
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <tuple>
#include <utility>

#include "cpu_common.h"
#include "cpu_lane_attention.h"

namespace {

using namespace glm4v_kernels;

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- bf16 -----------------------------------------------------------------------------------
// Sixteen bf16 weights are eight 32-bit lanes, each holding weight 2i (low half) and 2i+1 (high
// half): shifting a lane left by 16 gives weight 2i as fp32, masking off the low half gives weight
// 2i+1. So x is laid out the same way once per call (xs: per 16 columns, the 8 even then the 8 odd
// ones) and each 16 weights cost one load, two bit operations and two FMAs.

template <int M, int R>
void bf16_rows(const float* xs, const float* xf, const uint16_t* w, float* out, int64_t K, int64_t N, int64_t n0,
               int rows) {
  __m256 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_ps();
  const uint16_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = w + (n0 + (r < rows ? r : 0)) * K;  // short tail: repeat row 0
  const int64_t K16 = K / 16 * 16;
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  for (int64_t k = 0; k < K16; k += 16) {
    __m256 even[R], odd[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(ahead_in_stream(row[r], k + 512, K, R), _MM_HINT_T0);  // 1 KB ahead
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[r] + k));
      even[r] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      odd[r] = _mm256_castsi256_ps(_mm256_and_si256(v, high));
    }
    for (int m = 0; m < M; ++m) {
      const __m256 xe = _mm256_loadu_ps(xs + m * K16 + k);
      const __m256 xo = _mm256_loadu_ps(xs + m * K16 + k + 8);
      for (int r = 0; r < R; ++r) {
        acc[m][r] = _mm256_fmadd_ps(even[r], xe, acc[m][r]);
        acc[m][r] = _mm256_fmadd_ps(odd[r], xo, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < rows; ++r) {
      float s = hsum(acc[m][r]);
      for (int64_t k = K16; k < K; ++k) s += xf[m * K + k] * bf16_to_float(row[r][k]);
      out[m * N + n0 + r] = s;
    }
}

// ---- int8 -----------------------------------------------------------------------------------
// Widening every weight to fp32 (two conversions per 8 weights) made this loop compute-bound at
// ~45 % of the bandwidth on a Zen 1 EPYC. Instead the activations are rounded once per call to
// 16-bit integers (one scale per row: max|x| / 32767, finer than bf16 for the row's large values)
// and each 16 weights cost one sign extension, one VPMADDWD and one add, in integers. The int32
// sums are moved to fp32 every 4,096 columns, before they could overflow (|sum| < 2^31).

constexpr int64_t kInt8Flush = 4096;

template <int M, int R>
void int8_rows(const int16_t* xq, const float* xscale, const int8_t* w, const void* scale, bool scale_bf16,
               float* out, int64_t K, int64_t N, int64_t n0, int rows) {
  float sum[M][R] = {};
  const int8_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = w + (n0 + (r < rows ? r : 0)) * K;
  const int64_t K16 = K / 16 * 16;
  for (int64_t k0 = 0; k0 < K16; k0 += kInt8Flush) {
    const int64_t k1 = std::min(K16, k0 + kInt8Flush);
    __m256i acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += 16) {
      __m256i wv[R];
      for (int r = 0; r < R; ++r) {
        // 256 bytes ahead in each of the 8 rows: on a Zen 3 EPYC 1,024 made decode layers 11-13 % slower
        // (interleaved), 512 and 2,048 slower too, 128 2 %; the hardware prefetchers do the rest.
        if ((k & 63) == 0) _mm_prefetch(ahead_in_stream(row[r], k + 256, K, R), _MM_HINT_T0);
        wv[r] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row[r] + k)));
      }
      for (int m = 0; m < M; ++m) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + k));
        for (int r = 0; r < R; ++r) acc[m][r] = _mm256_add_epi32(acc[m][r], _mm256_madd_epi16(wv[r], xv));
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) sum[m][r] += hsum(_mm256_cvtepi32_ps(acc[m][r]));
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < rows; ++r) {
      float tail = 0.f;
      for (int64_t k = K16; k < K; ++k) tail += static_cast<float>(xq[m * K + k]) * static_cast<float>(row[r][k]);
      out[m * N + n0 + r] = (sum[m][r] + tail) * xscale[m] * scalar_at(scale, scale_bf16, n0 + r);
    }
}

// ---- int4 -----------------------------------------------------------------------------------
// Converting nibbles to fp32 costs more than reading them: that version ran at ~25 % of the
// bandwidth on a Zen 1 EPYC. So the products are taken in integers, as VPMADDUBSW does them
// (unsigned bytes x signed bytes, adjacent pairs summed into int16). Columns k and k+1 are
// interleaved byte by byte (VPUNPCKLBW), so each 16-bit lane holds one byte column's codes for k
// and k+1 (low nibbles: row j, high nibbles: row j+32), and masking gives the unsigned pairs. The
// activations are rounded per group to int8 (scale max|x| / 127 over the group, as llama.cpp's
// q8 blocks): an error of at most 0.4 % of the group's largest value, against the ~10 % the int4
// weights carry. (A 15-bit variant, x = 128 * hi + lo with two VPMADDUBSW per pair, doubles the
// multiply-adds, which are what bounds this loop.) int16 sums are widened every 8 column pairs (|pair sum| <= 3810,
// so 8 of them fit), int32 sums folded in per group as x_scale * scale * sum + (zero - 8 * scale) * sum_k x_k.

constexpr int kPairsPerFlush = 8;

// The four int16 accumulators per block: v = 2 * half + nibble, half 0 from VPUNPCKLBW (byte columns
// 0-7 in the low 128 bits, 16-23 in the high), 1 from VPUNPCKHBW (8-15, 24-31); nibble 1 = rows + 32.
// Widening each 128-bit half to int32 gives eight consecutive rows, so the sums are kept in row order.
inline void widen_add(int32_t* sums, __m256i acc, int v) {
  const int row = 8 * (v >> 1) + 32 * (v & 1);
  __m256i* lo = reinterpret_cast<__m256i*>(sums + row);
  __m256i* hi = reinterpret_cast<__m256i*>(sums + row + 16);
  _mm256_store_si256(lo, _mm256_add_epi32(_mm256_load_si256(lo), _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc))));
  _mm256_store_si256(hi, _mm256_add_epi32(_mm256_load_si256(hi), _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc, 1))));
}

// (scale, zero) of eight consecutive rows, stored interleaved as [s0 z0 s1 z1 ...] in bf16 or fp32.
inline void load_scales_zeros(const void* sz, bool sz_bf16, int64_t at, __m256& scale, __m256& zero) {
  if (sz_bf16) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(sz) + at));
    scale = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    zero = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
  } else {
    const float* f = static_cast<const float*>(sz) + at;
    const __m256 a = _mm256_loadu_ps(f), b = _mm256_loadu_ps(f + 8);
    scale = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))), 0xD8));
    zero = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))), 0xD8));
  }
}

// pairs: per token row, per column pair, the two int8 activations as one 16-bit word.
template <int M>
void int4_block(const int16_t* pairs, const float* xscale, const float* xsum,
                const uint8_t* packed, const void* sz, bool sz_bf16, float* out, int64_t K, int64_t N, int64_t block,
                int64_t group) {
  const int64_t groups = K / group, half_k = K / 2;
  const uint8_t* base = packed + block * K * 32;  // [K, 32] bytes of this block
  float total[M][64] = {};
  const __m256i nibbles = _mm256_set1_epi16(0x0F0F);
  alignas(32) int32_t sums[64];
  for (int64_t gi = 0; gi < groups; ++gi) {
    const uint8_t* gbase = base + gi * group * 32;
    // The next group's 64 (scale, zero) pairs: a 256-byte piece N pairs away from this group's, which
    // no hardware prefetcher follows. Requested a group ahead: GEMVs +2-9 %, int4 layers -1.5-2.4 %.
    if (gi + 1 < groups) {
      const char* next = static_cast<const char*>(sz) + ((gi + 1) * N + block * 64) * 2 * (sz_bf16 ? 2 : 4);
      for (int line = 0; line < (sz_bf16 ? 4 : 8); ++line) _mm_prefetch(next + 64 * line, _MM_HINT_T0);
    }
    for (int m = 0; m < M; ++m) {
      std::memset(sums, 0, sizeof sums);
      for (int64_t p0 = 0; p0 < group / 2; p0 += kPairsPerFlush) {
        __m256i acc[4];
        for (int v = 0; v < 4; ++v) acc[v] = _mm256_setzero_si256();
        for (int64_t p = p0; p < p0 + kPairsPerFlush; ++p) {
          const uint8_t* col = gbase + 2 * p * 32;
          if (m == 0) _mm_prefetch(reinterpret_cast<const char*>(col) + 2048, _MM_HINT_T0);
          const __m256i ck = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col));
          const __m256i ck1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(col + 32));
          const int64_t at = m * half_k + gi * group / 2 + p;
          const __m256i xv = _mm256_set1_epi16(pairs[at]);
          const __m256i mixed[2] = {_mm256_unpacklo_epi8(ck, ck1), _mm256_unpackhi_epi8(ck, ck1)};
          for (int h = 0; h < 2; ++h) {
            const __m256i low = _mm256_and_si256(mixed[h], nibbles);
            const __m256i high = _mm256_and_si256(_mm256_srli_epi16(mixed[h], 4), nibbles);
            acc[2 * h] = _mm256_add_epi16(acc[2 * h], _mm256_maddubs_epi16(low, xv));
            acc[2 * h + 1] = _mm256_add_epi16(acc[2 * h + 1], _mm256_maddubs_epi16(high, xv));
          }
        }
        for (int v = 0; v < 4; ++v) widen_add(sums, acc[v], v);
      }
      const __m256 xs = _mm256_set1_ps(xscale[m * groups + gi]), xg = _mm256_set1_ps(xsum[m * groups + gi]);
      for (int r = 0; r < 64; r += 8) {
        __m256 scale, zero;
        load_scales_zeros(sz, sz_bf16, (gi * N + block * 64 + r) * 2, scale, zero);
        const __m256 shift = _mm256_fnmadd_ps(_mm256_set1_ps(8.f), scale, zero);  // zero - 8 * scale
        const __m256 dot = _mm256_mul_ps(xs, _mm256_cvtepi32_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(sums + r))));
        const __m256 t = _mm256_fmadd_ps(shift, xg, _mm256_loadu_ps(total[m] + r));
        _mm256_storeu_ps(total[m] + r, _mm256_fmadd_ps(scale, dot, t));
      }
    }
  }
  for (int m = 0; m < M; ++m) std::memcpy(out + m * N + block * 64, total[m], 64 * sizeof(float));
}

// ---- e^x (SwiGLU and the decode attention) ------------------------------------------------
// e^x: 2^n * e^r with |r| <= ln2 / 2, degree-7 Taylor (as the AVX-512 build's). x is first clamped
// to [-87, 89]: below -87 the result stays at e^-87 (~1.6e-38, where 2^n is still a normal float;
// expf would go on into subnormals), from 88.4 on it is inf (expf: from 88.72). NaN stays NaN.
inline __m256 exp_ps(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(89.f), _mm256_max_ps(_mm256_set1_ps(-87.f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 5040);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(pow2));
}

// ---- SwiGLU ---------------------------------------------------------------------------------
// silu(gate) * up for a decode step's rows with the model's two bf16 roundings (silu's result,
// then the product), as F.silu and the bf16 multiply round them (the AVX-512 build's, 8 lanes).
// torch's silu and multiply on bf16 (emulated here) cost ~40 us a layer, the kernel a few.

inline __m256 load_bf16x8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

// fp32 -> the bits of the nearest bf16 (ties to even), in the low half of each lane
inline __m256i bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), odd)), 16);
}

// eight products -> eight bf16 values at dst (ties to even)
inline void store_bf16x8(uint16_t* dst, __m256 v) {
  const __m256i bits = bf16_bits(v);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
}

inline __m256 silu_times(__m256 gate, __m256 up) {
  const __m256 silu = _mm256_div_ps(gate, _mm256_add_ps(_mm256_set1_ps(1.f), exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gate))));
  return _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits(silu), 16)), up);
}

// The AVX2 side of the decode attention (cpu_lane_attention.h): 16 query rows are two 8-lane
// vectors, and 4 keys or dimensions a pass give 8 independent sums for the two FMA pipes.
struct Lanes {
  using reg = __m256;
  static constexpr int kWidth = 8, kCols = 4;
  static reg zero() { return _mm256_setzero_ps(); }
  static reg broadcast_value(float f) { return _mm256_set1_ps(f); }
  static reg load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, reg v) { _mm256_storeu_ps(p, v); }
  static reg broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static reg fma(reg a, reg b, reg c) { return _mm256_fmadd_ps(a, b, c); }
  static reg max(reg a, reg b) { return _mm256_max_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm256_sub_ps(a, b); }
  static reg add(reg a, reg b) { return _mm256_add_ps(a, b); }
  static reg exp(reg x) { return exp_ps(x); }
  static reg load_bf16(const uint16_t* p) { return load_bf16x8(p); }
};

}  // namespace

// x [M, K] bf16 (1 <= M <= 4), w [N, K] bf16 contiguous -> [M, N] bf16 (fp32 accumulation).
torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16_gemv: bf16 tensors only");
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2 && w.is_contiguous(), "bf16_gemv: w must be a contiguous CPU [N, K]");
  const int64_t K = w.size(1), N = w.size(0);
  check_x(x, K, "bf16_gemv");
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), K16 = K / 16 * 16;
  thread_local std::vector<float> widened, shuffled;
  const float* xp = float_rows(xc, widened);
  shuffled.resize(std::max<int64_t>(M * K16, 1));
  float* sp = shuffled.data();
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K16; k += 16)
      for (int i = 0; i < 8; ++i) {
        sp[m * K16 + k + i] = xp[m * K + k + 2 * i];
        sp[m * K16 + k + 8 + i] = xp[m * K + k + 2 * i + 1];
      }
  Products out(M, N, xc);
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* op = out.data;
  by_rows((int)M, [&](auto m_rows) {
    constexpr int Mr = decltype(m_rows)::value;
    constexpr int R = Mr <= 2 ? 4 : 2;  // accumulators M x R stay within the 16 registers
    const int64_t blocks = (N + R - 1) / R;
    at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * R;
        bf16_rows<Mr, R>(sp, xp, wp, op, K, N, n0, (int)std::min<int64_t>(R, N - n0));
      }
    });
  });
  return out.finish();
}

// x [M, K] bf16/fp32, w [N, K] int8, scale [N] -> [M, N] in x's dtype.
torch::Tensor int8_gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  bool scale_bf16;
  check_int8(x, w, scale, scale_bf16);
  const int64_t K = w.size(1), N = w.size(0);
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0);
  thread_local std::vector<float> widened;
  thread_local std::vector<int16_t> xq_keep;
  xq_keep.resize(M * K);
  float xscale[kMaxRows];
  int16_t* xq = xq_keep.data();
  quantize_rows_int16(float_rows(xc, widened), M, K, xq, xscale);
  Products out(M, N, xc);
  const auto* wp = w.data_ptr<int8_t>();
  const void* sp = scale.data_ptr();
  float* op = out.data;
  by_rows((int)M, [&](auto m_rows) {
    constexpr int Mr = decltype(m_rows)::value;
    constexpr int R = Mr == 1 ? 8 : Mr <= 2 ? 4 : 2;  // 8 weight rows in flight at M = 1: ~10 % faster than 4
    const int64_t blocks = (N + R - 1) / R;
    at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * R;
        int8_rows<Mr, R>(xq, xscale, wp, sp, scale_bf16, op, K, N, n0, (int)std::min<int64_t>(R, N - n0));
      }
    });
  });
  return out.finish();
}

// x [M, K] bf16/fp32, packed [N, K/2] uint8 (64-row blocks), scales_zeros [K/g, N, 2] -> [M, N] in x's dtype.
torch::Tensor int4_gemv(torch::Tensor x, torch::Tensor packed, torch::Tensor scales_zeros, int64_t group) {
  bool sz_bf16;
  check_int4(x, packed, scales_zeros, group, 2 * kPairsPerFlush, sz_bf16);
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), groups = K / group;
  thread_local std::vector<float> widened, stats;
  thread_local std::vector<int8_t> codes_keep;
  codes_keep.resize(M * K);
  stats.resize(2 * M * groups);
  float* xscale = stats.data();
  float* xsum = xscale + M * groups;
  quantize_groups_int8(float_rows(xc, widened), M, K, group, codes_keep.data(), xscale, xsum);
  // two consecutive int8 codes read as one 16-bit word: the column pair int4_block multiplies
  const auto* pairs = reinterpret_cast<const int16_t*>(codes_keep.data());
  Products out(M, N, xc);
  float* op = out.data;
  const auto* wp = packed.data_ptr<uint8_t>();
  const void* szp = scales_zeros.data_ptr();
  by_rows((int)M, [&](auto m_rows) {
    constexpr int Mr = decltype(m_rows)::value;
    at::parallel_for(0, N / 64, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        int4_block<Mr>(pairs, xscale, xsum, wp, szp, sz_bf16, op, K, N, b, group);
    });
  });
  return out.finish();
}

// h [..., 2F] bf16 = [gate | up] -> silu(gate) * up [..., F] bf16 (decode steps).
torch::Tensor swiglu(torch::Tensor h) {
  TORCH_CHECK(h.scalar_type() == at::kBFloat16 && h.device().is_cpu(), "swiglu: a bf16 CPU tensor");
  TORCH_CHECK(h.dim() >= 1 && h.size(-1) % 2 == 0, "swiglu: the last dimension holds [gate | up]");
  const auto hc = h.contiguous();
  const int64_t F = hc.size(-1) / 2, rows = F ? hc.numel() / (2 * F) : 0;
  auto sizes = hc.sizes().vec();
  sizes.back() = F;
  auto out = torch::empty(sizes, hc.options());
  const auto* hp = reinterpret_cast<const uint16_t*>(hc.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t *gate = hp + r * 2 * F, *up = gate + F;
    int64_t f = 0;
    for (; f + 8 <= F; f += 8) store_bf16x8(op + r * F + f, silu_times(load_bf16x8(gate + f), load_bf16x8(up + f)));
    if (f < F) {  // the last few, through a zero-padded block of 8
      uint16_t g8[8] = {}, u8[8] = {}, o8[8];
      std::memcpy(g8, gate + f, (F - f) * sizeof(uint16_t));
      std::memcpy(u8, up + f, (F - f) * sizeof(uint16_t));
      store_bf16x8(o8, silu_times(load_bf16x8(g8), load_bf16x8(u8)));
      std::memcpy(op + r * F + f, o8, (F - f) * sizeof(uint16_t));
    }
  }
  return out;
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  return lane_attention::decode_attention<Lanes>(q, k, v, scale);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stream_read", &glm4v_kernels::stream_read, "read every byte of a tensor once (the bench's memory probe)");
  m.def("decode_block", &glm4v_kernels::decode_block, "one GLM-4 decoder layer of a decode step, the layer's kernels in one call");
  m.def("rms_norm", &glm4v_kernels::rms_norm, "RMSNorm of bf16 rows with a bf16 weight (decode steps)");
  m.def("rope", &glm4v_kernels::rope_bf16, "RoPE of a decode step's heads in bf16, rounded as torch's ops round");
  m.def("rope_into_cache", &glm4v_kernels::rope_into_cache, "a decode step's q rotated; its rotated keys and values written into the cache");
  m.def("swiglu", &swiglu, "silu(gate) * up of bf16 rows [gate | up], rounded as torch's ops round (decode steps)");
  m.def("decode_attention", &decode_attention, "softmax(q k^T * scale) v of a decode step's few tokens against the KV cache, grouped heads (AVX2)");
  m.def("bf16_gemv", &bf16_gemv, "x [M<=4, K] bf16 @ w[N, K]^T bf16 -> [M, N] bf16 (AVX2)");
  m.def("int8_gemv", &int8_gemv, "x [M<=4, K] @ (int8 w [N, K] * scale [N])^T (AVX2)");
  m.def("int4_gemv", &int4_gemv, "x [M<=4, K] @ int4 w^T, glm4v's 64-row block layout, group-wise scale/zero (AVX2)");
}
