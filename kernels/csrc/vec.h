// One fp32 vector type for the dense / NF4 linear kernels, per ISA: `sb::vf` of VL lanes with zero, load, fma,
// a horizontal sum in one fixed order, and the NF4 code lookup. AVX-512: __m512 (16 lanes); AVX2 + FMA: __m256
// (8 lanes; what AMD Zen 1-3 and most Intel client CPUs have); anything else: GCC's vector extension of 8 lanes,
// which the compiler lowers to the machine's own SIMD (SSE, NEON). Without this the non-AVX-512 build ran scalar
// loops the compiler cannot vectorize (a strict fp32 sum order): 5-12x slower than torch's F.linear on AVX2.
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SB_VEC_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SB_VEC_AVX2 1
#endif

namespace sb {

#if defined(SB_VEC_AVX512)
using vf = __m512;
constexpr int VL = 16;
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }  // a * b + c, one rounding
inline float vsum(vf v) { return _mm512_reduce_add_ps(v); }

// out[0:32] = code[q] * scale for the 32 4-bit codes of p[0:16] (the even element in the high nibble)
inline void nf4_dequant32(const uint8_t* p, const float* code, float scale, float* out) {
  const __m512 lut = _mm512_loadu_ps(code);
  const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m512i hi = _mm512_srli_epi32(b, 4), lo = _mm512_and_si512(b, _mm512_set1_epi32(15));
  const __m512 s = _mm512_set1_ps(scale);
  _mm512_storeu_ps(out, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, lo_idx, lo), lut), s));
  _mm512_storeu_ps(out + 16, _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_permutex2var_epi32(hi, hi_idx, lo), lut), s));
}

#elif defined(SB_VEC_AVX2)
using vf = __m256;
constexpr int VL = 8;
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(vf v) {  // ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}

inline __m256 nf4_lookup8(__m256 lut_lo, __m256 lut_hi, __m256i idx) {  // lut[idx] for idx in [0, 16)
  const __m256 from_hi = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 of idx -> the sign bit
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lut_lo, idx), _mm256_permutevar8x32_ps(lut_hi, idx), from_hi);
}

inline void nf4_dequant32(const uint8_t* p, const float* code, float scale, float* out) {
  const __m256 lut_lo = _mm256_loadu_ps(code), lut_hi = _mm256_loadu_ps(code + 8), s = _mm256_set1_ps(scale);
  for (int half = 0; half < 2; ++half) {
    int64_t bytes8;
    std::memcpy(&bytes8, p + 8 * half, 8);
    const __m256i b = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(bytes8));
    const __m256i hi = _mm256_srli_epi32(b, 4), lo = _mm256_and_si256(b, _mm256_set1_epi32(15));
    const __m256i u0 = _mm256_unpacklo_epi32(hi, lo), u1 = _mm256_unpackhi_epi32(hi, lo);  // per 128-bit lane
    const __m256i first = _mm256_permute2x128_si256(u0, u1, 0x20), second = _mm256_permute2x128_si256(u0, u1, 0x31);
    _mm256_storeu_ps(out + 16 * half, _mm256_mul_ps(nf4_lookup8(lut_lo, lut_hi, first), s));
    _mm256_storeu_ps(out + 16 * half + 8, _mm256_mul_ps(nf4_lookup8(lut_lo, lut_hi, second), s));
  }
}

#else
#pragma GCC diagnostic ignored "-Wpsabi"  // 32-byte vectors by value without AVX: fine, everything here is inline
typedef float vf __attribute__((vector_size(32)));  // NOLINT: GCC / Clang vector extension, 8 lanes
constexpr int VL = 8;
inline vf vzero() { return vf{}; }
inline vf vload(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
inline float vsum(vf v) { return ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7])); }

inline void nf4_dequant32(const uint8_t* p, const float* code, float scale, float* out) {
  for (int i = 0; i < 16; ++i) {
    out[2 * i] = code[p[i] >> 4] * scale;
    out[2 * i + 1] = code[p[i] & 15] * scale;
  }
}
#endif

}  // namespace sb
