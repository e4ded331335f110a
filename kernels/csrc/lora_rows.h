// Row helpers of the LoRA kernels (lora.cpp): token-row dots for the shrink, rank dots / axpys for the expand.
#pragma once
#include <algorithm>
#include <cstdint>

#include "common.h"

namespace sb {

// out[m] = dot(a, xs[m]) for M token rows, one pass over a.
template <int M>
inline void dot_rows(const float* a, const float* const* xs, int64_t n, float* out) {
  float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
  const float* x0 = xs[0];
  const float* x1 = M > 1 ? xs[1] : xs[0];
  const float* x2 = M > 2 ? xs[2] : xs[0];
  const float* x3 = M > 3 ? xs[3] : xs[0];
#pragma omp simd reduction(+ : s0, s1, s2, s3)
  for (int64_t i = 0; i < n; ++i) {
    const float v = a[i];
    s0 += v * x0[i];
    if (M > 1) s1 += v * x1[i];
    if (M > 2) s2 += v * x2[i];
    if (M > 3) s3 += v * x3[i];
  }
  out[0] = s0;
  if (M > 1) out[1] = s1;
  if (M > 2) out[2] = s2;
  if (M > 3) out[3] = s3;
}

inline void dot_any(const float* a, const float* const* xs, int64_t m, int64_t n, float* out) {
  for (int64_t g = 0; g < m; g += 4) {
    switch (std::min<int64_t>(4, m - g)) {
      case 4: dot_rows<4>(a, xs + g, n, out + g); break;
      case 3: dot_rows<3>(a, xs + g, n, out + g); break;
      case 2: dot_rows<2>(a, xs + g, n, out + g); break;
      default: dot_rows<1>(a, xs + g, n, out + g); break;
    }
  }
}

template <int R>
inline float dot_fixed(const float* a, const float* b) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int k = 0; k < R; ++k) s += a[k] * b[k];
  return s;
}

// dot over a rank-long row; the common ranks get a fully unrolled vector body
inline float dot_rank(const float* a, const float* b, int64_t r) {
  switch (r) {
    case 8: return dot_fixed<8>(a, b);
    case 16: return dot_fixed<16>(a, b);
    case 32: return dot_fixed<32>(a, b);
    case 64: return dot_fixed<64>(a, b);
    default: {
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t k = 0; k < r; ++k) s += a[k] * b[k];
      return s;
    }
  }
}

// d[0:n] += w * b[0:n]
inline void axpy(float* d, const float* b, float w, int64_t n) {
#pragma omp simd
  for (int64_t o = 0; o < n; ++o) d[o] += w * b[o];
}

// y[at : at + n] += scale * d[0:n], rounded once into y's dtype
inline void add_scaled(void* y, int64_t y_dt, int64_t at, const float* d, float scale, int64_t n) {
  if (y_dt == sb::F32) {
    float* yr = static_cast<float*>(y) + at;
#pragma omp simd
    for (int64_t o = 0; o < n; ++o) yr[o] += scale * d[o];
  } else {
    uint16_t* yr = static_cast<uint16_t*>(y) + at;
    for (int64_t o = 0; o < n; ++o) yr[o] = sb::f32_to_bf16(sb::bf16_to_f32(yr[o]) + d[o] * scale);
  }
}

// Prefetch [p, p + bytes) into the caches, one request per 64-byte line: the next table row while this one is
// multiplied (the hardware streamer stops at every 4 KiB page, and one decode row is only a few pages).
inline void prefetch_bytes(const char* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, 3);
}

}  // namespace sb
