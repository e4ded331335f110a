// Segmented LoRA shrink / expand on CPU: one call per op (or per projection group) for the whole batch, OpenMP
// over work items.
//
// Two schedules. Fused (sb_lora_apply when the batch has at least two token blocks per thread, i.e. every decode
// step of a real batch): a work item is one (segment, block of up to TB of its tokens), which runs the shrink and
// then the expand of every stack of the group, with t in registers-and-L1 scratch: one parallel region per group,
// no barrier between shrink and expand, and each adapter's A and B streamed by one thread back to back. Two-phase
// (sb_lora_shrink / sb_lora_expand, and sb_lora_apply for a batch of one or two blocks: one token, one short
// prefill): shrink items (segment, token block, stack, rank rows) then expand items (segment, token block, output
// range), rank / output ranges split only when the batch has too few items to keep every thread busy. Either way
// every adapter's A and B is read from memory by one thread, once, a segment's later token blocks re-read them
// from cache, and accumulation is fp32 throughout. B may be rank-major ([rank, out] per slot: a low-rank adapter
// reads only its rows). The item bodies are lora_items.h.
#include "pyargs.h"  // Python.h first, as the C API asks

#include <algorithm>
#include <cstdint>
#include <vector>

#include "lora_items.h"

namespace {

using sb::APPLY_FIELDS, sb::OC, sb::SEG_FIELDS, sb::TB, sb::block_tokens, sb::seg_rank;

struct ShrinkItem { int64_t seg, j0, j1, stack, k0, k1; };
struct ExpandItem { int64_t seg, j0, j1, o0, o1; };

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// below this many table elements a call runs on the calling thread (an OpenMP fork/join costs more)
constexpr int64_t PARALLEL_MIN_WORK = 32768;

// per stack descriptor: a_ptr, a_stride_slot, a_stride_rank (elements), padded rank, t_ptr, t_ld
constexpr int64_t STACK_FIELDS = 6;

// the number of (segment, token block) pairs: the fused schedule's work items
inline int64_t count_blocks(const int64_t* segs, int64_t n_segs) {
  int64_t n = 0;
  for (int64_t s = 0; s < n_segs; ++s) n += ceil_div(segs[s * SEG_FIELDS + 1] - segs[s * SEG_FIELDS], TB);
  return n;
}

}  // namespace

extern "C" {

// t_s[tok, :r] = x[tok] @ A_s[slot]^T for every stack s and every token of every segment (t preset to 0).
int64_t sb_lora_shrink(const void* x, int64_t x_ld, int64_t x_dt, int64_t n_in, int64_t n_stacks,
                       const int64_t* stacks, int64_t a_dt, const int64_t* segs, int64_t n_segs,
                       const int64_t* tok_index, int64_t n_threads) {
  std::vector<ShrinkItem> items;
  int64_t work = 0;
  const int64_t base = count_blocks(segs, n_segs) * n_stacks, want = 2 * n_threads;
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
  const int64_t asz = sb::elem_size(a_dt);
  const bool parallel = n_items > 1 && n_threads > 1 && work >= PARALLEL_MIN_WORK;
#pragma omp parallel num_threads(n_threads) if (parallel)
  {
    sb::Scratch sc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const ShrinkItem& w = items[it];
      const int64_t* sg = segs + w.seg * SEG_FIELDS;
      const int64_t* sk = stacks + w.stack * STACK_FIELDS;
      int64_t toks[TB];
      const float* xs[TB];
      float* out[TB];
      const int64_t m = block_tokens(tok_index, w.j0, w.j1, toks);
      sb::gather_x(x, x_ld, x_dt, n_in, toks, m, xs, sc);
      for (int64_t j = 0; j < m; ++j) out[j] = reinterpret_cast<float*>(sk[4]) + toks[j] * sk[5];
      const char* a_slot = reinterpret_cast<const char*>(sk[0]) + sg[2] * sk[1] * asz;
      sb::shrink_rows(xs, m, a_slot, sk[2], a_dt, n_in, w.k0, w.k1, out, sc);
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
  std::vector<ExpandItem> items;
  int64_t work = 0;
  const int64_t base = count_blocks(segs, n_segs), want = 2 * n_threads;
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
    sb::Scratch sc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const ExpandItem& w = items[it];
      const int64_t* sg = segs + w.seg * SEG_FIELDS;
      int64_t toks[TB];
      const float* ts[TB];
      const int64_t m = block_tokens(tok_index, w.j0, w.j1, toks);
      for (int64_t j = 0; j < m; ++j) ts[j] = t + toks[j] * t_ld;
      const char* b_slot = static_cast<const char*>(b) + sg[2] * b_s0 * bsz;
      sb::expand_range(ts, toks, m, b_slot, b_s1, b_s2, b_dt, seg_rank(sg, b_rank), w.o0, w.o1,
                       scales[sg[2] * scale_stride], y, y_ld, y_dt, sc);
    }
  }
  return n_items;
}

