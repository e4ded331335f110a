// The per-token pointwise work of a decoder layer on CPU, fp32: RMSNorm, and rotary embeddings applied to q and k
// with k and v written into the paged KV cache. In torch each is several small ops per call (~15-60 us at decode
// sizes, where the work itself is a few us); here each is one pass over its rows. (SiLU(gate) * up was tried
// too: torch's vectorized exp on two threads is as fast, so it stays torch's.) Rows are
// split across threads only when there are enough of them (prefill chunks): a decode step's rows are too few
// to repay a parallel region.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "pyargs.h"

namespace {

constexpr int64_t PARALLEL_MIN_ELEMS = 1 << 18;  // below this many elements one thread does the whole call

inline int threads_for(int64_t elems, int64_t n_threads) {
  return elems >= PARALLEL_MIN_ELEMS ? static_cast<int>(std::max<int64_t>(1, n_threads)) : 1;
}

// dst[i] = x1 * c - x2 * s, dst[i + half] = x2 * c' + x1 * s' (rotate-half RoPE), for one head of dim values.
inline void rotate_head(const float* x, const float* c, const float* s, int64_t dim, float* dst) {
  const int64_t half = dim / 2;
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    dst[i] = x1 * c[i] - x2 * s[i];
    dst[i + half] = x2 * c[i + half] + x1 * s[i + half];
  }
}

// One row of RMSNorm: y = x / sqrt(mean(x^2) + eps) * w.
inline void rms_norm_row(const float* x, const float* w, float eps, int64_t n, float* y) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = (x[i] * inv) * w[i];
}

}  // namespace

extern "C" {

// y[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w, rows m < M of N floats (x rows x_ld apart, y rows y_ld apart).
void sb_rms_norm(const float* x, int64_t x_ld, int64_t M, int64_t N, const float* w, float eps, float* y,
                 int64_t y_ld, int64_t n_threads) {
#pragma omp parallel for schedule(static) num_threads(threads_for(M * N, n_threads))
  for (int64_t m = 0; m < M; ++m) rms_norm_row(x + m * x_ld, w, eps, N, y + m * y_ld);
}

// For each token t < T: q_out[t, h] = rope(q[t, h]) for h < heads; k_cache[slots[t], g] = rope(k[t, g]) and
// v_cache[slots[t], g] = v[t, g] for g < kv_heads; cos/sin [T, dim] contiguous. Heads are dim floats apart
// within a token's row. Returns -1 (nothing written) when a slot lies outside 0..n_slots-1.
int64_t sb_rope_cache(const float* q, int64_t q_ld, const float* k, int64_t k_ld, const float* v, int64_t v_ld,
                      int64_t T, int64_t heads, int64_t kv_heads, int64_t dim, const float* cos, const float* sin,
                      const int64_t* slots, int64_t n_slots, float* k_cache, int64_t kc_ld, float* v_cache,
                      int64_t vc_ld, float* q_out, int64_t qo_ld, int64_t n_threads) {
  for (int64_t t = 0; t < T; ++t)
    if (slots[t] < 0 || slots[t] >= n_slots) return -1;
#pragma omp parallel for schedule(static) num_threads(threads_for(T * (heads + 2 * kv_heads) * dim, n_threads))
  for (int64_t t = 0; t < T; ++t) {
    const float* c = cos + t * dim;
    const float* s = sin + t * dim;
    for (int64_t h = 0; h < heads; ++h) rotate_head(q + t * q_ld + h * dim, c, s, dim, q_out + t * qo_ld + h * dim);
    float* kd = k_cache + slots[t] * kc_ld;
    for (int64_t g = 0; g < kv_heads; ++g) rotate_head(k + t * k_ld + g * dim, c, s, dim, kd + g * dim);
    std::memcpy(v_cache + slots[t] * vc_ld, v + t * v_ld, kv_heads * dim * sizeof(float));
  }
  return 0;
}

}  // extern "C"

namespace {

// rms_norm(x, x_ld, M, N, w, eps_bits, y, y_ld, n_threads): eps passed as its float32 bit pattern
PyObject* py_rms_norm(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 9) return sb::arg_error("rms_norm: 9 ints");
  int64_t v[9];
  if (!sb::read_ints(args, nargs, v)) return nullptr;
  const uint32_t bits = static_cast<uint32_t>(v[5]);
  float eps;
  std::memcpy(&eps, &bits, 4);
  Py_BEGIN_ALLOW_THREADS
  sb_rms_norm(reinterpret_cast<const float*>(v[0]), v[1], v[2], v[3], reinterpret_cast<const float*>(v[4]), eps,
              reinterpret_cast<float*>(v[6]), v[7], v[8]);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// rope_cache(q, q_ld, k, k_ld, v, v_ld, T, heads, kv_heads, dim, cos, sin, slots, n_slots, k_cache, kc_ld,
//            v_cache, vc_ld, q_out, qo_ld, n_threads) -> 0, or -1 for a slot outside the cache
PyObject* py_rope_cache(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 21) return sb::arg_error("rope_cache: 21 ints");
  int64_t v[21];
  if (!sb::read_ints(args, nargs, v)) return nullptr;
  if (v[9] % 2) return sb::arg_error("rope_cache: the head dim must be even");
  int64_t rc;
  Py_BEGIN_ALLOW_THREADS
  rc = sb_rope_cache(reinterpret_cast<const float*>(v[0]), v[1], reinterpret_cast<const float*>(v[2]), v[3],
                     reinterpret_cast<const float*>(v[4]), v[5], v[6], v[7], v[8], v[9],
                     reinterpret_cast<const float*>(v[10]), reinterpret_cast<const float*>(v[11]),
                     reinterpret_cast<const int64_t*>(v[12]), v[13], reinterpret_cast<float*>(v[14]), v[15],
                     reinterpret_cast<float*>(v[16]), v[17], reinterpret_cast<float*>(v[18]), v[19], v[20]);
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(rc);
}

PyMethodDef methods[] = {
    {"rms_norm", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_rms_norm)), METH_FASTCALL,
     "y = x / sqrt(mean(x^2) + eps) * w over raw pointers, fp32"},
    {"rope_cache", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_rope_cache)), METH_FASTCALL,
     "rotary embeddings on q and k, k and v written into the KV cache, fp32"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "sb_pointwise", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_sb_pointwise() { return PyModule_Create(&module); }
