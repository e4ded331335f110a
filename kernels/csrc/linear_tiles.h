// The tiles of the CPU linear kernels (linear.cpp, and projection.cpp's base + LoRA groups), fp32 throughout: NF4
// with the dequantization fused into the matmul, and dense weights through the same tiles and register blocks.
//
// W is bitsandbytes' NF4 layout: the row-major [N, K] weight flattened, two 4-bit codes per byte (the even
// element in the high nibble), one fp32 absmax per `bs` consecutive elements; value = code[q] * absmax.
// Work item = a tile of NT output rows: its NT x K weights are dequantized once into a thread-private
// buffer (L2-resident), then every token block reads them from cache. So W is read from memory as 4-bit
// codes, once per call, never written out as fp32 (what dequantize-then-matmul does: 8x the traffic).
// Inner kernel: MB tokens x NB rows of dot products over K in fp32 vectors (kernels/csrc/vec.h: 16 lanes on AVX-512,
// 8 on AVX2 and elsewhere), MB*NB register accumulators.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include "avx512_rows.h"
#include "vec.h"

namespace sb::tiles {

constexpr int64_t NT = 16;  // output rows per work item (tile)
#if defined(SB_VEC_AVX512)
constexpr int64_t MB = 4;  // tokens per register block
constexpr int64_t NB = 4;  // output rows per register block (MB * NB = 16 accumulators of 32 zmm registers)
#else
constexpr int64_t MB = 3;  // 8-lane vectors: 12 accumulators + 4 weights of 16 ymm registers (the token row is
constexpr int64_t NB = 4;  // the FMA's memory operand); of 2x6 .. 6x2, 3x4 measured fastest at 8-32 tokens on Zen 3
#endif

// buf[r][k] = code[q(n0 + r, k)] * absmax[block], for r < rows (rows beyond are zero), k < K.
void dequant_tile(const uint8_t* packed, const float* absmax, const float* code, int64_t K, int64_t bs,
                  int64_t n0, int64_t rows, float* buf) {
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t flat = (n0 + r) * K;  // K % bs == 0 and bs % 32 == 0 (checked by the caller)
    const uint8_t* p = packed + flat / 2;
    const float* am = absmax + flat / bs;
    float* out = buf + r * K;
    for (int64_t k = 0; k < K; k += 32) sb::nf4_dequant32(p + k / 2, code, am[k / bs], out + k);
  }
  std::memset(buf + rows * K, 0, sizeof(float) * (NT - rows) * K);
}

// y[m, n0 + j] = x[m] . buf[j] for m in [m0, m0 + mr), j in [j0, j0 + nr): one MB x NB register block.
// Also prefetches [pf, pf_end) (the next tile's weights: its share for this block), spread over the k loop.
void block(const float* x, int64_t x_ld, int64_t m0, int64_t mr, const float* buf, int64_t buf_ld, int64_t K,
           int64_t j0, int64_t nr, float* y, int64_t y_ld, int64_t n0, const char* pf, const char* pf_end) {
  const float* xr[MB];
  for (int64_t i = 0; i < MB; ++i) xr[i] = x + std::min(m0 + i, m0 + mr - 1) * x_ld;  // pad rows repeat the last
  const float* wr[NB];
  for (int64_t j = 0; j < NB; ++j) wr[j] = buf + std::min(j0 + j, j0 + nr - 1) * buf_ld;  // pad rows repeat
  float sums[MB * NB];
  sb::vf acc[MB * NB];
  for (auto& a : acc) a = sb::vzero();
  constexpr int64_t L = sb::VL;
  const int64_t pf_per_k = pf < pf_end ? ((pf_end - pf + 63) / 64 + K / L - 1) / (K / L) : 0;  // lines per k step
  for (int64_t k = 0; k < K; k += L) {  // K % 16 == 0 (checked by the callers)
    for (int64_t q = 0; q < pf_per_k && pf < pf_end; ++q, pf += 64) __builtin_prefetch(pf, 0, 3);
    sb::vf w[NB];
    for (int64_t j = 0; j < NB; ++j) w[j] = sb::vload(wr[j] + k);
    for (int64_t i = 0; i < MB; ++i) {
      const sb::vf xv = sb::vload(xr[i] + k);
      for (int64_t j = 0; j < NB; ++j) acc[i * NB + j] = sb::vfma(xv, w[j], acc[i * NB + j]);
    }
  }
#if defined(SB_VEC_AVX512)
  _mm512_storeu_ps(sums, sb::reduce16(acc));
#else
  for (int64_t i = 0; i < MB * NB; ++i) sums[i] = sb::vsum(acc[i]);
#endif
  for (int64_t i = 0; i < mr; ++i)
    for (int64_t j = 0; j < nr; ++j) y[(m0 + i) * y_ld + n0 + j0 + j] = sums[i * NB + j];
}

