// Decode-step matrix-vector products for CPUs with AVX512-BF16, AVX512-VNNI and AVX512-VBMI.
//
// A decode step multiplies 1-4 token rows by every weight of the model, so its speed is the speed
// at which the weights stream from memory. torch's bf16 F.linear at M = 1 reaches only 5-25 GB/s
// here (worst on the 4096 x 13696 down projection); the bf16 loop streams eight weight rows at a
// time (four for 3-4 token rows), multiplies them with VDPBF16PS (32 bf16 products per
// instruction, fp32 accumulation) and reaches the memory bandwidth. torch's int8 and int4
// kernels stop at ~75 % and ~55 % of it; the int8 and int4 loops here take their products in
// integers with VNNI (see each loop). Each thread
// takes a contiguous range of output rows (at::parallel_for: torch's own thread pool).
//
// Layouts are the ones glm4v stores (glm4v/quant.py):
//   bf16  w [N, K]
//   int8  w [N, K] int8, scale [N]                     w = code * scale
//   int4  w [N, K/2] uint8 in 64-row blocks: byte (k, j) of block b holds row 64b+j (low nibble) and
//         row 64b+32+j (high nibble) of column k; scales_zeros [K/g, N, 2]   w = (code - 8) * scale + zero
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <vector>

#include "cpu_common.h"
#include "cpu_lane_attention.h"

namespace {

using namespace glm4v_kernels;

constexpr int64_t kPrefetch = 512;  // elements ahead (1 KB per row) for the software prefetch

template <int M, int R>
void gemv_rows(const uint16_t* x, const uint16_t* w, float* out, int64_t K, int64_t N, int64_t n0, int rows) {
  __m512 acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  const uint16_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = w + (n0 + (r < rows ? r : 0)) * K;  // short tail: repeat row 0
  const int64_t K32 = K / 32 * 32;
  for (int64_t k = 0; k < K32; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(ahead_in_stream(row[r], k + kPrefetch, K, R), _MM_HINT_T0);
      wv[r] = (__m512bh)_mm512_loadu_si512(row[r] + k);
    }
    for (int m = 0; m < M; ++m) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  if (K32 < K) {
    const __mmask32 mask = (__mmask32)((1ull << (K - K32)) - 1);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, row[r] + K32);
    for (int m = 0; m < M; ++m) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + K32);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < rows; ++r) out[m * N + n0 + r] = _mm512_reduce_add_ps(acc[m][r]);
}

// ---- int8 -----------------------------------------------------------------------------------
// The activations are rounded once per call to int16 (one scale per row, as the AVX2 build does:
// finer than bf16 for the row's large values); 32 weights cost one sign-extending load and one
// VPDPWSSD per token row. The int32 sums move to fp32 every 4,096 columns, before they could
// overflow (64 steps x 2 x 127 x 32767 < 2^31).

constexpr int64_t kInt8Flush = 4096;

template <int M, int R>
void int8_rows(const int16_t* xq, const float* xscale, const int8_t* w, const void* scale, bool scale_bf16,
               float* out, int64_t K, int64_t N, int64_t n0, int rows) {
  __m512 sum[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) sum[m][r] = _mm512_setzero_ps();
  const int8_t* row[R];
  for (int r = 0; r < R; ++r) row[r] = w + (n0 + (r < rows ? r : 0)) * K;  // short tail: repeat row 0
  for (int64_t k0 = 0; k0 < K; k0 += kInt8Flush) {
    const int64_t k1 = std::min(K, k0 + kInt8Flush);
    __m512i acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_si512();
    for (int64_t k = k0; k < k1; k += 32) {
      // the last step of a row whose length is not a multiple of 32 reads only what is there
      const __mmask32 mask = k + 32 <= k1 ? ~__mmask32(0) : (__mmask32)((1ull << (k1 - k)) - 1);
      __m512i wv[R];
      for (int r = 0; r < R; ++r) {
        if ((k & 63) == 0) _mm_prefetch(ahead_in_stream(row[r], k + 1024, K, R), _MM_HINT_T0);
        wv[r] = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, row[r] + k));
      }
      for (int m = 0; m < M; ++m) {
        const __m512i xv = _mm512_maskz_loadu_epi16(mask, xq + m * K + k);
        for (int r = 0; r < R; ++r) acc[m][r] = _mm512_dpwssd_epi32(acc[m][r], wv[r], xv);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) sum[m][r] = _mm512_add_ps(sum[m][r], _mm512_cvtepi32_ps(acc[m][r]));
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < rows; ++r)
      out[m * N + n0 + r] = _mm512_reduce_add_ps(sum[m][r]) * xscale[m] * scalar_at(scale, scale_bf16, n0 + r);
}

// ---- int4 -----------------------------------------------------------------------------------
// Products in integers with VPDPBUSD: four unsigned bytes (the weight codes, 0..15) times four
// signed bytes (activations rounded to int8 per group, as llama.cpp's q8 blocks) summed into each
// int32 lane. So each lane must hold one weight row's codes for four consecutive columns. In the
// block layout a column's 32 bytes hold rows j (low nibble) and j + 32 (high nibble), so one
// 64-byte load is two columns; one VPERMT2B of two loads (four columns) gathers rows 0-15 into
// a vector, another rows 16-31. The low nibbles (AND 0x0F) are rows j, the high nibbles are left
// in place (AND 0xF0: 16 x the code, so the sum is exactly 16 x the dot product and a shift
// undoes it); the activations of four columns are one broadcast dword. Per group the int32 sums
// are folded in as x_scale * scale * sum + (zero - 8 * scale) * sum_k x_k.
//
// Why several blocks at once: one 64-row block is a single sequential stream, and one stream
// per thread read ~65 % of the memory bandwidth on a Xeon with AMX whatever the prefetch
// distance; reading four blocks' lines in turn (as the bf16 and int8 loops read several weight
// rows) reached ~90 % of it, 1.36-1.44x faster. Token rows share those registers, so fewer blocks
// go together when a step carries more rows.

constexpr int64_t kInt4Prefetch = 1024;  // bytes ahead in each block's stream

// byte (4l + i) of a gathered vector: column i of row l (idx_low) or row 16 + l (idx_high) of a
// pair of 64-byte loads, whose bytes 0-31 / 32-63 / 64-95 / 96-127 are columns 0 / 1 / 2 / 3
struct RowGather {
  __m512i low, high;
  RowGather() {
    alignas(64) uint8_t lo[64], hi[64];
    for (int l = 0; l < 16; ++l)
      for (int i = 0; i < 4; ++i) {
        lo[4 * l + i] = static_cast<uint8_t>(32 * i + l);
        hi[4 * l + i] = static_cast<uint8_t>(32 * i + 16 + l);
      }
    low = _mm512_load_si512(lo);
    high = _mm512_load_si512(hi);
  }
};

// (scale, zero) of 16 consecutive rows, stored interleaved as [s0 z0 s1 z1 ...] in bf16 or fp32.
inline void load_scales_zeros(const void* sz, bool sz_bf16, int64_t at, __m512& scale, __m512& zero) {
  if (sz_bf16) {
    const __m512i v = _mm512_loadu_si512(static_cast<const uint16_t*>(sz) + at);
    scale = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    zero = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  } else {
    const float* f = static_cast<const float*>(sz) + at;
    const __m512 a = _mm512_loadu_ps(f), b = _mm512_loadu_ps(f + 16);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    scale = _mm512_permutex2var_ps(a, even, b);
    zero = _mm512_permutex2var_ps(a, _mm512_add_epi32(even, _mm512_set1_epi32(1)), b);
  }
}

