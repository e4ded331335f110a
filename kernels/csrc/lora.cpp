// Segmented LoRA shrink / expand on CPU: one call per op for the whole batch, OpenMP over work items.
//
// A work item is (segment, block of up to TB of its tokens, one stack, a range of rank rows) for shrink and
// (segment, token block, a range of output features) for expand. Rank / output ranges are split only when
// the batch has too few items to keep every thread busy (one long prefill segment, a single token), so in
// the usual decode step every adapter's A and B is read from memory by exactly one thread, once; a
// segment's token blocks re-read its A/B from cache, not memory. Accumulation is in fp32 throughout.
#include "pyargs.h"  // Python.h first, as the C API asks

#include <algorithm>
#include <cstdint>
#include <vector>

#include "avx512_rows.h"
#include "common.h"

namespace {

constexpr int64_t TB = 8;   // tokens per work item
constexpr int64_t OC = 64;  // output features per expand tile (B tile transposed to [rank][OC] in fp32)

struct ShrinkItem { int64_t seg, j0, j1, stack, k0, k1; };
struct ExpandItem { int64_t seg, j0, j1, o0, o1; };

inline int64_t tok_at(const int64_t* index, int64_t pos) { return index ? index[pos] : pos; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

// below this many table elements a call runs on the calling thread (an OpenMP fork/join costs more)
constexpr int64_t PARALLEL_MIN_WORK = 32768;

// per stack descriptor: a_ptr, a_stride_slot, a_stride_rank (elements), padded rank, t_ptr, t_ld
constexpr int64_t STACK_FIELDS = 6;
// per segment: lo, hi, slot, true rank (-1 = the tables' padded rank)
constexpr int64_t SEG_FIELDS = 4;

inline int64_t seg_rank(const int64_t* seg, int64_t padded) {
  return seg[3] < 0 ? padded : std::min(seg[3], padded);
}

}  // namespace

extern "C" {

// t_s[tok, :r] = x[tok] @ A_s[slot]^T for every stack s and every token of every segment (t preset to 0).
int64_t sb_lora_shrink(const void* x, int64_t x_ld, int64_t x_dt, int64_t n_in, int64_t n_stacks,
                       const int64_t* stacks, int64_t a_dt, const int64_t* segs, int64_t n_segs,
                       const int64_t* tok_index, int64_t n_threads) {
  std::vector<ShrinkItem> items;
  int64_t base = 0, work = 0;
  for (int64_t s = 0; s < n_segs; ++s) base += ceil_div(segs[s * SEG_FIELDS + 1] - segs[s * SEG_FIELDS], TB);
  base *= n_stacks;
  const int64_t want = 2 * n_threads;
  const int64_t splits = base >= want || base == 0 ? 1 : ceil_div(want, base);
  for (int64_t s = 0; s < n_segs; ++s) {
    const int64_t* sg = segs + s * SEG_FIELDS;
    for (int64_t j0 = sg[0]; j0 < sg[1]; j0 += TB) {
      for (int64_t st = 0; st < n_stacks; ++st) {
        const int64_t r = seg_rank(sg, stacks[st * STACK_FIELDS + 3]);
        const int64_t step = std::max<int64_t>(1, ceil_div(r, splits));
        for (int64_t k0 = 0; k0 < r; k0 += step)
          items.push_back({s, j0, std::min(j0 + TB, sg[1]), st, k0, std::min(k0 + step, r)});
        work += r * n_in;
      }
    }
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t xsz = sb::elem_size(x_dt), asz = sb::elem_size(a_dt);
  const bool parallel = n_items > 1 && n_threads > 1 && work >= PARALLEL_MIN_WORK;
#pragma omp parallel num_threads(n_threads) if (parallel)
  {
    std::vector<float> xbuf, abuf(n_in);
    const float* xs[TB];
    float acc[TB];
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const ShrinkItem& w = items[it];
      const int64_t* sg = segs + w.seg * SEG_FIELDS;
      const int64_t* sk = stacks + w.stack * STACK_FIELDS;
      const int64_t m = w.j1 - w.j0;
      int64_t toks[TB];
      for (int64_t j = 0; j < m; ++j) {
        toks[j] = tok_at(tok_index, w.j0 + j);
        const char* row = static_cast<const char*>(x) + toks[j] * x_ld * xsz;
        if (x_dt == sb::F32) {
          xs[j] = reinterpret_cast<const float*>(row);
        } else {
          xbuf.resize(TB * n_in);
          sb::load_row(row, x_dt, n_in, xbuf.data() + j * n_in);
          xs[j] = xbuf.data() + j * n_in;
        }
      }
      const char* a_slot = reinterpret_cast<const char*>(sk[0]) + sg[2] * sk[1] * asz;
      float* t = reinterpret_cast<float*>(sk[4]);
      for (int64_t k = w.k0; k < w.k1; ++k) {
        const char* arow = a_slot + k * sk[2] * asz;
        const float* a = reinterpret_cast<const float*>(arow);
        if (a_dt != sb::F32) {
          sb::load_row(arow, a_dt, n_in, abuf.data());
          a = abuf.data();
        }
        dot_any(a, xs, m, n_in, acc);
        for (int64_t j = 0; j < m; ++j) t[toks[j] * sk[5] + k] = acc[j];
      }
    }
  }
  return n_items;
}

// y[tok] += scale[slot] * t[tok, :r] @ B[slot]^T, B[slot] a [n_out, rank] matrix.
// b_s1 / b_s2: element strides of B[slot]'s output and rank axes; one of them is 1 (row-major [n_out, rank], or
// rank-major [rank, n_out], which lets a low-rank adapter in a high-rank table read only its r rows).
int64_t sb_lora_expand(const float* t, int64_t t_ld, const void* b, int64_t b_s0, int64_t b_s1, int64_t b_s2,
                       int64_t b_rank, int64_t b_dt, int64_t n_out, const float* scales, int64_t scale_stride, void* y,
                       int64_t y_ld, int64_t y_dt, const int64_t* segs, int64_t n_segs, const int64_t* tok_index,
                       int64_t n_threads) {
  const bool rank_major = b_s2 != 1;
  std::vector<ExpandItem> items;
  int64_t base = 0, work = 0;
  for (int64_t s = 0; s < n_segs; ++s) base += ceil_div(segs[s * SEG_FIELDS + 1] - segs[s * SEG_FIELDS], TB);
  const int64_t want = 2 * n_threads;
  const int64_t splits = base >= want || base == 0 ? 1 : ceil_div(want, base);
  const int64_t ostep = std::max<int64_t>(OC, ceil_div(ceil_div(n_out, splits), OC) * OC);
  for (int64_t s = 0; s < n_segs; ++s) {
    const int64_t* sg = segs + s * SEG_FIELDS;
    const int64_t r = seg_rank(sg, b_rank);
    if (r == 0) continue;
    for (int64_t j0 = sg[0]; j0 < sg[1]; j0 += TB) {
      for (int64_t o0 = 0; o0 < n_out; o0 += ostep)
        items.push_back({s, j0, std::min(j0 + TB, sg[1]), o0, std::min(o0 + ostep, n_out)});
      work += r * n_out;
    }
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t bsz = sb::elem_size(b_dt);
  const bool parallel = n_items > 1 && n_threads > 1 && work >= PARALLEL_MIN_WORK;
#pragma omp parallel num_threads(n_threads) if (parallel)
  {
    std::vector<float> bt(rank_major ? 0 : b_rank * OC), brow(rank_major ? n_out : b_rank);
    std::vector<float> dwide(rank_major ? TB * n_out : 0);
    float delta[TB * OC];
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const ExpandItem& w = items[it];
      const int64_t* sg = segs + w.seg * SEG_FIELDS;
      const int64_t r = seg_rank(sg, b_rank), m = w.j1 - w.j0;
      const float scale = scales[sg[2] * scale_stride];
      const char* b_slot = static_cast<const char*>(b) + sg[2] * b_s0 * bsz;
      int64_t toks[TB];
      const float* ts[TB];
      for (int64_t j = 0; j < m; ++j) {
        toks[j] = tok_at(tok_index, w.j0 + j);
        ts[j] = t + toks[j] * t_ld;
      }
      if (rank_major) {  // r contiguous rows of B^T: each read once, an axpy into every token's fp32 delta
        const int64_t ow = w.o1 - w.o0;
        float* d = dwide.data();
        std::fill(d, d + m * ow, 0.f);
        for (int64_t k = 0; k < r; ++k) {
          const char* row = b_slot + (k * b_s2 + w.o0) * bsz;
          const float* br = reinterpret_cast<const float*>(row);
          if (b_dt != sb::F32) {
            sb::load_row(row, b_dt, ow, brow.data());
            br = brow.data();
          }
          for (int64_t j = 0; j < m; ++j) axpy(d + j * ow, br, ts[j][k], ow);
        }
        for (int64_t j = 0; j < m; ++j) add_scaled(y, y_dt, toks[j] * y_ld + w.o0, d + j * ow, scale, ow);
        continue;
      }
      for (int64_t o0 = w.o0; o0 < w.o1; o0 += OC) {
        const int64_t oc = std::min(OC, w.o1 - o0);
        if (m < 4) {  // few tokens: one pass over B's rows, a rank-long dot per (row, token)
          int64_t o = 0;
#ifdef SB_HAVE_AVX512
          for (; o + 16 <= oc; o += 16) {
            for (int64_t j = 0; j < m; ++j)
              sb::dot16_rows(b_slot + (o0 + o) * b_s1 * bsz, b_s1 * bsz, b_dt, r, ts[j], delta + j * OC + o);
          }
#endif
          for (; o < oc; ++o) {
            const char* row = b_slot + (o0 + o) * b_s1 * bsz;
            const float* br = reinterpret_cast<const float*>(row);
            if (b_dt != sb::F32) {
              sb::load_row(row, b_dt, r, brow.data());
              br = brow.data();
            }
            for (int64_t j = 0; j < m; ++j) delta[j * OC + o] = dot_rank(br, ts[j], r);
          }
        } else {  // a prefill block: B tile transposed to [r][OC] once, then FMAs across the outputs
          for (int64_t o = 0; o < oc; ++o) {
            const char* row = b_slot + (o0 + o) * b_s1 * bsz;
            if (b_dt == sb::F32) {
              const float* br = reinterpret_cast<const float*>(row);
              for (int64_t k = 0; k < r; ++k) bt[k * OC + o] = br[k];
            } else {
              const uint16_t* br = reinterpret_cast<const uint16_t*>(row);
              for (int64_t k = 0; k < r; ++k) bt[k * OC + o] = sb::bf16_to_f32(br[k]);
            }
          }
          for (int64_t j = 0; j < m; ++j) {
            float* d = delta + j * OC;
            for (int64_t o = 0; o < OC; ++o) d[o] = 0.f;
            for (int64_t k = 0; k < r; ++k) {
              const float tk = ts[j][k];
              const float* bk = bt.data() + k * OC;
#pragma omp simd
              for (int64_t o = 0; o < OC; ++o) d[o] += tk * bk[o];
            }
          }
        }
        for (int64_t j = 0; j < m; ++j) add_scaled(y, y_dt, toks[j] * y_ld + o0, delta + j * OC, scale, oc);
      }
    }
  }
  return n_items;
}

}  // extern "C"

// ---- Python entry points (METH_FASTCALL over plain ints: a call costs well under a microsecond) ----

namespace {

// shrink(x, x_ld, x_dt, n_in, a_dt, segs, n_segs, tok_index, n_threads, *stacks): 6 ints per stack
PyObject* py_shrink(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  constexpr Py_ssize_t FIXED = 9, MAX_STACKS = 8;
  const Py_ssize_t n_stacks = (nargs - FIXED) / STACK_FIELDS;
  if (nargs < FIXED + STACK_FIELDS || (nargs - FIXED) % STACK_FIELDS || n_stacks > MAX_STACKS)
    return sb::arg_error("shrink: 9 ints then 6 per stack (1..8 stacks)");
  int64_t v[FIXED + STACK_FIELDS * MAX_STACKS];
  if (!sb::read_ints(args, nargs, v)) return nullptr;
  int64_t n;
  Py_BEGIN_ALLOW_THREADS
  n = sb_lora_shrink(reinterpret_cast<const void*>(v[0]), v[1], v[2], v[3], n_stacks, v + FIXED, v[4],
                     reinterpret_cast<const int64_t*>(v[5]), v[6], reinterpret_cast<const int64_t*>(v[7]), v[8]);
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(n);
}

// expand(t, t_ld, b, b_s0, b_s1, b_s2, b_rank, b_dt, n_out, scales, scale_stride, y, y_ld, y_dt, segs, n_segs,
//        tok_index, n_threads)
PyObject* py_expand(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 18) return sb::arg_error("expand: 18 ints");
  int64_t v[18];
  if (!sb::read_ints(args, nargs, v)) return nullptr;
  if (v[5] != 1 && v[4] != 1) return sb::arg_error("expand: B needs a unit stride on its output or rank axis");
  int64_t n;
  Py_BEGIN_ALLOW_THREADS
  n = sb_lora_expand(reinterpret_cast<const float*>(v[0]), v[1], reinterpret_cast<const void*>(v[2]), v[3], v[4],
                     v[5], v[6], v[7], v[8], reinterpret_cast<const float*>(v[9]), v[10],
                     reinterpret_cast<void*>(v[11]), v[12], v[13], reinterpret_cast<const int64_t*>(v[14]), v[15],
                     reinterpret_cast<const int64_t*>(v[16]), v[17]);
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(n);
}

PyMethodDef methods[] = {
    {"shrink", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_shrink)), METH_FASTCALL,
     "segmented LoRA shrink over raw pointers"},
    {"expand", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_expand)), METH_FASTCALL,
     "segmented LoRA expand over raw pointers"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "sb_lora", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_sb_lora() { return PyModule_Create(&module); }