namespace {

// The fused schedule of sb_lora_apply: one item per (segment, token block), its shrink and expand of every stack.
int64_t apply_fused(const void* x, int64_t x_ld, int64_t x_dt, int64_t n_in, int64_t w_dt, const float* scales,
                    int64_t scale_stride, int64_t y_dt, const int64_t* segs, int64_t n_segs, const int64_t* tok_index,
                    int64_t n_threads, int64_t n_stacks, const int64_t* d) {
  std::vector<ExpandItem> items;  // o0 / o1 unused: every item covers all outputs
  int64_t max_rank = 0, work = 0;
  for (int64_t s = 0; s < n_stacks; ++s) max_rank = std::max(max_rank, d[s * APPLY_FIELDS + 3]);
  for (int64_t s = 0; s < n_segs; ++s) {
    const int64_t* sg = segs + s * SEG_FIELDS;
    for (int64_t j0 = sg[0]; j0 < sg[1]; j0 += TB) {
      items.push_back({s, j0, std::min(j0 + TB, sg[1]), 0, 0});
      for (int64_t st = 0; st < n_stacks; ++st)
        work += seg_rank(sg, d[st * APPLY_FIELDS + 3]) * (n_in + d[st * APPLY_FIELDS + 8]);
    }
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  const bool parallel = n_items > 1 && n_threads > 1 && work >= PARALLEL_MIN_WORK;
#pragma omp parallel num_threads(n_threads) if (parallel)
  {
    sb::Scratch sc;
    std::vector<float> t_block(TB * max_rank);
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const ExpandItem& w = items[it];
      const int64_t* sg = segs + w.seg * SEG_FIELDS;
      int64_t toks[TB];
      const int64_t m = block_tokens(tok_index, w.j0, w.j1, toks);
      sb::apply_block(x, x_ld, x_dt, n_in, w_dt, toks, m, sg, scales[sg[2] * scale_stride], y_dt, n_stacks, d,
                      t_block.data(), max_rank, sc);
    }
  }
  return n_items;
}

}  // namespace

// y_s[tok] += scale[slot] * (x[tok] @ A_s[slot, :r]^T) @ B_s[slot, :, :r]^T for every stack s (q/k/v, gate/up,
// or one projection); the caller sees no intermediate t; tables share `in` (the A side) and dtype w_dt. Fused
// schedule when there are at least two token blocks per thread, else the shrink of all stacks in one pass over x
// into an fp32 workspace, then each expand (so one token or one short prefill still spreads over every thread).
int64_t sb_lora_apply(const void* x, int64_t x_ld, int64_t x_dt, int64_t n_in, int64_t n_tokens, int64_t w_dt,
                      const float* scales, int64_t scale_stride, int64_t y_dt, const int64_t* segs, int64_t n_segs,
                      const int64_t* tok_index, int64_t n_threads, int64_t n_stacks, const int64_t* d) {
  if (n_threads <= 1 || count_blocks(segs, n_segs) >= 2 * n_threads)
    return apply_fused(x, x_ld, x_dt, n_in, w_dt, scales, scale_stride, y_dt, segs, n_segs, tok_index, n_threads,
                       n_stacks, d);
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