// M token rows times B consecutive 64-row blocks (block0 ..): out[m, 64 * block0 ...].
// acc[m][b][i] holds rows 16i .. 16i + 15 of block b: i = 0, 1 low nibbles, 2, 3 high.
template <int M, int B>
void int4_blocks(const int8_t* codes, const float* xscale, const float* xsum, const uint8_t* packed, const void* sz,
                 bool sz_bf16, float* out, int64_t K, int64_t N, int64_t block0, int64_t group,
                 const RowGather& gather) {
  const int64_t groups = K / group;
  const __m512i low_nibbles = _mm512_set1_epi8(0x0F), high_nibbles = _mm512_set1_epi8(static_cast<char>(0xF0));
  __m512 total[M][B][4];
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < 4; ++i) total[m][b][i] = _mm512_setzero_ps();
  const int64_t sz_row_bytes = sz_bf16 ? 4 : 8;
  for (int64_t gi = 0; gi < groups; ++gi) {
    // The next group's scales lie N rows further on, a page or more away: no stream the hardware
    // prefetcher follows, so without this each group's fold waited on memory (up to 5 % of the time).
    if (gi + 1 < groups) {
      const char* next = static_cast<const char*>(sz) + ((gi + 1) * N + block0 * 64) * sz_row_bytes;
      for (int64_t off = 0; off < B * 64 * sz_row_bytes; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
    }
    __m512i acc[M][B][4];
    for (int m = 0; m < M; ++m)
      for (int b = 0; b < B; ++b)
        for (int i = 0; i < 4; ++i) acc[m][b][i] = _mm512_setzero_si512();
    for (int64_t c = gi * group; c < (gi + 1) * group; c += 8) {
      __m512i x_low[M], x_high[M];  // columns c .. c+3 and c+4 .. c+7, one dword broadcast each
      for (int m = 0; m < M; ++m) {
        int32_t quad[2];
        std::memcpy(quad, codes + m * K + c, 8);
        x_low[m] = _mm512_set1_epi32(quad[0]);
        x_high[m] = _mm512_set1_epi32(quad[1]);
      }
      for (int b = 0; b < B; ++b) {
        const uint8_t* block = packed + (block0 + b) * K * 32;
        const uint8_t* col = block + c * 32;
        for (int line = 0; line < 4; ++line)
          _mm_prefetch(ahead_in_stream(block, c * 32 + kInt4Prefetch + 64 * line, K * 32, B), _MM_HINT_T0);
        const __m512i p = _mm512_loadu_si512(col), q = _mm512_loadu_si512(col + 64);
        const __m512i r = _mm512_loadu_si512(col + 128), s = _mm512_loadu_si512(col + 192);
        const __m512i first[2] = {_mm512_permutex2var_epi8(p, gather.low, q), _mm512_permutex2var_epi8(p, gather.high, q)};
        const __m512i second[2] = {_mm512_permutex2var_epi8(r, gather.low, s), _mm512_permutex2var_epi8(r, gather.high, s)};
        for (int h = 0; h < 2; ++h) {
          const __m512i w_first[2] = {_mm512_and_si512(first[h], low_nibbles), _mm512_and_si512(first[h], high_nibbles)};
          const __m512i w_second[2] = {_mm512_and_si512(second[h], low_nibbles), _mm512_and_si512(second[h], high_nibbles)};
          for (int m = 0; m < M; ++m)
            for (int n = 0; n < 2; ++n) {
              __m512i& a = acc[m][b][2 * n + h];
              a = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(a, w_first[n], x_low[m]), w_second[n], x_high[m]);
            }
        }
      }
    }
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < 4; ++i) {
        __m512 scale, zero;
        load_scales_zeros(sz, sz_bf16, (gi * N + (block0 + b) * 64 + 16 * i) * 2, scale, zero);
        const __m512 shift = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), scale, zero);  // zero - 8 * scale
        for (int m = 0; m < M; ++m) {
          const __m512i sum = i >= 2 ? _mm512_srai_epi32(acc[m][b][i], 4) : acc[m][b][i];  // exact: 16 | sum
          const __m512 dot = _mm512_mul_ps(_mm512_set1_ps(xscale[m * groups + gi]), _mm512_cvtepi32_ps(sum));
          const __m512 t = _mm512_fmadd_ps(shift, _mm512_set1_ps(xsum[m * groups + gi]), total[m][b][i]);
          total[m][b][i] = _mm512_fmadd_ps(scale, dot, t);
        }
      }
  }
  for (int m = 0; m < M; ++m)
    for (int b = 0; b < B; ++b)
      for (int i = 0; i < 4; ++i) _mm512_storeu_ps(out + m * N + (block0 + b) * 64 + 16 * i, total[m][b][i]);
}

// All 64-row blocks of the weight for M token rows: B at a time (B * M * 4 accumulators stay
// within the 32 registers with the weights), then the few left over one at a time.
template <int M>
void int4_all_blocks(const int8_t* codes, const float* xscale, const float* xsum, const uint8_t* packed,
                     const void* sz, bool sz_bf16, float* out, int64_t K, int64_t N, int64_t group) {
  constexpr int B = M == 1 ? 4 : M == 2 ? 2 : 1;
  const RowGather gather;
  const int64_t blocks = N / 64, runs = blocks / B;
  at::parallel_for(0, runs, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      int4_blocks<M, B>(codes, xscale, xsum, packed, sz, sz_bf16, out, K, N, r * B, group, gather);
  });
  for (int64_t b = runs * B; b < blocks; ++b)
    int4_blocks<M, 1>(codes, xscale, xsum, packed, sz, sz_bf16, out, K, N, b, group, gather);
}

// ---- int4 weights expanded for prefill-sized products ------------------------------------------
// W^T [K, n] (bf16 or fp32) of rows start .. stop - 1 of an int4 weight in glm4v's 64-row block
// layout: what QuantizedLinear multiplies a prefill or the vision tower with. Each block's byte
// (k, j) holds rows j and j + 32 of column k, so one column of a block is 64 consecutive numbers
// of W^T's row k. The numbers are those of the torch ops it replaces (quant.py,
// _expand_int4_transposed), bit for bit: shift = zero - 8 * scale in fp32, rounded to the output
// type, then shift + code * scale in fp32 (the product is exact, so fused or not), rounded to the
// output type. torch's ops write ~2 GB/s of bf16 on a Xeon (~100 ms of a 1,650-token prefill's
// ~580 ms gate/up product), this loop ~8 GB/s (~30 ms). GCC vector types: compiled for AVX2 (8
// lanes) the same code came out half scalar and 2x slower than torch's ops, so only this build
// has it.
template <typename Out>
inline void expand_int4_blocks(const uint8_t* packed, const void* sz, bool sz_bf16, int64_t K, int64_t N,
                               int64_t group, int64_t block0, int64_t blocks, int64_t n, Out* out) {
  constexpr bool kBf16 = std::is_same<Out, uint16_t>::value;
  constexpr int kLanes = 16;
  typedef uint8_t u8v __attribute__((vector_size(kLanes), aligned(1)));
  typedef int32_t i32v __attribute__((vector_size(4 * kLanes), aligned(4)));
  typedef float f32v __attribute__((vector_size(4 * kLanes), aligned(4)));
  // (bytes to int32 to float: GCC turns a direct byte-to-float conversion into scalar code)
  auto widen = [](u8v bytes) { return __builtin_convertvector(__builtin_convertvector(bytes, i32v), f32v); };
  auto to_out = [](float f) { return kBf16 ? bf16_to_float(float_to_bf16(f)) : f; };
  // One group of W^T's rows at a time across the thread's blocks: its writes then stay within
  // `group` rows (pages) at a time; a block at a time down all K rows wrote to a new page each row.
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    alignas(64) float scale[64], shift[64], row[64];
    for (int64_t k0 = 0; k0 < K; k0 += group) {
      for (int64_t b = b0; b < b1; ++b) {
        const uint8_t* block = packed + (block0 + b) * K * 32;
        for (int j = 0; j < 64; ++j) {
          const int64_t at = ((k0 / group) * N + (block0 + b) * 64 + j) * 2;
          const float s = scalar_at(sz, sz_bf16, at), z = scalar_at(sz, sz_bf16, at + 1);
          scale[j] = to_out(s);
          shift[j] = to_out(z - 8.f * s);
        }
        for (int64_t k = k0; k < k0 + group; ++k) {
          const uint8_t* column = block + k * 32;
          for (int j = 0; j < 32; j += kLanes) {
            u8v codes;
            std::memcpy(&codes, column + j, sizeof codes);
            f32v s_low, z_low, s_high, z_high;
            std::memcpy(&s_low, scale + j, sizeof s_low);
            std::memcpy(&z_low, shift + j, sizeof z_low);
            std::memcpy(&s_high, scale + 32 + j, sizeof s_high);
            std::memcpy(&z_high, shift + 32 + j, sizeof z_high);
            const f32v low = z_low + widen(codes & 15) * s_low;
            const f32v high = z_high + widen(codes >> 4) * s_high;
            std::memcpy(row + j, &low, sizeof low);
            std::memcpy(row + 32 + j, &high, sizeof high);
          }
          Out* dst = out + k * n + b * 64;
          if constexpr (kBf16) {
            store_bf16(row, dst, 64);
          } else {
            std::memcpy(dst, row, sizeof row);
          }
        }
      }
    }
  });
}

