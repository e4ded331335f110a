// AVX2 + FMA versions of avx512_rows.h's helpers, same signatures and meaning, 8 fp32 lanes: what AMD Zen 1-3 and
// most Intel client CPUs run. Without them those machines took the kernels' scalar / omp-simd fallbacks: a 512-token
// prefill's attention 2.3x slower than torch's SDPA (bench/kernels.py on a Zen 3). Every sum of one row is taken in
// one fixed order (lanes, then sb::vsum's tree), so results never depend on how rows are tiled.
#pragma once
#include <cstdint>
#include <cstring>

#include "vec.h"

#if defined(SB_VEC_AVX2)
#define SB_HAVE_AVX2_ROWS 1

namespace sb {

inline __m256 lanes_below(int64_t n) {  // as a maskload mask: lane i set when i < n
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
}

// 8 values of compile-time dtype DT (0 fp32, 1 bf16) from p as fp32, no tail: the hot loops' body.
template <int DT>
inline __m256 load8_full(const void* p) {
  if constexpr (DT == 0) {
    return _mm256_loadu_ps(static_cast<const float*>(p));
  } else {
    const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

// 8 values of dtype dt (0 fp32, 1 bf16) from p as fp32; only the first n (< 8: the rest read as 0, not touched).
inline __m256 load8(const void* p, int64_t dt, int64_t n) {
  if (n >= 8) return dt == 0 ? load8_full<0>(p) : load8_full<1>(p);
  if (n <= 0) return _mm256_setzero_ps();
  if (dt == 0) return _mm256_maskload_ps(static_cast<const float*>(p), _mm256_castps_si256(lanes_below(n)));
  uint16_t tmp[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  std::memcpy(tmp, p, static_cast<size_t>(n) * 2);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<__m128i*>(tmp))),
                                               16));
}

inline void store8(float* p, __m256 v, int64_t n) {  // the first min(n, 8) lanes
  if (n >= 8) {
    _mm256_storeu_ps(p, v);
  } else if (n > 0) {
    _mm256_maskstore_ps(p, _mm256_castps_si256(lanes_below(n)), v);
  }
}

