// AVX-512 helper for expand: 16 rows of B (rank-long, contiguous) dotted with one t row, sums in one vector.
#pragma once
#include <cstdint>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SB_HAVE_AVX512 1

namespace sb {

inline __m512 load16(const void* p, int64_t dt, __mmask16 mask) {
  if (dt == 0) return _mm512_maskz_loadu_ps(mask, p);
  const __m256i h = _mm256_maskz_loadu_epi16(mask, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
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

}  // namespace sb
#endif