// ---- SwiGLU ---------------------------------------------------------------------------------
// silu(gate) * up for a decode step's rows with the model's two bf16 roundings (silu's result,
// then the product), as F.silu and the bf16 multiply round them. e^x here is within ~2 ulp of
// torch's (fp32), so a rare element of the product lands on the neighbouring bf16 value.

// e^x over the whole fp32 range: 2^n * e^r with |r| <= ln2 / 2, degree-7 Taylor; VSCALEFPS gives
// inf and 0 where 2^n leaves the range, as expf does.
inline __m512 exp_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

inline __m512 load_bf16x16(const uint16_t* p, __mmask16 mask) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

inline __m512 round_to_bf16(__m512 v) {  // fp32 -> nearest bf16 (ties to even) -> fp32
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

// ---- decode attention without AMX (Zen 4) ---------------------------------------------------
// cpu_lane_attention.h with 16 lanes: the 16 query rows of a block are one vector, and 16 keys or
// dimensions a pass give 16 independent sums (4 and 8 were 8-12 % and 4-7 % slower on a Xeon with AMX
// declined, 1,660 keys, 2 threads: the same sums in the same order, bit for bit the same result).
struct Lanes {
  using reg = __m512;
  static constexpr int kWidth = 16, kCols = 16;
  static reg zero() { return _mm512_setzero_ps(); }
  static reg broadcast_value(float f) { return _mm512_set1_ps(f); }
  static reg load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, reg v) { _mm512_storeu_ps(p, v); }
  static reg broadcast(const float* p) { return _mm512_set1_ps(*p); }
  static reg fma(reg a, reg b, reg c) { return _mm512_fmadd_ps(a, b, c); }
  static reg max(reg a, reg b) { return _mm512_max_ps(a, b); }
  static reg sub(reg a, reg b) { return _mm512_sub_ps(a, b); }
  static reg add(reg a, reg b) { return _mm512_add_ps(a, b); }
  static reg exp(reg x) { return exp_ps(x); }
  static reg load_bf16(const uint16_t* p) { return load_bf16x16(p, static_cast<__mmask16>(0xFFFF)); }
};

// ---- decode attention (AMX) -----------------------------------------------------------------
// softmax(q k^T * scale) v for a decode step's few query tokens against the KV cache. One task
// per (batch row, KV group, 16 query rows): the group's H/G heads x L tokens are the rows, as
// grouped_attention folds them. Why not SDPA: its flash kernel took 0.47-0.65 ms a layer for a
// 1,700-token GLM-4 cache whose lines the step's weights had pushed out to memory (0.18 ms with
// every buffer warm), a tenth of an int4 layer's time. Why AMX: AVX512-BF16 here does 32
// products per 1.8 ns, so the two products of 16 rows with a 1,700 x 128 cache take ~0.38 ms a
// core; an AMX tile product does 8,192 in ~16 cycles, and what is left is reading the cache.
//
// Pass 1: scores transposed, S^T = K Q^T, 16 keys at a time: the A tile is 16 key rows loaded
//   straight from the cache, the B tiles the query rows with pairs of dimensions side by side
//   (the VNNI layout), built once per task. Result rows are keys, columns query rows.
// Softmax: exp(s * scale - max) in fp32 (max and sum over keys, per query row: vertical in this
//   layout), rounded to bf16 for the product with V as the flash kernel does.
// Pass 2: O = P V, 32 keys at a time: A is P (query rows x keys), B interleaves the rows of two
//   keys (VPERMT2W) for 16 dimensions. Up to 4 dimension chunks stay in tiles over all keys.
// Products are bf16 x bf16 summed in fp32 as in SDPA (which uses AMX here too); only the
// summation order differs.

constexpr int kTileRows = 16;

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0 .. tiles - 1 configured as 16 rows x 64 bytes for the scope's life. Whatever
// configuration torch's own AMX kernels left on this thread is put back at the end, so that a
// caller which cached it does not run its next product unconfigured.
struct TileScope {
  TileConfig before;
  __attribute__((target("amx-tile"))) explicit TileScope(int tiles) {
    _tile_storeconfig(&before);
    TileConfig config;
    for (int t = 0; t < tiles; ++t) {
      config.colsb[t] = 64;
      config.rows[t] = kTileRows;
    }
    _tile_loadconfig(&config);
  }
  __attribute__((target("amx-tile"))) ~TileScope() {
    if (before.palette == 0)
      _tile_release();
    else
      _tile_loadconfig(&before);
  }
};

// VNNI pairs of two fp32 rows rounded to bf16: word 2r from e0[r], 2r + 1 from e1[r]. The
// permutation is taken once per loop (pair_order()), not rebuilt per pair.
inline __m512i pair_order() {
  return _mm512_setr_epi32(0x00100000, 0x00110001, 0x00120002, 0x00130003, 0x00140004, 0x00150005, 0x00160006,
                           0x00170007, 0x00180008, 0x00190009, 0x001A000A, 0x001B000B, 0x001C000C, 0x001D000D,
                           0x001E000E, 0x001F000F);
}
inline __m512i bf16_pairs(__m512i order, __m512 e0, __m512 e1) {
  return _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(e1, e0));
}

