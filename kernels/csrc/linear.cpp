// Linear layers on CPU for decode-sized calls, fp32 throughout: NF4 with the dequantization fused into the matmul,
// and dense weights through the same tiles and register blocks (read in place).
//
// W is bitsandbytes' NF4 layout: the row-major [N, K] weight flattened, two 4-bit codes per byte (the even
// element in the high nibble), one fp32 absmax per `bs` consecutive elements; value = code[q] * absmax.
// Work item = a tile of NT output rows: its NT x K weights are dequantized once into a thread-private
// buffer (L2-resident), then every token block reads them from cache. So W is read from memory as 4-bit
// codes, once per call, never written out as fp32 (what dequantize-then-matmul does: 8x the traffic).
// Inner kernel: MB tokens x NB rows of dot products over K in fp32 vectors (kernels/csrc/vec.h: 16 lanes on AVX-512,
// 8 on AVX2 and elsewhere), MB*NB register accumulators.
#include "pyargs.h"  // Python.h first, as the C API asks

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "avx512_rows.h"
#include "vec.h"

namespace {

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

// The tile loop both kernels share, OpenMP over tiles of NT output rows: tile(n0, rows, buf) returns the tile's
// first fp32 weight row (rows w_ld floats apart), filling `buf` (buf_floats per thread) if it needs one;
// source(n0, rows) is the contiguous byte range tile(n0, rows) reads from memory, which the blocks of the tile
// before it prefetch (a thread's tiles are consecutive under schedule(static)), so memory latency overlaps compute.
template <class Tile, class Source>
void for_tiles(const float* x, int64_t x_ld, int64_t M, int64_t K, int64_t N, float* y, int64_t y_ld,
               int64_t w_ld, int64_t n_threads, int64_t buf_floats, Tile tile, Source source) {
  const int64_t tiles = (N + NT - 1) / NT;
#pragma omp parallel num_threads(static_cast<int>(std::max<int64_t>(1, std::min(n_threads, tiles))))
  {
    std::vector<float> buf(static_cast<size_t>(buf_floats));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t n0 = t * NT, rows = std::min(NT, N - n0);
      const float* w = tile(n0, rows, buf.data());
      const char *next = nullptr, *next_end = nullptr;
      if (t + 1 < tiles) {
        const auto [ptr, bytes] = source(n0 + NT, std::min(NT, N - n0 - NT));
        next = ptr;
        next_end = ptr + bytes;
      }
      const int64_t m_blocks = (M + MB - 1) / MB, blocks = m_blocks * ((rows + NB - 1) / NB);
      const int64_t share = ((next_end - next + blocks - 1) / blocks + 63) / 64 * 64;  // bytes per block
      // row blocks outer: a block's NB weight rows stay in L1 for every token block (x streams from L2 instead:
      // 3-10% on the dense calls at 8-64 tokens, 1.4% on the decode step, Zen 3; unmeasured on AVX-512)
      for (int64_t j0 = 0; j0 < rows; j0 += NB)
        for (int64_t m0 = 0; m0 < M; m0 += MB) {
          const char* pf = std::min(next + share * ((j0 / NB) * m_blocks + m0 / MB), next_end);
          block(x, x_ld, m0, std::min(MB, M - m0), w, w_ld, K, j0, std::min(NB, rows - j0), y, y_ld, n0, pf,
                std::min(pf + share, next_end));
        }
    }
  }
}

}  // namespace

extern "C" {

// y[M, N] (row stride y_ld) = x[M, K] (row stride x_ld) @ dequant_nf4(W)^T, every value fp32.
void sb_nf4_linear(const float* x, int64_t x_ld, int64_t M, int64_t K, const uint8_t* packed, const float* absmax,
                   const float* code, int64_t bs, int64_t N, float* y, int64_t y_ld, int64_t n_threads) {
  for_tiles(
      x, x_ld, M, K, N, y, y_ld, K, n_threads, NT * K,
      [&](int64_t n0, int64_t rows, float* buf) {
        dequant_tile(packed, absmax, code, K, bs, n0, rows, buf);
        return static_cast<const float*>(buf);
      },
      [&](int64_t n0, int64_t rows) {
        return std::pair<const char*, int64_t>(reinterpret_cast<const char*>(packed + n0 * K / 2), rows * K / 2);
      });
}

// y[M, N] = x[M, K] @ W[N, K]^T for a dense fp32 W (rows w_ld apart): the same tiles and register blocks, each
// tile's rows read in place (the first token block pulls them into cache for the rest).
void sb_dense_linear(const float* x, int64_t x_ld, int64_t M, int64_t K, const float* w, int64_t w_ld, int64_t N,
                     float* y, int64_t y_ld, int64_t n_threads) {
  for_tiles(
      x, x_ld, M, K, N, y, y_ld, w_ld, n_threads, 0, [&](int64_t n0, int64_t, float*) { return w + n0 * w_ld; },
      [&](int64_t n0, int64_t rows) {  // rows w_ld apart: the span from the first row's start to the last's end
        return std::pair<const char*, int64_t>(reinterpret_cast<const char*>(w + n0 * w_ld),
                                               ((rows - 1) * w_ld + K) * static_cast<int64_t>(sizeof(float)));
      });
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
