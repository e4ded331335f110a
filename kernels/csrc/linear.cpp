// Linear layers on CPU for decode-sized calls, fp32 throughout: NF4 with the dequantization fused into the matmul,
// and dense weights through the same tiles and register blocks (read in place). The tiles: linear_tiles.h.
#include "pyargs.h"  // Python.h first, as the C API asks

#include <algorithm>
#include <cstdint>
#include <vector>

#include "linear_tiles.h"

namespace {

// y = x @ W^T, OpenMP over tiles of NT output rows; a thread's tiles are consecutive under schedule(static), so the
// blocks of each tile prefetch the next one's weights.
void for_tiles(const float* x, int64_t x_ld, int64_t M, const sb::tiles::Weights& W, float* y, int64_t y_ld,
               int64_t n_threads) {
  const int64_t tiles = W.tiles();
#pragma omp parallel num_threads(static_cast<int>(std::max<int64_t>(1, std::min(n_threads, tiles))))
  {
    std::vector<float> buf(static_cast<size_t>(W.buf_floats()));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const auto [next, next_end] = W.source(t + 1);
      sb::tiles::run_tile(x, x_ld, M, W, t, buf.data(), y, y_ld, next, next_end);
    }
  }
}

}  // namespace

extern "C" {

// y[M, N] (row stride y_ld) = x[M, K] (row stride x_ld) @ dequant_nf4(W)^T, every value fp32.
void sb_nf4_linear(const float* x, int64_t x_ld, int64_t M, int64_t K, const uint8_t* packed, const float* absmax,
                   const float* code, int64_t bs, int64_t N, float* y, int64_t y_ld, int64_t n_threads) {
  for_tiles(x, x_ld, M, {nullptr, 0, packed, absmax, code, bs, N, K}, y, y_ld, n_threads);
}

// y[M, N] = x[M, K] @ W[N, K]^T for a dense fp32 W (rows w_ld apart): the same tiles and register blocks, each
// tile's rows read in place (the first token block pulls them into cache for the rest).
void sb_dense_linear(const float* x, int64_t x_ld, int64_t M, int64_t K, const float* w, int64_t w_ld, int64_t N,
                     float* y, int64_t y_ld, int64_t n_threads) {
  for_tiles(x, x_ld, M, {w, w_ld, nullptr, nullptr, nullptr, 0, N, K}, y, y_ld, n_threads);
}

}  // extern "C"

namespace {

// linear(x, x_ld, M, K, packed, absmax, code, bs, N, y, y_ld, n_threads)
PyObject* py_linear(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 12) return sb::arg_error("linear: 12 ints");
  int64_t v[12];
  if (!sb::read_ints(args, nargs, v)) return nullptr;
  if (v[3] % v[7] || v[7] % 32) return sb::arg_error("linear: K must be a multiple of the block size (a multiple of 32)");
  Py_BEGIN_ALLOW_THREADS
  sb_nf4_linear(reinterpret_cast<const float*>(v[0]), v[1], v[2], v[3], reinterpret_cast<const uint8_t*>(v[4]),
                reinterpret_cast<const float*>(v[5]), reinterpret_cast<const float*>(v[6]), v[7], v[8],
                reinterpret_cast<float*>(v[9]), v[10], v[11]);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

// dense(x, x_ld, M, K, w, w_ld, N, y, y_ld, n_threads)
PyObject* py_dense(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 10) return sb::arg_error("dense: 10 ints");
  int64_t v[10];
  if (!sb::read_ints(args, nargs, v)) return nullptr;
  if (v[3] % 16) return sb::arg_error("dense: K must be a multiple of 16");
  Py_BEGIN_ALLOW_THREADS
  sb_dense_linear(reinterpret_cast<const float*>(v[0]), v[1], v[2], v[3], reinterpret_cast<const float*>(v[4]), v[5],
                  v[6], reinterpret_cast<float*>(v[7]), v[8], v[9]);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"dense", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_dense)), METH_FASTCALL,
     "y = x @ W^T for a dense fp32 W over raw pointers"},
    {"linear", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_linear)), METH_FASTCALL,
     "y = x @ dequant_nf4(W)^T over raw pointers, fp32"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "sb_linear", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_sb_linear() { return PyModule_Create(&module); }