// Linux hands out the AMX tile state only on request (once per process).
// GLM4V_NO_AMX=1 declines it, as on a CPU without AMX (how the tests reach the Zen 4 path here).
bool amx_ready() {
  static const bool ready = [] {
    const char* declined = std::getenv("GLM4V_NO_AMX");
    if (declined != nullptr && declined[0] != '\0' && std::strcmp(declined, "0") != 0) return false;
    constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return ready;
}

// What one task leaves for the merge: per query row the largest score, the sum of exp(score -
// that maximum), and the values weighted by those exponentials, o[c][r][16] (not yet divided).
struct AttentionPart {
  float* o;
  float top[kTileRows];
  float total[kTileRows];
};

// Keys t_begin .. t_end - 1 of one (batch row, group, 16 query rows).
__attribute__((target("amx-tile,amx-bf16")))
void attention_part(const uint16_t* q, const uint16_t* k, const uint16_t* v, const AttentionShape& a, int64_t b,
                    int64_t g, int64_t row0, int rows, int64_t t_begin, int64_t t_end, AttentionPart& part) {
  const int64_t T = t_end - t_begin, D = a.D, dword_cols = D / 2, T32 = (T + 31) / 32 * 32;
  const TileScope tiles(6);

  thread_local std::vector<uint32_t> qpair_keep, pmat_keep, vpair_keep;
  thread_local std::vector<float> s_keep;
  thread_local std::vector<uint16_t> ktail_keep;
  // B of pass 1: qpair[p][r] = (q[r][2p], q[r][2p + 1]); lanes past `rows` stay 0
  qpair_keep.assign(dword_cols * kTileRows, 0u);
  uint32_t* qpair = qpair_keep.data();
  for (int r = 0; r < rows; ++r) {
    const int64_t row = row0 + r, h = g * a.rep + row / a.L, l = row % a.L;
    const auto* qrow = reinterpret_cast<const uint32_t*>(q + b * a.q_b + h * a.q_h + l * a.q_l);
    for (int64_t p = 0; p < dword_cols; ++p) qpair[p * kTileRows + r] = qrow[p];
  }
  const uint16_t* kg = k + b * a.k_b + g * a.k_g + t_begin * a.k_t;
  const uint16_t* vg = v + b * a.v_b + g * a.v_g + t_begin * a.v_t;

  // pass 1: s[t][r], t < T (16-key blocks; the last one from a zero-padded copy)
  s_keep.resize((T + kTileRows) * kTileRows);
  float* s = s_keep.data();
  ktail_keep.assign(kTileRows * D, 0);
  for (int64_t t0 = 0; t0 < T; t0 += kTileRows) {
    const uint16_t* block = kg + t0 * a.k_t;
    int64_t stride = a.k_t * 2;
    if (T - t0 < kTileRows) {
      for (int64_t t = t0; t < T; ++t) std::memcpy(ktail_keep.data() + (t - t0) * D, kg + t * a.k_t, D * 2);
      block = ktail_keep.data();
      stride = D * 2;
    }
    // The hardware prefetcher does not run ahead of tile loads: keys are fetched kKeysAhead
    // ahead, and the values (read in pass 2) into L2 meanwhile, so both come at the bandwidth.
    constexpr int64_t kKeysAhead = 4 * kTileRows;
    for (int64_t t = t0 + kKeysAhead; t < std::min(T, t0 + kKeysAhead + kTileRows); ++t)
      for (int64_t off = 0; off < D * 2; off += 64) {
        _mm_prefetch(reinterpret_cast<const char*>(kg + t * a.k_t) + off, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(vg + t * a.v_t) + off, _MM_HINT_T1);
      }
    _tile_zero(0);
    for (int64_t d0 = 0; d0 < D; d0 += 32) {
      _tile_loadd(1, block + d0, stride);
      _tile_loadd(2, qpair + d0 / 2 * kTileRows, 64);
      _tile_dpbf16ps(0, 1, 2);
    }
    _tile_stored(0, s + t0 * kTileRows, 64);
  }

  // softmax over keys per query row (lanes); P as A tiles: pmat[r][t / 2] = (p[t][r], p[t + 1][r])
  const __m512 scale = _mm512_set1_ps(a.scale);
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < T; ++t) top = _mm512_max_ps(top, _mm512_mul_ps(_mm512_loadu_ps(s + t * kTileRows), scale));
  __m512 total = _mm512_setzero_ps();
  pmat_keep.assign(kTileRows * T32 / 2, 0u);
  uint32_t* pmat = pmat_keep.data();
  alignas(64) uint32_t pairs[kTileRows];
  const __m512i order = pair_order();
  for (int64_t t = 0; t < T; t += 2) {
    const __m512 e0 = exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + t * kTileRows), scale, top));
    const __m512 e1 = t + 1 < T ? exp_ps(_mm512_fmsub_ps(_mm512_loadu_ps(s + (t + 1) * kTileRows), scale, top))
                                : _mm512_setzero_ps();
    total = _mm512_add_ps(total, _mm512_add_ps(e0, e1));
    _mm512_store_si512(pairs, bf16_pairs(order, e0, e1));  // (e[t][r], e[t + 1][r]) side by side
    for (int r = 0; r < kTileRows; ++r) pmat[r * (T32 / 2) + t / 2] = pairs[r];
  }
  _mm512_storeu_ps(part.top, top);
  _mm512_storeu_ps(part.total, total);

  // pass 2: o[c][r][16 dims] for dimension chunks of 16, four chunks (tiles 0-3) per sweep
  const int64_t chunks = (D + 15) / 16;
  float* o = part.o;
  vpair_keep.resize(4 * kTileRows * 16);
  uint32_t* vpair = vpair_keep.data();
  // (v[t][d], v[t + 1][d]) for 16 dimensions
  const __m512i pair_words = _mm512_setr_epi32(0x00200000, 0x00210001, 0x00220002, 0x00230003, 0x00240004, 0x00250005,
                                               0x00260006, 0x00270007, 0x00280008, 0x00290009, 0x002A000A, 0x002B000B,
                                               0x002C000C, 0x002D000D, 0x002E000E, 0x002F000F);
  for (int64_t c0 = 0; c0 < chunks; c0 += 4) {
    const int width = static_cast<int>(std::min<int64_t>(4, chunks - c0));
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t t0 = 0; t0 < T; t0 += 32) {
      for (int w = 0; w < width; ++w) {
        const int64_t d0 = (c0 + w) * 16;
        const __mmask16 dmask = D - d0 >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (D - d0)) - 1);
        for (int pr = 0; pr < kTileRows; ++pr) {
          const int64_t t = t0 + 2 * pr;
          const __m256i a0 = t < T ? _mm256_maskz_loadu_epi16(dmask, vg + t * a.v_t + d0) : _mm256_setzero_si256();
          const __m256i a1 = t + 1 < T ? _mm256_maskz_loadu_epi16(dmask, vg + (t + 1) * a.v_t + d0) : _mm256_setzero_si256();
          _mm512_storeu_si512(vpair + (w * kTileRows + pr) * 16,
                              _mm512_permutex2var_epi16(_mm512_castsi256_si512(a0), pair_words, _mm512_castsi256_si512(a1)));
        }
      }
      _tile_loadd(4, pmat + t0 / 2, T32 * 2);
      _tile_loadd(5, vpair, 64);
      _tile_dpbf16ps(0, 4, 5);
      if (width > 1) {
        _tile_loadd(5, vpair + kTileRows * 16, 64);
        _tile_dpbf16ps(1, 4, 5);
      }
      if (width > 2) {
        _tile_loadd(5, vpair + 2 * kTileRows * 16, 64);
        _tile_dpbf16ps(2, 4, 5);
      }
      if (width > 3) {
        _tile_loadd(5, vpair + 3 * kTileRows * 16, 64);
        _tile_dpbf16ps(3, 4, 5);
      }
    }
    _tile_stored(0, o + c0 * kTileRows * 16, 64);
    if (width > 1) _tile_stored(1, o + (c0 + 1) * kTileRows * 16, 64);
    if (width > 2) _tile_stored(2, o + (c0 + 2) * kTileRows * 16, 64);
    if (width > 3) _tile_stored(3, o + (c0 + 3) * kTileRows * 16, 64);
  }
}

// The parts of one (batch row, group, 16 query rows) over consecutive key ranges -> the output
// rows: each part's sums rescaled to the largest maximum (flash-decoding's merge), divided by the
// total, rounded to bf16. With one part this is o / total, as a single pass gives.
void merge_parts(const AttentionPart* parts, int64_t count, const AttentionShape& a, int64_t b, int64_t g, int64_t row0,
                 int rows, int64_t H, uint16_t* out) {
  const int64_t D = a.D, chunks = (D + 15) / 16;
  for (int r = 0; r < rows; ++r) {
    float top = -INFINITY;
    for (int64_t p = 0; p < count; ++p) top = std::max(top, parts[p].top[r]);
    float weight[64], total = 0.f;
    for (int64_t p = 0; p < count; ++p) {
      weight[p] = count == 1 ? 1.f : std::exp(parts[p].top[r] - top);
      total += weight[p] * parts[p].total[r];
    }
    const float inverse = 1.f / total;
    const int64_t row = row0 + r, h = g * a.rep + row / a.L, l = row % a.L;
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t d0 = c * 16;
      const __mmask16 dmask = D - d0 >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (D - d0)) - 1);
      __m512 sum = _mm512_loadu_ps(parts[0].o + (c * kTileRows + r) * 16);
      if (count > 1) {
        sum = _mm512_mul_ps(sum, _mm512_set1_ps(weight[0]));
        for (int64_t p = 1; p < count; ++p)
          sum = _mm512_fmadd_ps(_mm512_loadu_ps(parts[p].o + (c * kTileRows + r) * 16), _mm512_set1_ps(weight[p]), sum);
      }
      uint16_t* dst = out + (b * a.L + l) * H * D + h * D + d0;
      _mm256_mask_storeu_epi16(dst, dmask, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(sum, _mm512_set1_ps(inverse))));
    }
  }
}


