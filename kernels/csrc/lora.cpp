// Segmented LoRA shrink / expand on CPU: one call per op for the whole batch, OpenMP over work items.
//
// A work item is (segment, block of up to TB of its tokens, one stack, a range of rank rows) for shrink and
// (segment, token block, a range of output features) for expand. Rank / output ranges are split only when
// the batch has too few items to keep every thread busy (one long prefill segment, a single token), so in
// the usual decode step every adapter's A and B is read from memory by exactly one thread, once; a
// segment's token blocks re-read its A/B from cache, not memory. Accumulation is in fp32 throughout.
// B may be rank-major ([rank, out] per slot: a low-rank adapter reads only its rows); sb_lora_apply runs the
// shrink of a projection group and each expand in one call, with t in a private workspace.
#include "pyargs.h"  // Python.h first, as the C API asks

#include <algorithm>
#include <cstdint>
#include <vector>

#include "avx512_rows.h"
#include "common.h"
#include "lora_rows.h"

namespace {

using sb::add_scaled, sb::axpy, sb::dot_any, sb::dot_rank;

constexpr int64_t TB = 8;   // tokens per work item
constexpr int64_t OC = 64;  // output features per expand tile (B tile transposed to [rank][OC] in fp32)

struct ShrinkItem { int64_t seg, j0, j1, stack, k0, k1; };
struct ExpandItem { int64_t seg, j0, j1, o0, o1; };

inline int64_t tok_at(const int64_t* index, int64_t pos) { return index ? index[pos] : pos; }
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
      if (w.k0 < w.k1) sb::prefetch_bytes(a_slot + w.k0 * sk[2] * asz, n_in * asz);
      for (int64_t k = w.k0; k < w.k1; ++k) {
        const char* arow = a_slot + k * sk[2] * asz;
        if (k + 1 < w.k1) sb::prefetch_bytes(arow + sk[2] * asz, n_in * asz);
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
        sb::prefetch_bytes(b_slot + w.o0 * bsz, ow * bsz);
        for (int64_t k = 0; k < r; ++k) {
          const char* row = b_slot + (k * b_s2 + w.o0) * bsz;
          if (k + 1 < r) sb::prefetch_bytes(row + b_s2 * bsz, ow * bsz);
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

// Per stack of sb_lora_apply: a_ptr, a_s0, a_s1, padded rank, b_ptr, b_s0, b_s1, b_s2, n_out, y_ptr, y_ld.
constexpr int64_t APPLY_FIELDS = 11;

// y_s[tok] += scale[slot] * (x[tok] @ A_s[slot, :r]^T) @ B_s[slot, :, :r]^T for every stack s (q/k/v, gate/up,
// or one projection): the shrink of all stacks in one pass over x into an fp32 workspace, then each expand.
// The caller sees no intermediate t; tables share `in` (the A side) and dtype w_dt.
int64_t sb_lora_apply(const void* x, int64_t x_ld, int64_t x_dt, int64_t n_in, int64_t n_tokens, int64_t w_dt,
                      const float* scales, int64_t scale_stride, int64_t y_dt, const int64_t* segs, int64_t n_segs,
                      const int64_t* tok_index, int64_t n_threads, int64_t n_stacks, const int64_t* d) {
  int64_t total_rank = 0;
  for (int64_t s = 0; s < n_stacks; ++s) total_rank += d[s * APPLY_FIELDS + 3];
  std::vector<float> t(n_tokens * total_rank, 0.f);
  std::vector<int64_t> sh(n_stacks * STACK_FIELDS);
  for (int64_t s = 0, at = 0; s < n_stacks; ++s) {
    const int64_t* ds = d + s * APPLY_FIELDS;
    const int64_t shrink_desc[STACK_FIELDS] = {ds[0], ds[1], ds[2], ds[3],
                                               reinterpret_cast<int64_t>(t.data() + at), total_rank};
    std::copy(shrink_desc, shrink_desc + STACK_FIELDS, sh.data() + s * STACK_FIELDS);
    at += ds[3];
  }
  int64_t n = sb_lora_shrink(x, x_ld, x_dt, n_in, n_stacks, sh.data(), w_dt, segs, n_segs, tok_index, n_threads);
  for (int64_t s = 0; s < n_stacks; ++s) {
    const int64_t* ds = d + s * APPLY_FIELDS;
    n += sb_lora_expand(reinterpret_cast<const float*>(sh[s * STACK_FIELDS + 4]), total_rank,
                        reinterpret_cast<const void*>(ds[4]), ds[5], ds[6], ds[7], ds[3], w_dt, ds[8], scales,
                        scale_stride, reinterpret_cast<void*>(ds[9]), ds[10], y_dt, segs, n_segs, tok_index,
                        n_threads);
  }
  return n;
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

// apply(x, x_ld, x_dt, n_in, n_tokens, w_dt, scales, scale_stride, y_dt, segs, n_segs, tok_index, n_threads,
//       *stacks): 11 ints per stack (APPLY_FIELDS)
PyObject* py_apply(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  constexpr Py_ssize_t FIXED = 13, MAX_STACKS = 8;
  const Py_ssize_t n_stacks = (nargs - FIXED) / APPLY_FIELDS;
  if (nargs < FIXED + APPLY_FIELDS || (nargs - FIXED) % APPLY_FIELDS || n_stacks > MAX_STACKS)
    return sb::arg_error("apply: 13 ints then 11 per stack (1..8 stacks)");
  int64_t v[FIXED + APPLY_FIELDS * MAX_STACKS];
  if (!sb::read_ints(args, nargs, v)) return nullptr;
  for (Py_ssize_t s = 0; s < n_stacks; ++s) {
    const int64_t* ds = v + FIXED + s * APPLY_FIELDS;
    if (ds[6] != 1 && ds[7] != 1) return sb::arg_error("apply: B needs a unit stride on its output or rank axis");
  }
  int64_t n;
  Py_BEGIN_ALLOW_THREADS
  n = sb_lora_apply(reinterpret_cast<const void*>(v[0]), v[1], v[2], v[3], v[4], v[5],
                    reinterpret_cast<const float*>(v[6]), v[7], v[8], reinterpret_cast<const int64_t*>(v[9]), v[10],
                    reinterpret_cast<const int64_t*>(v[11]), v[12], n_stacks, v + FIXED);
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(n);
}

PyMethodDef methods[] = {
    {"apply", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_apply)), METH_FASTCALL,
     "fused segmented LoRA shrink + expand over raw pointers"},
    {"shrink", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_shrink)), METH_FASTCALL,
     "segmented LoRA shrink over raw pointers"},
    {"expand", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_expand)), METH_FASTCALL,
     "segmented LoRA expand over raw pointers"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "sb_lora", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_sb_lora() { return PyModule_Create(&module); }
