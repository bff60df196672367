// Decode-step matrix-vector products for CPUs with AVX512-BF16.
//
// A decode step multiplies 1-4 token rows by every weight of the model, so its speed is the speed
// at which the weights stream from memory. torch's bf16 F.linear at M = 1 reaches only 5-25 GB/s
// here (worst on the 4096 x 13696 down projection); this loop streams four weight rows at a time,
// multiplies them with VDPBF16PS (32 bf16 products per instruction, fp32 accumulation) and reaches
// the memory bandwidth. Each thread takes a contiguous range of output rows.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

namespace {

constexpr int kRows = 4;            // weight rows streamed together
constexpr int64_t kPrefetch = 512;  // elements ahead (1 KB per row) for the software prefetch

template <int M>
void gemv_rows(const uint16_t* x, const uint16_t* w, float* out, int64_t K, int64_t N, int64_t n0, int rows) {
  __m512 acc[M][kRows];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < kRows; ++r) acc[m][r] = _mm512_setzero_ps();
  const uint16_t* row[kRows];
  for (int r = 0; r < kRows; ++r) row[r] = w + (n0 + (r < rows ? r : 0)) * K;  // short tail: repeat row 0
  const int64_t K32 = K / 32 * 32;
  for (int64_t k = 0; k < K32; k += 32) {
    __m512bh wv[kRows];
    for (int r = 0; r < kRows; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(row[r] + k + kPrefetch), _MM_HINT_T0);
      wv[r] = (__m512bh)_mm512_loadu_si512(row[r] + k);
    }
    for (int m = 0; m < M; ++m) {
      __m512bh xv = (__m512bh)_mm512_loadu_si512(x + m * K + k);
      for (int r = 0; r < kRows; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  if (K32 < K) {
    const __mmask32 mask = (__mmask32)((1ull << (K - K32)) - 1);
    __m512bh wv[kRows];
    for (int r = 0; r < kRows; ++r) wv[r] = (__m512bh)_mm512_maskz_loadu_epi16(mask, row[r] + K32);
    for (int m = 0; m < M; ++m) {
      __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + m * K + K32);
      for (int r = 0; r < kRows; ++r) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], wv[r], xv);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < rows; ++r) out[m * N + n0 + r] = _mm512_reduce_add_ps(acc[m][r]);
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
  auto out = torch::empty({M, N}, x.options().dtype(at::kFloat));
  const auto* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr());
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  float* op = out.data_ptr<float>();
  const int64_t blocks = (N + kRows - 1) / kRows;
  at::parallel_for(0, blocks, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kRows;
      const int rows = (int)std::min<int64_t>(kRows, N - n0);
      switch (M) {
        case 1: gemv_rows<1>(xp, wp, op, K, N, n0, rows); break;
        case 2: gemv_rows<2>(xp, wp, op, K, N, n0, rows); break;
        case 3: gemv_rows<3>(xp, wp, op, K, N, n0, rows); break;
        default: gemv_rows<4>(xp, wp, op, K, N, n0, rows); break;
      }
    }
  });
  return out.to(at::kBFloat16);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("bf16_gemv", &bf16_gemv, "bf16 x bf16 matrix-vector product for 1-4 rows (decode)");
}