// ---- vision attention (AMX) -----------------------------------------------------------------
// softmax(q k^T * scale) v over every token of an image (the vision tower: 6,401 tokens, 16 heads
// of 112, no mask), fused as flash attention does: the scores of a 64-query x 512-key block live
// only in L2. Why not SDPA: its flash kernel (AMX products, fp32 softmax) runs the two products
// and the softmax one after the other, and took ~45 % of a vision layer's time at ~750 GFLOP/s,
// a third of the matmul peak. Here the tile unit and the vector unit work at once: the
// exponentials of block n are computed between the tile products of block n + 1's scores, and the
// maxima of block n + 1 between those of block n's P V product (docs/PERFORMANCE.md has the A/B).
//
// Layouts, all transposed so that each query is one vector lane and each tile is contiguous:
//   keys  A tiles [T/16][D/32][16 keys][32 dims]; values V^T A tiles [T/32][D/16][16 dims][32 keys]
//   (packed once per KV head, zero padded); queries Q^T B tiles [4][D/32][16 dim pairs][16 queries].
//   S^T = K Q^T: C tiles [keys][queries] fp32, so the softmax runs down the keys, one lane a query.
//   P^T: B tiles [key pairs][queries] bf16 pairs (VNNI), O^T += V^T P^T: C tiles [dims][queries].
// Maxima are raised lazily: only where a block's maximum exceeds the running one by 2^8, so the
// exponentials stay below 2^8 and rescaling O (a pass over it) is rare after the first block. P is
// rounded to bf16 for its product, as SDPA's kernel does; sums are fp32.

// 2^x for finite x: 2^n * 2^r, |r| <= 1/2, degree-6 Taylor (error ~1e-7); VSCALEFPS gives 0 below the range.
inline __m512 exp2_ps(__m512 x) {
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3333558146428443e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.618129107628477e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.550410866482158e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.24022650695910072f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.6931471805599453f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

constexpr int64_t kFlashQueries = 64, kFlashQueryTiles = kFlashQueries / kTileRows, kFlashKeys = 512;
constexpr float kLazyMax = 8.f;  // log2 units

struct FlashShape {
  int64_t B, H, G, L, T, D, rep;
  int64_t q_b, q_h, q_l, k_b, k_g, k_t, v_b, v_g, v_t;
  int64_t key_chunks, value_tiles;  // D / 32 and D / 16, rounded up
  float scale_log2;                 // scale * log2(e): exponentials as powers of 2
};

// row t of query tile j in the score block s, and the P^T row of the key pair (t, t + 1)
inline const float* score_row(const float* s, int64_t j, int64_t t) {
  return s + ((t >> 4) * kFlashQueryTiles + j) * 256 + (t & 15) * 16;
}
inline uint32_t* p_row(uint32_t* pt, int64_t j, int64_t t) {
  return pt + ((t >> 5) * kFlashQueryTiles + j) * 256 + ((t & 31) >> 1) * 16;
}

// Exponentials of one score block, a step (two keys of one query tile) at a time, resumable: the
// score products of the next block call it between their tile products.
struct BlockSoftmax {
  const float* s;
  uint32_t* pt;
  const float* m;  // running maxima (log2 units)
  float* l;        // running sums
  int64_t keys, pairs;  // valid keys; key pairs written (a multiple of 16: the zero tail of the last tile)
  __m512 scale_log2;
  __m512i order = pair_order();
  mutable int64_t j = 0, t = 0;
  inline void run(int64_t steps) const {
    for (; steps > 0 && j < kFlashQueryTiles; --steps) {
      const __m512 mj = _mm512_loadu_ps(m + 16 * j);
      const __mmask16 v0 = t < keys ? 0xFFFF : 0, v1 = t + 1 < keys ? 0xFFFF : 0;
      const __m512 e0 = _mm512_maskz_mov_ps(v0, exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(score_row(s, j, t)), scale_log2, mj)));
      const __m512 e1 = _mm512_maskz_mov_ps(v1, exp2_ps(_mm512_fmsub_ps(_mm512_loadu_ps(score_row(s, j, t + 1)), scale_log2, mj)));
      _mm512_storeu_ps(l + 16 * j, _mm512_add_ps(_mm512_loadu_ps(l + 16 * j), _mm512_add_ps(e0, e1)));
      _mm512_storeu_si512(p_row(pt, j, t), bf16_pairs(order, e0, e1));
      t += 2;
      if (t == 2 * pairs) t = 0, ++j;
    }
  }
};

// The largest score per query lane of one block, four keys a step, resumable (the P V product of
// the previous block calls it).
struct BlockMax {
  const float* s;
  float* top;
  int64_t keys;
  mutable int64_t j = 0, t = 0;
  inline void run(int64_t steps) const {
    for (; steps > 0 && j < kFlashQueryTiles && keys > 0; --steps) {
      __m512 x = _mm512_loadu_ps(score_row(s, j, t));
      if (t + 4 <= keys) {
        x = _mm512_max_ps(_mm512_max_ps(x, _mm512_loadu_ps(score_row(s, j, t + 1))),
                          _mm512_max_ps(_mm512_loadu_ps(score_row(s, j, t + 2)), _mm512_loadu_ps(score_row(s, j, t + 3))));
        t += 4;
      } else {
        t += 1;
      }
      _mm512_storeu_ps(top + 16 * j, _mm512_max_ps(_mm512_loadu_ps(top + 16 * j), x));
      if (t >= keys) t = 0, ++j;
    }
  }
};

// S^T of one key block (32 key rows x 32 queries per four tile products) into s; `softmax`, when
// given, advances between the products.
__attribute__((target("amx-tile,amx-bf16")))
void block_scores(const uint16_t* kblock, const uint32_t* qt, float* s, int64_t tiles32, int64_t chunks,
                  const BlockSoftmax* softmax, int64_t steps) {
  const int64_t calls = tiles32 * (kFlashQueryTiles / 2) * chunks, per_call = (steps + calls - 1) / calls;
  for (int64_t i2 = 0; i2 < tiles32; ++i2)
    for (int64_t jp = 0; jp < kFlashQueryTiles / 2; ++jp) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t c = 0; c < chunks; ++c) {
        _tile_loadd(4, kblock + ((2 * i2) * chunks + c) * 512, 64);
        _tile_loadd(5, kblock + ((2 * i2 + 1) * chunks + c) * 512, 64);
        _tile_loadd(6, qt + ((2 * jp) * chunks + c) * 256, 64);
        _tile_loadd(7, qt + ((2 * jp + 1) * chunks + c) * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        if (softmax != nullptr) softmax->run(per_call);
      }
      _tile_stored(0, s + ((2 * i2) * kFlashQueryTiles + 2 * jp) * 256, 64);
      _tile_stored(1, s + ((2 * i2) * kFlashQueryTiles + 2 * jp + 1) * 256, 64);
      _tile_stored(2, s + ((2 * i2 + 1) * kFlashQueryTiles + 2 * jp) * 256, 64);
      _tile_stored(3, s + ((2 * i2 + 1) * kFlashQueryTiles + 2 * jp + 1) * 256, 64);
    }
  if (softmax != nullptr) softmax->run(steps);
}