// r[i] = sum(s[i]) for 8 vectors, as one vector (a hadd tree)
inline __m256 reduce8(const __m256* s) {
  const __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(s[0], s[1]), _mm256_hadd_ps(s[2], s[3]));
  const __m256 h4567 = _mm256_hadd_ps(_mm256_hadd_ps(s[4], s[5]), _mm256_hadd_ps(s[6], s[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20), _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

// out[0:16] = B[row0 + i, :r] . t[:r] for i < 16; rows `ld_bytes` apart, dtype dt: two groups of 8 rows.
inline void dot16_rows(const char* b, int64_t ld_bytes, int64_t dt, int64_t r, const float* t, float* out) {
  const int64_t esz = dt == 0 ? 4 : 2;
  for (int g = 0; g < 2; ++g) {
    const char* bg = b + 8 * g * ld_bytes;
    __m256 s[8];
    for (auto& v : s) v = _mm256_setzero_ps();
    for (int64_t k = 0; k < r; k += 8) {
      const __m256 tv = load8(t + k, 0, r - k);
      for (int i = 0; i < 8; ++i) s[i] = _mm256_fmadd_ps(load8(bg + i * ld_bytes + k * esz, dt, r - k), tv, s[i]);
    }
    _mm256_storeu_ps(out + 8 * g, reduce8(s));
  }
}

// out[j][k + i] = A[i, :n] . x[j][:n] for i < R rows (`ld_bytes` apart from a, dtype DT) and j < M tokens (fp32).
// Full vectors first, the tail once: no per-load dtype or length test in the loop (4% of a decode step's LoRA work).
template <int R, int M, int DT>
inline void dot_tile(const char* a, int64_t ld_bytes, const float* const* x, int64_t n, float* const* out,
                     int64_t k) {
  __m256 s[R * M];
  for (int i = 0; i < R * M; ++i) s[i] = _mm256_setzero_ps();
  constexpr int64_t esz = DT == 0 ? 4 : 2;
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    __m256 xv[M];
    for (int j = 0; j < M; ++j) xv[j] = _mm256_loadu_ps(x[j] + c);
    for (int i = 0; i < R; ++i) {
      const __m256 av = load8_full<DT>(a + i * ld_bytes + c * esz);
      for (int j = 0; j < M; ++j) s[i * M + j] = _mm256_fmadd_ps(av, xv[j], s[i * M + j]);
    }
  }
  if (c < n) {
    __m256 xv[M];
    for (int j = 0; j < M; ++j) xv[j] = load8(x[j] + c, 0, n - c);
    for (int i = 0; i < R; ++i) {
      const __m256 av = load8(a + i * ld_bytes + c * esz, DT, n - c);
      for (int j = 0; j < M; ++j) s[i * M + j] = _mm256_fmadd_ps(av, xv[j], s[i * M + j]);
    }
  }
  for (int i = 0; i < R; ++i)  // one horizontal sum for every tile shape (see avx512_rows.h)
    for (int j = 0; j < M; ++j) out[j][k + i] = vsum(s[i * M + j]);
}

template <int M, int DT>
inline void dot_rows_tiled_t(const char* a, int64_t ld_bytes, const float* const* x, int64_t n,
                             float* const* out, int64_t k0, int64_t k1) {
  constexpr int RT = M == 1 ? 8 : M == 2 ? 4 : 2;
  int64_t k = k0;
  for (; k + RT <= k1; k += RT) dot_tile<RT, M, DT>(a + k * ld_bytes, ld_bytes, x, n, out, k);
  for (; k < k1; ++k) dot_tile<1, M, DT>(a + k * ld_bytes, ld_bytes, x, n, out, k);
}

// out[j][k] = A[k, :n] . x[j][:n] for k in [k0, k1), M tokens: tiles of 8 / 4 / 2 rows for 1 / 2 / 3-4 tokens
// (R * M accumulators + M token vectors + 1 row within 16 ymm registers).
template <int M>
inline void dot_rows_tiled(const char* a, int64_t ld_bytes, int64_t dt, const float* const* x, int64_t n,
                           float* const* out, int64_t k0, int64_t k1) {
  if (dt == 0) {
    dot_rows_tiled_t<M, 0>(a, ld_bytes, x, n, out, k0, k1);
  } else {
    dot_rows_tiled_t<M, 1>(a, ld_bytes, x, n, out, k0, k1);
  }
}

// d[j * n + o] += sum_k t[j][k] * B[k, o] for o < n, j < m: B's r rows (ld_bytes apart, dtype DT) read once, in
// order, each row's n values as one stream, the m fp32 rows of d in L1 / L2. Each output's sum runs over k in
// order, one FMA per k: the same values as avx512_rows.h's rank_major_tile.
template <int DT>
inline void rank_major_rows_t(const char* b, int64_t ld_bytes, int64_t r, const float* const* t, int64_t m, int64_t n,
                              float* d) {
  constexpr int64_t esz = DT == 0 ? 4 : 2;
  for (int64_t k = 0; k < r; ++k) {
    const char* row = b + k * ld_bytes;
    for (int64_t j = 0; j < m; ++j) {
      const __m256 w = _mm256_set1_ps(t[j][k]);
      float* dj = d + j * n;
      int64_t o = 0;
      for (; o + 8 <= n; o += 8)
        _mm256_storeu_ps(dj + o, _mm256_fmadd_ps(w, load8_full<DT>(row + o * esz), _mm256_loadu_ps(dj + o)));
      if (o < n) store8(dj + o, _mm256_fmadd_ps(w, load8(row + o * esz, DT, n - o), load8(dj + o, 0, n - o)), n - o);
    }
  }
}

inline void rank_major_rows(const char* b, int64_t ld_bytes, int64_t dt, int64_t r, const float* const* t, int64_t m,
                            int64_t n, float* d) {
  if (dt == 0) {
    rank_major_rows_t<0>(b, ld_bytes, r, t, m, n, d);
  } else {
    rank_major_rows_t<1>(b, ld_bytes, r, t, m, n, d);
  }
}

// exp(x) for x <= 0, 8 lanes: the same Cephes polynomial as avx512_rows.h's exp16_neg.
inline __m256 exp8_neg(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fmadd_ps(fx, _mm256_set1_ps(2.12194440e-4f), x);
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_add_ps(_mm256_fmadd_ps(y, z, x), _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(e, 23)));
}

// s[0:n] = exp(s[0:n] - mx) in place; returns their sum.
inline float exp_sub_sum(float* s, int64_t n, float mx) {
  const __m256 m = _mm256_set1_ps(mx);
  __m256 total = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) {
    const __m256 keep = lanes_below(n - i);
    const __m256 e = _mm256_and_ps(keep, exp8_neg(_mm256_sub_ps(load8(s + i, 0, n - i), m)));
    store8(s + i, e, n - i);
    total = _mm256_add_ps(total, e);
  }
  return vsum(total);
}

// a[0:D] += sum_i e[i] * v[i][0:D]: eight register accumulators per 64 features, one pass over the n rows.
inline void axpy_rows(float* a, int64_t D, const float* e, const float* const* v, int64_t n) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    __m256 acc[8];
    for (int c = 0; c < 8; ++c) acc[c] = load8(a + d0 + 8 * c, 0, D - d0 - 8 * c);
    for (int64_t i = 0; i < n; ++i) {
      const __m256 w = _mm256_set1_ps(e[i]);
      const float* r = v[i] + d0;
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(w, load8(r + 8 * c, 0, D - d0 - 8 * c), acc[c]);
    }
    for (int c = 0; c < 8; ++c) store8(a + d0 + 8 * c, acc[c], D - d0 - 8 * c);
  }
}

}  // namespace sb
#endif
