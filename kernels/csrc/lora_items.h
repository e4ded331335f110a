// The work-item bodies of the LoRA kernels (lora.cpp): one token block's shrink rows and expand range, shared by
// the two-phase schedule (shrink items, then expand items) and the fused one (a block's shrink and expand together).
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "rows.h"
#include "common.h"
#include "lora_rows.h"

namespace sb {

constexpr int64_t TB = 8;   // tokens per work item
constexpr int64_t OC = 64;  // output features per row-major expand tile (B tile transposed to [rank][OC] in fp32)

// per segment of a call: lo, hi (positions in the stably sorted token order), slot, true rank (-1 = the tables'
// padded rank)
constexpr int64_t SEG_FIELDS = 4;

inline int64_t seg_rank(const int64_t* seg, int64_t padded) {
  return seg[3] < 0 ? padded : std::min(seg[3], padded);
}

inline int64_t tok_at(const int64_t* index, int64_t pos) { return index ? index[pos] : pos; }

// toks = the tokens at sorted positions [j0, j1) (index: the sorted order, nullptr when the batch is grouped)
inline int64_t block_tokens(const int64_t* tok_index, int64_t j0, int64_t j1, int64_t* toks) {
  for (int64_t j = j0; j < j1; ++j) toks[j - j0] = tok_at(tok_index, j);
  return j1 - j0;
}

// Per-thread buffers, grown on demand and reused by all of a call's items.
struct Scratch {
  std::vector<float> x, a, bt, brow, dwide;
  static float* at_least(std::vector<float>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    return v.data();
  }
};

// xs[j] = x row toks[j] as fp32 (a bf16 row converted into scratch; fp32 rows are read in place).
inline void gather_x(const void* x, int64_t x_ld, int64_t x_dt, int64_t n_in, const int64_t* toks, int64_t m,
                     const float** xs, Scratch& sc) {
  const int64_t xsz = elem_size(x_dt);
  for (int64_t j = 0; j < m; ++j) {
    const char* row = static_cast<const char*>(x) + toks[j] * x_ld * xsz;
    if (x_dt == F32) {
      xs[j] = reinterpret_cast<const float*>(row);
    } else {
      float* buf = Scratch::at_least(sc.x, TB * n_in) + j * n_in;
      load_row(row, x_dt, n_in, buf);
      xs[j] = buf;
    }
  }
}

// out[j][k] = xs[j] . A[k, :n_in] for k in [k0, k1): A's rows a_ld elements apart from a_slot, dtype a_dt. With the
// vector rows (rows.h): register tiles of rows x tokens (AVX-512 16 x 1 ... 4 x 4, AVX2 8 x 1 ... 2 x 4, up to 4
// tokens per pass); else each row once for all m tokens.
inline void shrink_rows(const float* const* xs, int64_t m, const char* a_slot, int64_t a_ld, int64_t a_dt,
                        int64_t n_in, int64_t k0, int64_t k1, float* const* out, Scratch& sc) {
  const int64_t asz = elem_size(a_dt);
#ifdef SB_HAVE_ROWS
  for (int64_t g = 0; g < m; g += 4) {
    const char* a = a_slot;
    const int64_t ld = a_ld * asz;
    switch (std::min<int64_t>(4, m - g)) {
      case 4: dot_rows_tiled<4>(a, ld, a_dt, xs + g, n_in, out + g, k0, k1); break;
      case 3: dot_rows_tiled<3>(a, ld, a_dt, xs + g, n_in, out + g, k0, k1); break;
      case 2: dot_rows_tiled<2>(a, ld, a_dt, xs + g, n_in, out + g, k0, k1); break;
      default: dot_rows_tiled<1>(a, ld, a_dt, xs + g, n_in, out + g, k0, k1); break;
    }
  }
  return;
#endif
  float acc[TB];
  for (int64_t k = k0; k < k1; ++k) {
    const char* arow = a_slot + k * a_ld * asz;
    const float* a = reinterpret_cast<const float*>(arow);
    if (a_dt != F32) {
      float* buf = Scratch::at_least(sc.a, n_in);
      load_row(arow, a_dt, n_in, buf);
      a = buf;
    }
    dot_any(a, xs, m, n_in, acc);
    for (int64_t j = 0; j < m; ++j) out[j][k] = acc[j];
  }
}

// y[toks[j], o0:o1] += scale * ts[j][:r] @ B[o0:o1, :r]^T, accumulated in fp32 and rounded once into y's dtype.
// B's output and rank axes are b_s1 / b_s2 elements apart from b_slot (one of them 1): rank-major reads r
// contiguous rows once, an axpy into every token's fp32 delta; row-major dots rank-long rows (few tokens) or
// transposes a tile once and runs FMAs across the outputs (a prefill block).
inline void expand_range(const float* const* ts, const int64_t* toks, int64_t m, const char* b_slot, int64_t b_s1,
                         int64_t b_s2, int64_t b_dt, int64_t r, int64_t o0, int64_t o1, float scale, void* y,
                         int64_t y_ld, int64_t y_dt, Scratch& sc) {
  const int64_t bsz = elem_size(b_dt);
#if defined(SB_HAVE_ROWS) && !defined(SB_HAVE_AVX2_ROWS)
  if (b_s2 != 1) {  // rank-major: 64 outputs x r rows per token in registers, the B tile from L1 after the first
    float delta[64];
    for (int64_t oc0 = o0; oc0 < o1; oc0 += 64) {
      const int64_t oc = std::min<int64_t>(64, o1 - oc0);
      const char* bt = b_slot + oc0 * bsz;
      for (int64_t j = 0; j < m; ++j) {
        rank_major_tile(bt, b_s2 * bsz, b_dt, r, ts[j], oc, delta);
        add_scaled(y, y_dt, toks[j] * y_ld + oc0, delta, scale, oc);
      }
    }
    return;
  }
#endif
  if (b_s2 != 1) {  // rank-major: B's rows once, in order, an axpy each into every token's fp32 delta
    const int64_t ow = o1 - o0;
    float* d = Scratch::at_least(sc.dwide, m * ow);
    std::fill(d, d + m * ow, 0.f);
#ifdef SB_HAVE_AVX2_ROWS
    // each row one stream, converted in registers: on a Zen 3 5-17% faster per step's LoRA work at 1-8 tokens per
    // adapter than AVX-512's register tiles above, whose 16 short strided reads per 64 outputs the prefetcher
    // follows worse (AVX-512 keeps those tiles: not measured there)
    rank_major_rows(b_slot + o0 * bsz, b_s2 * bsz, b_dt, r, ts, m, ow, d);
#else
    prefetch_bytes(b_slot + o0 * bsz, ow * bsz);
    for (int64_t k = 0; k < r; ++k) {
      const char* row = b_slot + (k * b_s2 + o0) * bsz;
      if (k + 1 < r) prefetch_bytes(row + b_s2 * bsz, ow * bsz);
      const float* br = reinterpret_cast<const float*>(row);
      if (b_dt != F32) {
        float* buf = Scratch::at_least(sc.brow, ow);
        load_row(row, b_dt, ow, buf);
        br = buf;
      }
      for (int64_t j = 0; j < m; ++j) axpy(d + j * ow, br, ts[j][k], ow);
    }
#endif
    for (int64_t j = 0; j < m; ++j) add_scaled(y, y_dt, toks[j] * y_ld + o0, d + j * ow, scale, ow);
    return;
  }
  float delta[TB * OC];
  for (int64_t oc0 = o0; oc0 < o1; oc0 += OC) {
    const int64_t oc = std::min(OC, o1 - oc0);
    if (m < 4) {  // few tokens: one pass over B's rows, a rank-long dot per (row, token)
      int64_t o = 0;
#ifdef SB_HAVE_ROWS
      for (; o + 16 <= oc; o += 16) {
        for (int64_t j = 0; j < m; ++j)
          dot16_rows(b_slot + (oc0 + o) * b_s1 * bsz, b_s1 * bsz, b_dt, r, ts[j], delta + j * OC + o);
      }
#endif
      for (; o < oc; ++o) {
        const char* row = b_slot + (oc0 + o) * b_s1 * bsz;
        const float* br = reinterpret_cast<const float*>(row);
        if (b_dt != F32) {
          float* buf = Scratch::at_least(sc.brow, r);
          load_row(row, b_dt, r, buf);
          br = buf;
        }
        for (int64_t j = 0; j < m; ++j) delta[j * OC + o] = dot_rank(br, ts[j], r);
      }
    } else {  // a prefill block: B tile transposed to [r][OC] once, then FMAs across the outputs
      float* bt = Scratch::at_least(sc.bt, r * OC);
      for (int64_t o = 0; o < oc; ++o) {
        const char* row = b_slot + (oc0 + o) * b_s1 * bsz;
        if (b_dt == F32) {
          const float* br = reinterpret_cast<const float*>(row);
          for (int64_t k = 0; k < r; ++k) bt[k * OC + o] = br[k];
        } else {
          const uint16_t* br = reinterpret_cast<const uint16_t*>(row);
          for (int64_t k = 0; k < r; ++k) bt[k * OC + o] = bf16_to_f32(br[k]);
        }
      }
      for (int64_t j = 0; j < m; ++j) {
        float* dj = delta + j * OC;
        for (int64_t o = 0; o < OC; ++o) dj[o] = 0.f;
        for (int64_t k = 0; k < r; ++k) {
          const float tk = ts[j][k];
          const float* bk = bt + k * OC;
#pragma omp simd
          for (int64_t o = 0; o < OC; ++o) dj[o] += tk * bk[o];
        }
      }
    }
    for (int64_t j = 0; j < m; ++j) add_scaled(y, y_dt, toks[j] * y_ld + oc0, delta + j * OC, scale, oc);
  }
}

// Per stack of an apply call (lora.cpp, projection.cpp): a_ptr, a_s0, a_s1, padded rank, b_ptr, b_s0, b_s1, b_s2,
// n_out, y_ptr, y_ld.
constexpr int64_t APPLY_FIELDS = 11;

// One work item of the fused schedule: the m tokens toks of one segment `seg` (SEG_FIELDS), shrunk through every
// stack's A into t (t_block: TB x max_rank fp32 scratch) and expanded through its B into y_s += scale * t @ B^T.
inline void apply_block(const void* x, int64_t x_ld, int64_t x_dt, int64_t n_in, int64_t w_dt, const int64_t* toks,
                        int64_t m, const int64_t* seg, float scale, int64_t y_dt, int64_t n_stacks, const int64_t* d,
                        float* t_block, int64_t max_rank, Scratch& sc) {
  const float* xs[TB];
  float* t[TB];
  gather_x(x, x_ld, x_dt, n_in, toks, m, xs, sc);
  for (int64_t j = 0; j < m; ++j) t[j] = t_block + j * max_rank;
  const int64_t wsz = elem_size(w_dt);
  for (int64_t st = 0; st < n_stacks; ++st) {
    const int64_t* ds = d + st * APPLY_FIELDS;
    const int64_t r = seg_rank(seg, ds[3]);
    if (r == 0) continue;
    const char* a_slot = reinterpret_cast<const char*>(ds[0]) + seg[2] * ds[1] * wsz;
    const char* b_slot = reinterpret_cast<const char*>(ds[4]) + seg[2] * ds[5] * wsz;
    shrink_rows(xs, m, a_slot, ds[2], w_dt, n_in, 0, r, t, sc);
    expand_range(t, toks, m, b_slot, ds[6], ds[7], w_dt, r, 0, ds[8], scale, reinterpret_cast<void*>(ds[9]), ds[10],
                 y_dt, sc);
  }
}

}  // namespace sb