// O^T += V^T P^T for one key block: two dimension tiles x two query tiles at a time, an odd last
// dimension tile x all four query tiles; `next_max` advances between the products.
__attribute__((target("amx-tile,amx-bf16")))
void block_values(const uint16_t* vblock, const uint32_t* pt, float* o, int64_t tiles32, int64_t value_tiles,
                  const BlockMax& next_max) {
  constexpr int64_t QT = kFlashQueryTiles;
  const int64_t DT = value_tiles;
  const int64_t calls = (DT / 2 * (QT / 2) + DT % 2 * (QT / 4)) * tiles32;
  const int64_t per_call = (QT * (kFlashKeys / 4 + 3) + calls - 1) / calls;
  for (int64_t dp = 0; dp + 1 < DT; dp += 2)
    for (int64_t jp = 0; jp < QT / 2; ++jp) {
      float* o0 = o + (dp * QT + 2 * jp) * 256;
      float* o1 = o + ((dp + 1) * QT + 2 * jp) * 256;
      _tile_loadd(0, o0, 64);
      _tile_loadd(1, o0 + 256, 64);
      _tile_loadd(2, o1, 64);
      _tile_loadd(3, o1 + 256, 64);
      for (int64_t kc = 0; kc < tiles32; ++kc) {
        _tile_loadd(4, vblock + (kc * DT + dp) * 512, 64);
        _tile_loadd(5, vblock + (kc * DT + dp + 1) * 512, 64);
        _tile_loadd(6, pt + (kc * QT + 2 * jp) * 256, 64);
        _tile_loadd(7, pt + (kc * QT + 2 * jp + 1) * 256, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        next_max.run(per_call);
      }
      _tile_stored(0, o0, 64);
      _tile_stored(1, o0 + 256, 64);
      _tile_stored(2, o1, 64);
      _tile_stored(3, o1 + 256, 64);
    }
  for (int64_t jq = 0; DT % 2 && jq < QT; jq += 4) {
    float* o0 = o + ((DT - 1) * QT + jq) * 256;
    _tile_loadd(0, o0, 64);
    _tile_loadd(1, o0 + 256, 64);
    _tile_loadd(2, o0 + 512, 64);
    _tile_loadd(3, o0 + 768, 64);
    for (int64_t kc = 0; kc < tiles32; ++kc) {
      _tile_loadd(4, vblock + (kc * DT + DT - 1) * 512, 64);
      _tile_loadd(5, pt + (kc * QT + jq) * 256, 64);
      _tile_loadd(6, pt + (kc * QT + jq + 1) * 256, 64);
      _tile_loadd(7, pt + (kc * QT + jq + 2) * 256, 64);
      _tile_dpbf16ps(0, 4, 5);
      _tile_dpbf16ps(1, 4, 6);
      _tile_loadd(5, pt + (kc * QT + jq + 3) * 256, 64);
      _tile_dpbf16ps(2, 4, 7);
      _tile_dpbf16ps(3, 4, 5);
      next_max.run(per_call);
    }
    _tile_stored(0, o0, 64);
    _tile_stored(1, o0 + 256, 64);
    _tile_stored(2, o0 + 512, 64);
    _tile_stored(3, o0 + 768, 64);
  }
  next_max.run(INT64_MAX);
}

// Keys kc * 32 .. + 31 of KV head (b, g) into their A tiles: keys as they are, values transposed
// (V^T), both zero past T and D. A whole values tile takes its dimension pairs by gathers.
void pack_keys_values(const void* k_data, const void* v_data, const FlashShape& a, int64_t b, int64_t g, int64_t kc,
                      uint16_t* kpack, uint16_t* vpack) {
  const int64_t chunks = a.key_chunks, DT = a.value_tiles;
  const auto* kg = static_cast<const uint16_t*>(k_data) + b * a.k_b + g * a.k_g;
  const auto* vg = static_cast<const uint16_t*>(v_data) + b * a.v_b + g * a.v_g;
  for (int64_t t = 32 * kc; t < 32 * kc + 32; ++t)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t width = t < a.T ? std::min<int64_t>(32, a.D - 32 * c) : 0;
      const __mmask32 mask = width >= 32 ? ~0u : (1u << width) - 1;
      _mm512_storeu_si512(kpack + ((t >> 4) * chunks + c) * 512 + (t & 15) * 32,
                          _mm512_maskz_loadu_epi16(mask, mask ? kg + t * a.k_t + 32 * c : kg));
    }
  // word i of row d: word 2i of the first 16 keys' (d, d + 1) pairs, then of the next 16's; row d + 1 the odd words
  alignas(64) static const uint16_t even_words[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20,
                                                      22, 24, 26, 28, 30, 32, 34, 36, 38, 40, 42,
                                                      44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
  const __m512i even = _mm512_load_si512(even_words), odd = _mm512_add_epi16(even, _mm512_set1_epi16(1));
  const __m512i key_offsets = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                 _mm512_set1_epi32(static_cast<int>(a.v_t)));
  const bool whole_keys = 32 * kc + 32 <= a.T && 16 * a.v_t < (int64_t{1} << 30);
  for (int64_t dt = 0; dt < DT; ++dt) {
    uint16_t* tile = vpack + (kc * DT + dt) * 512;
    if (whole_keys && 16 * dt + 16 <= a.D) {
      for (int64_t d = 0; d < 16; d += 2) {
        const uint16_t* column = vg + 32 * kc * a.v_t + 16 * dt + d;
        const __m512i first = _mm512_i32gather_epi32(key_offsets, column, 2);
        const __m512i second = _mm512_i32gather_epi32(key_offsets, column + 16 * a.v_t, 2);
        _mm512_storeu_si512(tile + d * 32, _mm512_permutex2var_epi16(first, even, second));
        _mm512_storeu_si512(tile + (d + 1) * 32, _mm512_permutex2var_epi16(first, odd, second));
      }
      continue;
    }
    for (int64_t d = 0; d < 16; ++d)
      for (int64_t t = 0; t < 32; ++t) {
        const int64_t key = 32 * kc + t, dim = 16 * dt + d;
        tile[d * 32 + t] = key < a.T && dim < a.D ? vg[key * a.v_t + dim] : 0;
      }
  }
}

