// The decode attention in fp32 FMA with the query rows in the vector lanes, for both builds: the
// AVX2 build's only decode attention, the AVX-512 build's where the CPU has no AMX (Zen 4). Each
// build includes this after defining `Lanes`, its vector width's few operations (a register type,
// kWidth lanes, kCols sums per pass, load / store / broadcast / fma / max / sub / add / exp of
// fp32 lanes, and load_bf16: kWidth bf16 numbers widened to fp32).
//
// softmax(q k^T * scale) v for a decode step's few query tokens against the KV cache. Why not
// SDPA: inside decode steps (2 threads, a 1,660-token GLM-4 cache that the step's weights had
// pushed out to memory) its flash kernel took 0.48-0.55 ms a layer on a Zen 3 EPYC against 0.28
// for the AVX2 build of this; on a Xeon, with AMX declined, 0.41 against 0.35 for the AVX-512
// build (docs/PERFORMANCE.md). Both are compute-bound: ~27 MFLOP in fp32.
// One task per (batch row, group, key range); the group's H/G heads x L tokens are its query rows,
// 16 to a block: 16 / kWidth vectors, one lane per query row. In that layout both products are
// the same loop (broadcast_fma): a scalar of the keys (or values), widened to fp32 a chunk at a
// time, broadcast from memory and multiplied into 16 rows at once, so the loop needs no
// horizontal sums and no bit operations between its FMAs (a version with the keys' dimensions in
// the lanes spent a third of its time on those: 0.34 ms against 0.28 cold on Zen 3).
// Pass 1: s^T [keys][rows] = K q^T, kCols keys a sweep over the dimensions.
// Softmax along the keys, vertical in that layout: exp(s - max), max and sum per lane.
// Pass 2: o^T [D][rows] += V^T p^T, kCols dimensions a sweep over a chunk of keys.
// Everything is summed in fp32, p included (SDPA rounds it to bf16 for the product with v).
#pragma once

#include <immintrin.h>

#include "cpu_common.h"

