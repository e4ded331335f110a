// AVX-512 helpers: 16 rows dotted with one vector (LoRA expand, attention scores), exp, and row accumulation.
#pragma once
#include <cstdint>

#include "vec.h"  // the ISA test, once

#if defined(SB_VEC_AVX512)
#define SB_HAVE_AVX512 1

namespace sb {

inline __m512 load16(const void* p, int64_t dt, __mmask16 mask) {
  if (dt == 0) return _mm512_maskz_loadu_ps(mask, p);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline __mmask16 tail_mask(int64_t remaining) {
  return remaining >= 16 ? static_cast<__mmask16>(0xffff)
                         : remaining <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << remaining) - 1);
}

// r[i] = sum(s[i]) for 16 vectors, as one vector: a transpose-and-add tree (45 ops, not 16 reductions).
inline __m512 reduce16(__m512* s) {
  __m512 u[4];
  for (int g = 0; g < 4; ++g) {
    __m512* q = s + 4 * g;
    const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(q[0], q[1]), _mm512_unpackhi_ps(q[0], q[1]));
    const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(q[2], q[3]), _mm512_unpackhi_ps(q[2], q[3]));
    u[g] = _mm512_add_ps(_mm512_shuffle_ps(t01, t23, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t01, t23, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 v01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 v23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(v01, v23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(v01, v23, _MM_SHUFFLE(3, 1, 3, 1)));
}

// out[0:16] = B[row0 + i, :r] . t[:r] for i < 16; rows `ld` elements apart, dtype dt (0 fp32, 1 bf16).
inline void dot16_rows(const char* b, int64_t ld_bytes, int64_t dt, int64_t r, const float* t, float* out) {
  __m512 s[16];
  for (int i = 0; i < 16; ++i) s[i] = _mm512_setzero_ps();
  const int64_t esz = dt == 0 ? 4 : 2;
  for (int64_t k = 0; k < r; k += 16) {
    const __mmask16 mask = r - k >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << (r - k)) - 1);
    const __m512 tv = _mm512_maskz_loadu_ps(mask, t + k);
    for (int i = 0; i < 16; ++i) s[i] = _mm512_fmadd_ps(load16(b + i * ld_bytes + k * esz, dt, mask), tv, s[i]);
  }
  _mm512_storeu_ps(out, reduce16(s));
}

// out[0:n] = sum_k t[k] * B[k, 0:n] for n <= 64, B's rows ld_bytes apart from b, dtype dt: four register
// accumulators over the r rows of a B tile.
inline void rank_major_tile(const char* b, int64_t ld_bytes, int64_t dt, int64_t r, const float* t, int64_t n,
                            float* out) {
  const __mmask16 k0 = n >= 16 ? 0xffff : static_cast<__mmask16>((1u << n) - 1);
  const __mmask16 k1 = n >= 32 ? 0xffff : n <= 16 ? 0 : static_cast<__mmask16>((1u << (n - 16)) - 1);
  const __mmask16 k2 = n >= 48 ? 0xffff : n <= 32 ? 0 : static_cast<__mmask16>((1u << (n - 32)) - 1);
  const __mmask16 k3 = n >= 64 ? 0xffff : n <= 48 ? 0 : static_cast<__mmask16>((1u << (n - 48)) - 1);
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  for (int64_t k = 0; k < r; ++k) {
    const __m512 w = _mm512_set1_ps(t[k]);
    const char* row = b + k * ld_bytes;
    const int64_t v = dt == 0 ? 64 : 32;  // bytes per 16 elements
    a0 = _mm512_fmadd_ps(w, load16(row, dt, k0), a0);
    a1 = _mm512_fmadd_ps(w, load16(row + v, dt, k1), a1);
    a2 = _mm512_fmadd_ps(w, load16(row + 2 * v, dt, k2), a2);
    a3 = _mm512_fmadd_ps(w, load16(row + 3 * v, dt, k3), a3);
  }
  _mm512_mask_storeu_ps(out, k0, a0);
  _mm512_mask_storeu_ps(out + 16, k1, a1);
  _mm512_mask_storeu_ps(out + 32, k2, a2);
  _mm512_mask_storeu_ps(out + 48, k3, a3);
}