// 64 query rows q0 .. of head h against every key of its KV head (packed), written to out [B, L, H D].
__attribute__((target("amx-tile,amx-bf16")))
void flash_task(const uint16_t* q, const uint16_t* kpack, const uint16_t* vpack, const FlashShape& a, int64_t b,
                int64_t h, int64_t q0, uint16_t* out) {
  constexpr int64_t QT = kFlashQueryTiles, KB = kFlashKeys;
  const int64_t rows = std::min(kFlashQueries, a.L - q0), chunks = a.key_chunks, DT = a.value_tiles;
  thread_local std::vector<uint32_t> qt_keep, pt_keep;
  thread_local std::vector<float> s_keep, o_keep;
  qt_keep.assign(QT * chunks * 256, 0u);
  uint32_t* qt = qt_keep.data();
  for (int64_t n = 0; n < rows; ++n) {
    const auto* qrow = reinterpret_cast<const uint32_t*>(q + b * a.q_b + h * a.q_h + (q0 + n) * a.q_l);
    for (int64_t p = 0; p < a.D / 2; ++p) qt[((n >> 4) * chunks + p / 16) * 256 + (p % 16) * 16 + (n & 15)] = qrow[p];
  }
  s_keep.resize(2 * KB * kFlashQueries);
  pt_keep.resize(KB / 2 * kFlashQueries);
  o_keep.assign(DT * 16 * kFlashQueries, 0.f);
  float* s_buf[2] = {s_keep.data(), s_keep.data() + KB * kFlashQueries};
  uint32_t* pt = pt_keep.data();
  float* o = o_keep.data();
  alignas(64) float m[kFlashQueries], l[kFlashQueries], top[kFlashQueries];
  std::fill(m, m + kFlashQueries, -INFINITY);
  std::fill(l, l + kFlashQueries, 0.f);
  std::fill(top, top + kFlashQueries, -INFINITY);

  const TileScope tiles(8);

  const __m512 scale_log2 = _mm512_set1_ps(a.scale_log2);
  const int64_t blocks = (a.T + KB - 1) / KB;
  auto keys_in = [&](int64_t blk) { return blk < blocks ? std::min(KB, a.T - blk * KB) : 0; };
  block_scores(kpack, qt, s_buf[0], (keys_in(0) + 31) / 32, chunks, nullptr, 0);
  BlockMax{s_buf[0], top, keys_in(0)}.run(INT64_MAX);
  for (int64_t blk = 0; blk < blocks; ++blk) {
    const int64_t keys = keys_in(blk), tiles32 = (keys + 31) / 32;
    for (int64_t j = 0; j < QT; ++j) {
      const __m512 block_top = _mm512_mul_ps(_mm512_loadu_ps(top + 16 * j), scale_log2);
      const __m512 mj = _mm512_loadu_ps(m + 16 * j);
      const __mmask16 raise = _mm512_cmp_ps_mask(block_top, _mm512_add_ps(mj, _mm512_set1_ps(kLazyMax)), _CMP_GT_OQ);
      if (raise) {  // sums so far scaled by 2^(old - new); none yet where the old maximum is -inf
        const __m512 mnew = _mm512_mask_mov_ps(mj, raise, block_top);
        const __mmask16 seen = _mm512_cmp_ps_mask(mj, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ);
        const __m512 alpha = _mm512_maskz_mov_ps(seen, exp2_ps(_mm512_maskz_sub_ps(seen, mj, mnew)));
        _mm512_storeu_ps(l + 16 * j, _mm512_mul_ps(_mm512_loadu_ps(l + 16 * j), alpha));
        for (int64_t d = 0; d < DT * 16; ++d) {
          float* od = o + ((d >> 4) * QT + j) * 256 + (d & 15) * 16;
          _mm512_storeu_ps(od, _mm512_mul_ps(_mm512_loadu_ps(od), alpha));
        }
        _mm512_storeu_ps(m + 16 * j, mnew);
      }
      _mm512_storeu_ps(top + 16 * j, _mm512_set1_ps(-INFINITY));
    }
    const BlockSoftmax softmax{s_buf[blk & 1], pt, m, l, keys, tiles32 * 16, scale_log2};
    const int64_t steps = QT * tiles32 * 16;
    if (blk + 1 < blocks)
      block_scores(kpack + (blk + 1) * KB * chunks * 32, qt, s_buf[(blk + 1) & 1], (keys_in(blk + 1) + 31) / 32,
                   chunks, &softmax, steps);
    else
      softmax.run(steps);
    block_values(vpack + blk * KB * DT * 16, pt, o, tiles32, DT, BlockMax{s_buf[(blk + 1) & 1], top, keys_in(blk + 1)});
  }

  // out[q][h D + d] = O^T[d][q] / l[q], a query row at a time (a gather down each dimension tile)
  const int64_t HD = a.H * a.D;
  const __m512i down = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
  for (int64_t n = 0; n < rows; ++n) {
    const __m512 inverse = _mm512_set1_ps(1.f / l[n]);
    uint16_t* dst = out + (b * a.L + q0 + n) * HD + h * a.D;
    for (int64_t dt = 0; dt < DT; ++dt) {
      const __m512 column = _mm512_i32gather_ps(down, o + (dt * QT + (n >> 4)) * 256 + (n & 15), 4);
      const int64_t width = std::min<int64_t>(16, a.D - 16 * dt);
      _mm256_mask_storeu_epi16(dst + 16 * dt, static_cast<__mmask16>((1u << width) - 1),
                               (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(column, inverse)));
    }
  }
}

}  // namespace

// x [M, K] bf16 (1 <= M <= 4), w [N, K] bf16 contiguous -> [M, N] bf16 (fp32 accumulation).
torch::Tensor bf16_gemv(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16, "bf16_gemv: bf16 tensors only");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "bf16_gemv: CPU tensors only");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "bf16_gemv: shapes [M, K] and [N, K]");
  TORCH_CHECK(w.is_contiguous(), "bf16_gemv: the weight must be contiguous");
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), K = xc.size(1), N = w.size(0);
  TORCH_CHECK(M >= 1 && M <= 4, "bf16_gemv: 1 to 4 rows");
  Products out(M, N, xc);
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* op = out.data;
  by_rows((int)M, [&](auto m_rows) {
    constexpr int Mr = decltype(m_rows)::value;
    constexpr int R = Mr <= 2 ? 8 : 4;  // weight rows streamed together; accumulators M x R within the registers
    const int64_t blocks = (N + R - 1) / R;
    at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * R;
        gemv_rows<Mr, R>(xp, wp, op, K, N, n0, (int)std::min<int64_t>(R, N - n0));
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
    constexpr int R = Mr <= 2 ? 8 : 4;  // accumulators (2 x M x R) and weights stay within 32 registers
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
  check_int4(x, packed, scales_zeros, group, 8, sz_bf16);
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  const auto xc = x.contiguous();
  const int64_t M = xc.size(0), groups = K / group;
  thread_local std::vector<float> widened, stats;
  thread_local std::vector<int8_t> codes_keep;
  codes_keep.resize(M * K);
  stats.resize(2 * M * groups);
  float* xscale = stats.data();
  float* xsum = xscale + M * groups;
  const int8_t* codes = codes_keep.data();
  quantize_groups_int8(float_rows(xc, widened), M, K, group, codes_keep.data(), xscale, xsum);
  Products out(M, N, xc);
  float* op = out.data;
  const auto* wp = packed.data_ptr<uint8_t>();
  const void* szp = scales_zeros.data_ptr();
  by_rows((int)M, [&](auto m_rows) {
    constexpr int Mr = decltype(m_rows)::value;
    int4_all_blocks<Mr>(codes, xscale, xsum, wp, szp, sz_bf16, op, K, N, group);
  });
  return out.finish();
}

// packed [N, K/2] uint8 (64-row blocks), scales_zeros [K/g, N, 2] -> out_kn [K, stop - start] bf16 or
// fp32: W^T of rows start .. stop - 1 (whole blocks), as expand_int4_blocks computes it.
void int4_expand_t(torch::Tensor packed, torch::Tensor scales_zeros, int64_t group, int64_t start, int64_t stop,
                   torch::Tensor out_kn) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.device().is_cpu() && packed.dim() == 2 && packed.is_contiguous(),
              "int4_expand_t: packed must be a contiguous uint8 CPU [N, K/2]");
  const int64_t N = packed.size(0), K = packed.size(1) * 2, n = stop - start;
  TORCH_CHECK(group > 0 && K % group == 0 && N % 64 == 0, "int4_expand_t: K a multiple of the group size, N of 64");
  TORCH_CHECK(start >= 0 && start < stop && stop <= N && start % 64 == 0 && stop % 64 == 0,
              "int4_expand_t: rows start .. stop in whole 64-row blocks");
  const bool sz_bf16 = scales_are_bf16(scales_zeros, "int4_expand_t");
  TORCH_CHECK(scales_zeros.dim() == 3 && scales_zeros.size(0) == K / group && scales_zeros.size(1) == N &&
                  scales_zeros.size(2) == 2, "int4_expand_t: scales_zeros must be [K/group, N, 2]");
  TORCH_CHECK(out_kn.device().is_cpu() && out_kn.is_contiguous() && out_kn.dim() == 2 && out_kn.size(0) == K &&
                  out_kn.size(1) == n, "int4_expand_t: out must be a contiguous CPU [K, stop - start]");
  const auto* pp = packed.data_ptr<uint8_t>();
  const void* szp = scales_zeros.data_ptr();
  if (out_kn.scalar_type() == at::kBFloat16) {
    expand_int4_blocks(pp, szp, sz_bf16, K, N, group, start / 64, n / 64, n, reinterpret_cast<uint16_t*>(out_kn.data_ptr()));
  } else {
    TORCH_CHECK(out_kn.scalar_type() == at::kFloat, "int4_expand_t: out must be bf16 or float32");
    expand_int4_blocks(pp, szp, sz_bf16, K, N, group, start / 64, n / 64, n, out_kn.data_ptr<float>());
  }
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
  const __m512 one = _mm512_set1_ps(1.f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t f = 0; f < F; f += 16) {
      const __mmask16 mask = F - f >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (F - f)) - 1);
      const __m512 gate = load_bf16x16(hp + r * 2 * F + f, mask), up = load_bf16x16(hp + r * 2 * F + F + f, mask);
      const __m512 silu = round_to_bf16(_mm512_div_ps(gate, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gate)))));
      _mm256_mask_storeu_epi16(op + r * F + f, mask, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, up)));
    }
  return out;
}