// One projection's base weights as the tiles read them: dense fp32 rows (`dense`, rows `ld` floats apart) or, with
// dense == nullptr, NF4 codes (packed, absmax, code, bs). W is [N, K]; K % 16 == 0 (NF4: K % bs == 0, bs % 32 == 0).
struct Weights {
  const float* dense;
  int64_t ld;
  const uint8_t* packed;
  const float* absmax;
  const float* code;
  int64_t bs, N, K;

  int64_t tiles() const { return (N + NT - 1) / NT; }
  int64_t buf_floats() const { return dense ? 0 : NT * K; }
  int64_t row_ld() const { return dense ? ld : K; }
  // the tile's first fp32 weight row (rows row_ld() apart): in place (dense) or dequantized into buf (NF4)
  const float* tile(int64_t n0, int64_t rows, float* buf) const {
    if (dense) return dense + n0 * ld;
    dequant_tile(packed, absmax, code, K, bs, n0, rows, buf);
    return buf;
  }
  // the contiguous bytes tile t reads from memory (what the tile before it prefetches); empty past the last tile
  std::pair<const char*, const char*> source(int64_t t) const {
    if (t < 0 || t >= tiles()) return {nullptr, nullptr};
    const int64_t n0 = t * NT, rows = std::min(NT, N - n0);
    const char* p = dense ? reinterpret_cast<const char*>(dense + n0 * ld) : reinterpret_cast<const char*>(packed + n0 * K / 2);
    const int64_t bytes = dense ? ((rows - 1) * ld + K) * static_cast<int64_t>(sizeof(float)) : rows * K / 2;
    return {p, p + bytes};
  }
};

// y[:, tile t's rows] = x[M, K] @ W[tile rows]^T, meanwhile prefetching [next, next_end) (the thread's next tile's
// source) spread over the tile's register blocks, so memory latency overlaps compute. buf: W.buf_floats() floats.
inline void run_tile(const float* x, int64_t x_ld, int64_t M, const Weights& W, int64_t t, float* buf, float* y,
                     int64_t y_ld, const char* next, const char* next_end) {
  const int64_t n0 = t * NT, rows = std::min(NT, W.N - n0), K = W.K;
  const float* w = W.tile(n0, rows, buf);
  const int64_t m_blocks = (M + MB - 1) / MB, blocks = m_blocks * ((rows + NB - 1) / NB);
  const int64_t share = ((next_end - next + blocks - 1) / blocks + 63) / 64 * 64;  // bytes per block
  // row blocks outer: a block's NB weight rows stay in L1 for every token block (x streams from L2 instead:
  // 3-10% on the dense calls at 8-64 tokens, 1.4% on the decode step, Zen 3; unmeasured on AVX-512)
  for (int64_t j0 = 0; j0 < rows; j0 += NB)
    for (int64_t m0 = 0; m0 < M; m0 += MB) {
      const char* pf = std::min(next + share * ((j0 / NB) * m_blocks + m0 / MB), next_end);
      block(x, x_ld, m0, std::min(MB, M - m0), w, W.row_ld(), K, j0, std::min(NB, rows - j0), y, y_ld, n0, pf,
            std::min(pf + share, next_end));
    }
}

}  // namespace sb::tiles