// out[j][k + i] = A[i, :n] . x[j][:n] for i < R rows (`ld_bytes` apart from a, dtype dt) and j < M tokens (fp32):
// R * M independent register accumulators, each A vector loaded once for the M tokens, each summed in the same order.
template <int R, int M>
inline void dot_tile(const char* a, int64_t ld_bytes, int64_t dt, const float* const* x, int64_t n, float* const* out,
                     int64_t k) {
  __m512 s[R * M];
  for (int i = 0; i < R * M; ++i) s[i] = _mm512_setzero_ps();
  const int64_t esz = dt == 0 ? 4 : 2;
  for (int64_t c = 0; c < n; c += 16) {
    const __mmask16 mask = tail_mask(n - c);
    __m512 xv[M];
    for (int j = 0; j < M; ++j) xv[j] = _mm512_maskz_loadu_ps(mask, x[j] + c);
    for (int i = 0; i < R; ++i) {
      const __m512 av = load16(a + i * ld_bytes + c * esz, dt, mask);
      for (int j = 0; j < M; ++j) s[i * M + j] = _mm512_fmadd_ps(av, xv[j], s[i * M + j]);
    }
  }
  // one horizontal sum for every tile shape, so a row's result never depends on which tile it fell in (the tiling
  // follows the work split, which follows the thread count)
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < M; ++j) out[j][k + i] = _mm512_reduce_add_ps(s[i * M + j]);
}

// out[j][k] = A[k, :n] . x[j][:n] for k in [k0, k1), M tokens: tiles of 16 / 8 / 4 rows for 1 / 2 / 3-4 tokens.
template <int M>
inline void dot_rows_tiled(const char* a, int64_t ld_bytes, int64_t dt, const float* const* x, int64_t n,
                           float* const* out, int64_t k0, int64_t k1) {
  constexpr int RT = M == 1 ? 16 : M == 2 ? 8 : 4;
  int64_t k = k0;
  for (; k + RT <= k1; k += RT) dot_tile<RT, M>(a + k * ld_bytes, ld_bytes, dt, x, n, out, k);
  for (; k + 4 <= k1; k += 4) dot_tile<4, M>(a + k * ld_bytes, ld_bytes, dt, x, n, out, k);
  for (; k < k1; ++k) dot_tile<1, M>(a + k * ld_bytes, ld_bytes, dt, x, n, out, k);
}

// exp(x) for x <= 0, 16 lanes: the same Cephes polynomial as attention.cpp's scalar exp_neg.
inline __m512 exp16_neg(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fmadd_ps(fx, _mm512_set1_ps(2.12194440e-4f), x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, z, x), _mm512_set1_ps(1.0f));
  const __m512i n = _mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127));
  return _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(n, 23)));
}

// s[0:n] = exp(s[0:n] - mx) in place; returns their sum.
inline float exp_sub_sum(float* s, int64_t n, float mx) {
  const __m512 m = _mm512_set1_ps(mx);
  __m512 total = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 k = tail_mask(n - i);
    const __m512 e = _mm512_maskz_mov_ps(k, exp16_neg(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), m)));
    _mm512_mask_storeu_ps(s + i, k, e);
    total = _mm512_add_ps(total, e);
  }
  return _mm512_reduce_add_ps(total);
}

// a[0:D] += sum_i e[i] * v[i][0:D]: four register accumulators per 64 features, one pass over the n rows.
inline void axpy_rows(float* a, int64_t D, const float* e, const float* const* v, int64_t n) {
  for (int64_t d0 = 0; d0 < D; d0 += 64) {
    const __mmask16 k0 = tail_mask(D - d0), k1 = tail_mask(D - d0 - 16), k2 = tail_mask(D - d0 - 32),
                    k3 = tail_mask(D - d0 - 48);
    __m512 a0 = _mm512_maskz_loadu_ps(k0, a + d0), a1 = _mm512_maskz_loadu_ps(k1, a + d0 + 16);
    __m512 a2 = _mm512_maskz_loadu_ps(k2, a + d0 + 32), a3 = _mm512_maskz_loadu_ps(k3, a + d0 + 48);
    for (int64_t i = 0; i < n; ++i) {
      const __m512 w = _mm512_set1_ps(e[i]);
      const float* r = v[i] + d0;
      a0 = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(k0, r), a0);
      a1 = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(k1, r + 16), a1);
      a2 = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(k2, r + 32), a2);
      a3 = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(k3, r + 48), a3);
    }
    _mm512_mask_storeu_ps(a + d0, k0, a0);
    _mm512_mask_storeu_ps(a + d0 + 16, k1, a1);
    _mm512_mask_storeu_ps(a + d0 + 32, k2, a2);
    _mm512_mask_storeu_ps(a + d0 + 48, k3, a3);
  }
}

}  // namespace sb
#endif
