// Shared helpers for the CPU kernels: bf16 <-> fp32 (bit exact with torch), and a dtype tag.
#pragma once
#include <cstdint>
#include <cstring>

namespace sb {

enum Dtype : int64_t { F32 = 0, BF16 = 1 };

static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN kept quiet: what torch's float -> bfloat16 conversion does.
static inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// n values of dtype `dt` at `src` (contiguous) into fp32 `dst`.
static inline void load_row(const void* src, int64_t dt, int64_t n, float* dst) {
  if (dt == F32) {
    std::memcpy(dst, src, n * sizeof(float));
  } else {
    const uint16_t* s = static_cast<const uint16_t*>(src);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
  }
}

static inline int64_t elem_size(int64_t dt) { return dt == F32 ? 4 : 2; }

}  // namespace sb