namespace glm4v_kernels {
namespace lane_attention {

constexpr int kRowBlock = 16;  // query rows a pass

// What one task leaves for the merge, in one block of floats: the weighted values o[rows][D] (not
// yet divided), then per row the largest score and the sum of exp(score - it). A group's query
// rows are rounded up to whole blocks of kRowBlock (the extra rows are zero).
inline int64_t padded_rows(const AttentionShape& a) {
  return (a.rep * a.L + kRowBlock - 1) / kRowBlock * kRowBlock;
}

inline int64_t part_floats(const AttentionShape& a) { return padded_rows(a) * (a.D + 2); }

// Keys and values are taken kKeyChunk at a time, widened to fp32 (16 KB at D = 128, in L1), and the
// cache rows kPrefetchChunks chunks ahead are requested meanwhile. The cache arrives cold: the step's
// weights pushed it out of every CPU cache, and without the requests the two passes read it at
// ~5 GB/s (latency-bound: too little work per line for the hardware prefetcher).
constexpr int64_t kKeyChunk = 32, kPrefetchChunks = 4;

template <int Hint>
inline void prefetch_rows(const uint16_t* base, int64_t D, int64_t from, int64_t to) {
  const char* end = reinterpret_cast<const char*>(base + to * D);
  for (const char* line = reinterpret_cast<const char*>(base + from * D); line < end; line += 64)
    _mm_prefetch(line, static_cast<_mm_hint>(Hint));
}

// `count` bf16 rows of D (contiguous) -> fp32; rows from `count` to kKeyChunk are zeroed.
template <class Lanes>
inline void widen_chunk(const uint16_t* src, int64_t count, int64_t D, float* dst) {
  for (int64_t i = 0; i < count * D; i += Lanes::kWidth) Lanes::store(dst + i, Lanes::load_bf16(src + i));
  std::fill(dst + count * D, dst + kKeyChunk * D, 0.f);
}

template <class Lanes>
using Sums = typename Lanes::reg[Lanes::kCols][kRowBlock / Lanes::kWidth];

// acc[j] += sum over i < count of a[j * a_j + i * a_i] * b[i * ldb .. + 16]: kCols scalars of a,
// each broadcast from memory (a load, no shuffle), against 16 lanes of b. Both products of the
// attention are this loop: the lanes are 16 query rows, so no horizontal sums and no widening in
// the loop, and its kCols x 16 / kWidth independent sums keep both FMA pipes busy.
template <class Lanes>
inline void broadcast_fma(const float* a, int64_t a_j, int64_t a_i, const float* b, int64_t ldb, int64_t count,
                          Sums<Lanes>& acc) {
  constexpr int V = kRowBlock / Lanes::kWidth;
  for (int64_t i = 0; i < count; ++i) {
    typename Lanes::reg rows[V];
    for (int u = 0; u < V; ++u) rows[u] = Lanes::load(b + i * ldb + u * Lanes::kWidth);
    for (int j = 0; j < Lanes::kCols; ++j) {
      const typename Lanes::reg s = Lanes::broadcast(a + j * a_j + i * a_i);
      for (int u = 0; u < V; ++u) acc[j][u] = Lanes::fma(s, rows[u], acc[j][u]);
    }
  }
}

// acc[j] -> or <- dst[j * ld ..], 16 lanes each
template <class Lanes>
inline void load_sums(Sums<Lanes>& acc, const float* src, int64_t ld) {
  for (int j = 0; j < Lanes::kCols; ++j)
    for (int u = 0; u < kRowBlock / Lanes::kWidth; ++u) acc[j][u] = Lanes::load(src + j * ld + u * Lanes::kWidth);
}

template <class Lanes>
inline void store_sums(const Sums<Lanes>& acc, float* dst, int64_t ld) {
  for (int j = 0; j < Lanes::kCols; ++j)
    for (int u = 0; u < kRowBlock / Lanes::kWidth; ++u) Lanes::store(dst + j * ld + u * Lanes::kWidth, acc[j][u]);
}

template <class Lanes>
void attention_part(const uint16_t* q, const uint16_t* k, const uint16_t* v, const AttentionShape& a, int64_t b,
                    int64_t g, int64_t t_begin, int64_t t_end, float* part) {
  const int64_t D = a.D, n = t_end - t_begin, rows = a.rep * a.L, RP = padded_rows(a);
  const int64_t n_pad = (n + kKeyChunk - 1) / kKeyChunk * kKeyChunk;
  constexpr int W = Lanes::kWidth, C = Lanes::kCols;
  thread_local std::vector<float> qt_keep, st_keep, chunk_keep, ot_keep;
  qt_keep.assign(D * RP, 0.f);  // q^T [D][RP], scaled; rows past `rows` stay 0
  st_keep.resize(n_pad * RP);   // scores, then softmax numerators, key-major: [n_pad][RP]
  chunk_keep.resize(kKeyChunk * D);
  ot_keep.assign(D * RP, 0.f);  // o^T [D][RP]
  float *qt = qt_keep.data(), *st = st_keep.data(), *chunk = chunk_keep.data(), *ot = ot_keep.data();
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* qrow = q + b * a.q_b + (g * a.rep + r / a.L) * a.q_h + (r % a.L) * a.q_l;
    for (int64_t d = 0; d < D; ++d) qt[d * RP + r] = bf16_to_float(qrow[d]) * a.scale;
  }
  const uint16_t* keys = k + b * a.k_b + g * a.k_g + t_begin * a.k_t;
  const uint16_t* vals = v + b * a.v_b + g * a.v_g + t_begin * a.v_t;
  const int64_t ahead = kPrefetchChunks * kKeyChunk;
  prefetch_rows<_MM_HINT_T0>(keys, D, 0, std::min(n, ahead));
  // s^T[t][r] = k[t] . q[r]
  for (int64_t c0 = 0; c0 < n; c0 += kKeyChunk) {
    const int64_t c1 = std::min(n, c0 + kKeyChunk);
    prefetch_rows<_MM_HINT_T0>(keys, D, std::min(n, c0 + ahead), std::min(n, c1 + ahead));
    prefetch_rows<_MM_HINT_T1>(vals, D, c0, c1);  // for the second product, while this one computes
    widen_chunk<Lanes>(keys + c0 * D, c1 - c0, D, chunk);
    for (int64_t r0 = 0; r0 < RP; r0 += kRowBlock)
      for (int64_t j0 = 0; j0 < kKeyChunk; j0 += C) {
        Sums<Lanes> acc;
        for (auto& sums : acc)
          for (auto& s : sums) s = Lanes::zero();
        broadcast_fma<Lanes>(chunk + j0 * D, D, 1, qt + r0, RP, D, acc);
        store_sums<Lanes>(acc, st + (c0 + j0) * RP + r0, RP);
      }
  }
  // softmax numerators along the keys: the rows are the lanes, so max and sum are vertical
  float *o = part, *top = part + RP * D, *total = top + RP;
  for (int64_t r0 = 0; r0 < RP; r0 += W) {
    typename Lanes::reg peak = Lanes::broadcast_value(-INFINITY), sum = Lanes::zero();
    for (int64_t t = 0; t < n; ++t) peak = Lanes::max(peak, Lanes::load(st + t * RP + r0));
    for (int64_t t = 0; t < n; ++t) {
      const typename Lanes::reg e = Lanes::exp(Lanes::sub(Lanes::load(st + t * RP + r0), peak));
      Lanes::store(st + t * RP + r0, e);
      sum = Lanes::add(sum, e);
    }
    Lanes::store(top + r0, peak);
    Lanes::store(total + r0, sum);
  }
  // Keys past n (the last chunk's padding) get p = 0.
  std::fill(st + n * RP, st + n_pad * RP, 0.f);
  // o^T[d][r] = sum_t v[t][d] p^T[t][r]
  for (int64_t c0 = 0; c0 < n; c0 += kKeyChunk) {
    const int64_t c1 = std::min(n, c0 + kKeyChunk);
    prefetch_rows<_MM_HINT_T0>(vals, D, std::min(n, c0 + kKeyChunk), std::min(n, c1 + kKeyChunk));
    widen_chunk<Lanes>(vals + c0 * D, c1 - c0, D, chunk);
    for (int64_t r0 = 0; r0 < RP; r0 += kRowBlock)
      for (int64_t d0 = 0; d0 < D; d0 += C) {
        Sums<Lanes> acc;
        load_sums<Lanes>(acc, ot + d0 * RP + r0, RP);
        broadcast_fma<Lanes>(chunk + d0, 1, D, st + c0 * RP + r0, RP, kKeyChunk, acc);
        store_sums<Lanes>(acc, ot + d0 * RP + r0, RP);
      }
  }
  for (int64_t r = 0; r < RP; ++r)
    for (int64_t d = 0; d < D; ++d) o[r * D + d] = ot[d * RP + r];
}

// The parts of one (batch row, group) over consecutive key ranges -> its output rows: each part
// rescaled to the largest maximum, summed, divided by the total and rounded to bf16. With one part
// this is o / total.
inline void merge_parts(const float* parts, int64_t count, int64_t stride, const AttentionShape& a, int64_t b,
                        int64_t g, uint16_t* out) {
  const int64_t D = a.D, rows = a.rep * a.L, padded = padded_rows(a);
  thread_local std::vector<float> row_keep;
  row_keep.resize(D);
  float* row = row_keep.data();
  for (int64_t r = 0; r < rows; ++r) {
    float top = -INFINITY, total = 0.f;
    for (int64_t p = 0; p < count; ++p) top = std::max(top, parts[p * stride + padded * D + r]);
    std::fill(row, row + D, 0.f);
    for (int64_t p = 0; p < count; ++p) {
      const float* part = parts + p * stride;
      const float weight = count == 1 ? 1.f : std::exp(part[padded * D + r] - top);
      total += weight * part[padded * D + padded + r];
      for (int64_t d = 0; d < D; ++d) row[d] += weight * part[r * D + d];
    }
    const float inverse = 1.f / total;
    for (int64_t d = 0; d < D; ++d) row[d] *= inverse;
    const int64_t h = g * a.rep + r / a.L, l = r % a.L;
    store_bf16(row, out + (b * a.L + l) * a.H * D + h * D, D);
  }
}

// q [B, H, L, D], k and v [B, G, T, D] bf16 (see AttentionShape; each key and value row contiguous,
// D a multiple of 32) -> softmax(q k^T * scale) v as [B, L, H * D] bf16, the layout the output
// projection takes.
template <class Lanes>
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, double scale) {
  const AttentionShape a = attention_shape(q, k, v, scale);
  TORCH_CHECK(a.k_t == a.D && a.v_t == a.D, "decode_attention: the cache's rows must be contiguous");
  auto out = torch::empty({a.B, a.L, a.H * a.D}, q.options());
  const auto* qp = reinterpret_cast<const uint16_t*>(q.data_ptr());
  const auto* kp = reinterpret_cast<const uint16_t*>(k.data_ptr());
  const auto* vp = reinterpret_cast<const uint16_t*>(v.data_ptr());
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr());
  const int64_t tasks = a.B * a.G, splits = attention_splits(tasks, a.T), span = (a.T + splits - 1) / splits;
  const int64_t stride = part_floats(a);
  thread_local std::vector<float> parts_keep;  // the calling thread's: workers write into it by pointer
  parts_keep.resize(tasks * splits * stride);
  float* parts = parts_keep.data();
  at::parallel_for(0, tasks * splits, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t task = i / splits, split = i % splits;
      attention_part<Lanes>(qp, kp, vp, a, task / a.G, task % a.G, split * span, std::min(a.T, (split + 1) * span),
                            parts + i * stride);
    }
  });
  for (int64_t task = 0; task < tasks; ++task)
    merge_parts(parts + task * splits * stride, splits, stride, a, task / a.G, task % a.G, op);
  return out;
}

}  // namespace lane_attention
}  // namespace glm4v_kernels