// q [B, H, L, D], k and v [B, G, T, D] bf16 (any strides, the last dimension contiguous; k and v
// are views of the KV cache; D a multiple of 32) -> softmax(q k^T * scale) v as [B, L, H * D]
// bf16, the layout the output projection takes. Heads h of group g = h / (H / G) share its keys
// and values. Needs AMX (amx_available()).
torch::Tensor amx_decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  TORCH_CHECK(amx_ready(), "decode_attention: AMX is not available");
  const AttentionShape a = attention_shape(q, k, v, scale);
  const int64_t B = a.B, H = a.H, G = a.G, L = a.L, T = a.T, D = a.D;
  TORCH_CHECK(a.q_h % 2 == 0 && a.q_l % 2 == 0 && a.q_b % 2 == 0, "decode_attention: even query strides");
  auto out = torch::empty({B, L, H * D}, q.options());
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  // One task per (batch row, group, 16 query rows), cut into key ranges where that leaves threads idle.
  const int64_t rows = a.rep * L, chunks = (rows + kTileRows - 1) / kTileRows, tasks = B * G * chunks;
  const int64_t splits = attention_splits(tasks, T);
  const int64_t span = (T + splits - 1) / splits, o_floats = (D + 15) / 16 * kTileRows * 16;
  // (the calling thread's buffers, reached by pointer: a worker naming them would get its own)
  thread_local std::vector<float> o_keep;
  thread_local std::vector<AttentionPart> parts_keep;
  o_keep.resize(tasks * splits * o_floats);
  parts_keep.resize(tasks * splits);
  AttentionPart* parts = parts_keep.data();
  for (int64_t i = 0; i < tasks * splits; ++i) parts[i].o = o_keep.data() + i * o_floats;
  at::parallel_for(0, tasks * splits, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t task = i / splits, split = i % splits;
      const int64_t b = task / (G * chunks), g = task / chunks % G, row0 = task % chunks * kTileRows;
      attention_part(qp, kp, vp, a, b, g, row0, (int)std::min<int64_t>(kTileRows, rows - row0), split * span,
                     std::min(T, (split + 1) * span), parts[i]);
    }
  });
  for (int64_t task = 0; task < tasks; ++task) {
    const int64_t b = task / (G * chunks), g = task / chunks % G, row0 = task % chunks * kTileRows;
    merge_parts(parts + task * splits, splits, a, b, g, row0, (int)std::min<int64_t>(kTileRows, rows - row0), H, op);
  }
  return out;
}

// q [B, H, L, D], k and v [B, G, T, D] bf16 (any strides, the last dimension contiguous; D even)
// -> softmax(q k^T * scale) v as [B, L, H * D] bf16, no mask. Heads h of group g = h / (H / G)
// share its keys and values. Needs AMX (amx_available()).
torch::Tensor vision_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  TORCH_CHECK(amx_ready(), "vision_attention: AMX is not available");
  for (const auto* t : {&q, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == at::kBFloat16 && t->device().is_cpu(), "vision_attention: bf16 CPU tensors only");
    TORCH_CHECK(t->dim() == 4 && t->stride(3) == 1, "vision_attention: 4-d tensors with a contiguous last dimension");
  }
  FlashShape a;
  a.B = q.size(0), a.H = q.size(1), a.L = q.size(2), a.D = q.size(3), a.G = k.size(1), a.T = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == a.B && k.size(3) == a.D, "vision_attention: k and v [B, G, T, D] with q [B, H, L, D]");
  TORCH_CHECK(a.G > 0 && a.H % a.G == 0 && a.T > 0 && a.L > 0 && a.D > 0 && a.D % 2 == 0,
              "vision_attention: H a multiple of G, T and L > 0, D even");
  TORCH_CHECK(q.stride(0) % 2 == 0 && q.stride(1) % 2 == 0 && q.stride(2) % 2 == 0, "vision_attention: even query strides");
  a.rep = a.H / a.G;
  a.q_b = q.stride(0), a.q_h = q.stride(1), a.q_l = q.stride(2);
  a.k_b = k.stride(0), a.k_g = k.stride(1), a.k_t = k.stride(2);
  a.v_b = v.stride(0), a.v_g = v.stride(1), a.v_t = v.stride(2);
  a.key_chunks = (a.D + 31) / 32, a.value_tiles = (a.D + 15) / 16;
  a.scale_log2 = static_cast<float>(scale * 1.4426950408889634);
  auto out = torch::empty({a.B, a.L, a.H * a.D}, q.options());
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t padded = (a.T + kFlashKeys - 1) / kFlashKeys * kFlashKeys, key_tiles32 = padded / 32;
  const int64_t key_elements = padded * a.key_chunks * 32, value_elements = padded * a.value_tiles * 16;
  const int64_t query_blocks = (a.L + kFlashQueries - 1) / kFlashQueries, tasks_per_kv = a.rep * query_blocks;
  // one KV head at a time, packed, then its (query head, 64 queries) tasks: packing every head
  // first (51 MB for the vision tower) was 7 % slower, the packed keys and values out of L2
  std::vector<uint16_t> kpack(key_elements), vpack(value_elements);
  for (int64_t b = 0; b < a.B; ++b)
    for (int64_t g = 0; g < a.G; ++g) {
      at::parallel_for(0, key_tiles32, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t kc = i0; kc < i1; ++kc) pack_keys_values(k.data_ptr(), v.data_ptr(), a, b, g, kc, kpack.data(), vpack.data());
      });
      at::parallel_for(0, tasks_per_kv, 1, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i)
          flash_task(qp, kpack.data(), vpack.data(), a, b, g * a.rep + i / query_blocks, i % query_blocks * kFlashQueries, op);
      });
    }
  return out;
}

// The decode attention: with AMX tiles where the CPU has them, else in fp32 FMA with the query
// rows in the lanes (there each key and value row must be contiguous, as in the KV cache).
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  return amx_ready() ? amx_decode_attention(q, k, v, scale) : lane_attention::decode_attention<Lanes>(q, k, v, scale);
}

torch::Tensor fma_decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  return lane_attention::decode_attention<Lanes>(q, k, v, scale);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("stream_read", &glm4v_kernels::stream_read, "read every byte of a tensor once (the bench's memory probe)");
  m.def("int4_expand_t", &int4_expand_t, "W^T of an int4 weight's rows start .. stop, bf16 or fp32 (prefill products)");
  m.def("decode_block", &glm4v_kernels::decode_block, "one GLM-4 decoder layer of a decode step, the layer's kernels in one call");
  m.def("rms_norm", &glm4v_kernels::rms_norm, "RMSNorm of bf16 rows with a bf16 weight (decode steps)");
  m.def("swiglu", &swiglu, "silu(gate) * up of bf16 rows [gate | up], rounded as torch's ops round (decode steps)");
  m.def("rope", &glm4v_kernels::rope_bf16, "RoPE of a decode step's heads in bf16, rounded as torch's ops round");
  m.def("rope_into_cache", &glm4v_kernels::rope_into_cache, "a decode step's q rotated; its rotated keys and values written into the cache");
  m.def("amx_available", &amx_ready, "whether this process may use the AMX tiles (decode_attention takes them where it may)");
  m.def("decode_attention", &decode_attention, "softmax(q k^T * scale) v of a decode step's few tokens against the KV cache, grouped heads (AMX where the CPU has it, else fp32 FMA)");
  m.def("vision_attention", &vision_attention, "softmax(q k^T * scale) v over all of an image's tokens, no mask, as [B, L, H * D] bf16 (AMX flash attention)");
  m.def("decode_attention_fma", &fma_decode_attention, "decode_attention as a CPU without AMX runs it (fp32 FMA, the query rows in the lanes)");
  m.def("bf16_gemv", &bf16_gemv, "bf16 x bf16 matrix-vector product for 1-4 rows (decode)");
  m.def("int8_gemv", &int8_gemv, "x [M<=4, K] @ (int8 w [N, K] * scale [N])^T (AVX512-VNNI)");
  m.def("int4_gemv", &int4_gemv, "x [M<=4, K] @ int4 w^T, glm4v's 64-row block layout, group-wise scale/zero (AVX512-VNNI, VBMI)");
}
