// Paged attention on CPU: every query row of a step against its own sequence's context, read in place from
// the paged KV cache through the block table (no gather, no padding, no dense mask), causal, GQA, online
// softmax in fp32. Work items are (sequence, kv head, block of query rows[, context split]), longest first;
// a decode row with few sequences splits its context across threads (flash-decoding) and merges the parts.
#include "pyargs.h"  // Python.h first, as the C API asks

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "rows.h"
#include "common.h"

namespace {

constexpr int64_t QB = 16;            // query rows per work item
constexpr int64_t SPLIT_MIN = 512;    // context a decode split covers at least

struct Geometry {
  const char *q, *k, *v;
  char* out;
  int64_t q_s0, q_s1, k_s0, k_s1, v_s0, v_s1, o_s0, o_s1;  // element strides (token / slot, head)
  int64_t q_dt, kv_dt, n_slots;
  const int64_t *q_starts, *ctx_lens;
  const int32_t* tables;
  int64_t table_ld, block_size, heads, kv_heads, dim;
  float scale;
};

struct Item {
  int64_t seq, kvh, nkv, r0, r1;  // kv heads [kvh, kvh + nkv), query rows [r0, r1) of the sequence
  int64_t c0, c1;            // context range [c0, c1) this item covers (all of it unless split)
  int64_t part;              // index into the split partials, -1 = writes `out` directly
  int64_t cost;
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline float dotf(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// exp(x) for x <= 0 (a score minus the running max): Cephes' expf polynomial with a power-of-two scale,
// written so the compiler vectorizes it (std::exp does not); ~1 ulp, and ~1e-38 rather than 0 below -87.
#pragma omp declare simd
inline float exp_neg(float x) {
  x = std::max(x, -87.0f);
  const float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  const float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return y * scale;
}

inline void store_row(char* dst, int64_t dt, const float* src, float mul, int64_t n) {
  if (dt == sb::F32) {
    float* d = reinterpret_cast<float*>(dst);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) d[i] = src[i] * mul;
  } else {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (int64_t i = 0; i < n; ++i) d[i] = sb::f32_to_bf16(src[i] * mul);
  }
}

struct Scratch {  // one per thread, reused across its items
  std::vector<float> qf, acc, m, l, kbuf, vbuf, s;
  std::vector<const float*> kp, vp;
};

// One item: online softmax over context [c0, min(c1, pos + 1)) for each of its query rows x heads, leaving
// per-query (max, sum, acc) in the scratch; false on a block table entry outside the cache. Queries are
// numbered q = row * (nkv * G) + hh, hh = the head's offset from the item's first head.
bool run_item(const Geometry& g, const Item& w, Scratch& sc) {
  const int64_t G = g.heads / g.kv_heads, D = g.dim, bs = g.block_size, hg = w.nkv * G;
  const int64_t rows = w.r1 - w.r0, nq = rows * hg;
  std::vector<float>&qf = sc.qf, &acc = sc.acc, &m = sc.m, &l = sc.l, &kbuf = sc.kbuf, &vbuf = sc.vbuf, &s = sc.s;
  const int64_t q_len = g.q_starts[w.seq + 1] - g.q_starts[w.seq];
  const int64_t first = g.ctx_lens[w.seq] - q_len;  // context index of query row 0
  const int64_t qsz = sb::elem_size(g.q_dt), kvsz = sb::elem_size(g.kv_dt);
  qf.resize(nq * D);
  acc.assign(nq * D, 0.f);
  m.assign(nq, -std::numeric_limits<float>::infinity());
  l.assign(nq, 0.f);
  for (int64_t j = 0; j < rows; ++j) {
    const int64_t tok = g.q_starts[w.seq] + w.r0 + j;
    for (int64_t h = 0; h < hg; ++h) {
      const char* src = g.q + (tok * g.q_s0 + (w.kvh * G + h) * g.q_s1) * qsz;
      float* dst = qf.data() + (j * hg + h) * D;
      sb::load_row(src, g.q_dt, D, dst);
      for (int64_t d = 0; d < D; ++d) dst[d] *= g.scale;
    }
  }
  const int64_t hi = std::min(w.c1, first + w.r1);  // keys needed: [c0, hi)
  const int32_t* table = g.tables + w.seq * g.table_ld;
  kbuf.resize(w.nkv * bs * D);
  vbuf.resize(w.nkv * bs * D);
  s.resize(bs);
  sc.kp.resize(w.nkv * bs);
  sc.vp.resize(w.nkv * bs);
  for (int64_t i0 = w.c0; i0 < hi;) {
    const int64_t page = i0 / bs, i1 = std::min(hi, (page + 1) * bs), n = i1 - i0;
    const int64_t blk = table[page];
    if (blk < 0 || (blk + 1) * bs > g.n_slots) return false;
    // this page's key / value rows (fp32 read in place, bf16 converted); consecutive slots of a page are
    // evenly spaced, which the 16-key score path relies on
    const int64_t k_row_bytes = g.kv_dt == sb::F32 ? g.k_s0 * 4 : D * 4;
    for (int64_t lh = 0; lh < w.nkv; ++lh) {
      for (int64_t i = 0; i < n; ++i) {
        const int64_t slot = blk * bs + (i0 + i) % bs, at = lh * bs + i;
        const char* kr = g.k + (slot * g.k_s0 + (w.kvh + lh) * g.k_s1) * kvsz;
        const char* vr = g.v + (slot * g.v_s0 + (w.kvh + lh) * g.v_s1) * kvsz;
        if (g.kv_dt == sb::F32) {
          sc.kp[at] = reinterpret_cast<const float*>(kr);
          sc.vp[at] = reinterpret_cast<const float*>(vr);
        } else {
          sb::load_row(kr, g.kv_dt, D, kbuf.data() + at * D);
          sb::load_row(vr, g.kv_dt, D, vbuf.data() + at * D);
          sc.kp[at] = kbuf.data() + at * D;
          sc.vp[at] = vbuf.data() + at * D;
        }
      }
    }
    for (int64_t q = 0; q < nq; ++q) {
      const int64_t pos = first + w.r0 + q / hg;
      const float* const* kp = sc.kp.data() + ((q % hg) / G) * bs;
      const float* const* vp = sc.vp.data() + ((q % hg) / G) * bs;
      const int64_t valid = std::min(i1, pos + 1) - i0;  // causal: keys at context index <= pos
      if (valid <= 0) continue;
      const float* qv = qf.data() + q * D;
      int64_t i = 0;
#ifdef SB_HAVE_ROWS
      for (; i + 16 <= valid; i += 16)  // 16 keys of the page at a time, one vector of scores
        sb::dot16_rows(reinterpret_cast<const char*>(kp[i]), k_row_bytes, sb::F32, D, qv, s.data() + i);
#endif
      for (; i < valid; ++i) s[i] = dotf(qv, kp[i], D);
      float mx = m[q];
      for (int64_t i = 0; i < valid; ++i) mx = std::max(mx, s[i]);
      float* a = acc.data() + q * D;
      if (mx > m[q]) {
        const float alpha = std::exp(m[q] - mx);  // exp(-inf) = 0 on the first page
        l[q] *= alpha;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
        m[q] = mx;
      }
#ifdef SB_HAVE_ROWS
      l[q] += sb::exp_sub_sum(s.data(), valid, mx);
      sb::axpy_rows(a, D, s.data(), vp, valid);
#else
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < valid; ++i) {
        s[i] = exp_neg(s[i] - mx);
        sum += s[i];
      }
      for (int64_t i = 0; i < valid; ++i) {
        const float e = s[i];
        const float* vr = vp[i];
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) a[d] += e * vr[d];
      }
      l[q] += sum;
#endif
    }
    i0 = i1;
  }
  return true;
}

// Sequences with skip[b] != 0 (skip may be null: none) are left to the caller (long prefill chunks: torch's
// GEMM-based flash kernel over their own context beats this row-at-a-time kernel there).
int64_t paged_attention(const Geometry& g, int64_t n_seqs, const uint8_t* skip, int64_t n_threads) {
  const int64_t G = g.heads / g.kv_heads, D = g.dim;
  std::vector<Item> items;
  int64_t decode_items = 0, max_ctx = 0;
  for (int64_t b = 0; b < n_seqs; ++b) {
    const int64_t q_len = g.q_starts[b + 1] - g.q_starts[b];
    decode_items += q_len == 1;
    max_ctx = std::max(max_ctx, g.ctx_lens[b]);
  }
  // enough (sequence, query block) units for every thread: an item takes all kv heads of its rows (the cache's
  // slot rows are read whole and in order); otherwise one kv head per item, and with few sequences and long
  // contexts each decode row's context is split across threads as well
  int64_t units = 0;
  for (int64_t b = 0; b < n_seqs; ++b) {
    const int64_t q_len = g.q_starts[b + 1] - g.q_starts[b];
    if (!(skip != nullptr && skip[b])) units += ceil_div(q_len, QB);
  }
  const bool all_heads = units >= 2 * n_threads;
  const int64_t base_items = n_seqs * g.kv_heads;
  int64_t splits = 1;
  if (base_items < 2 * n_threads && decode_items > 0)
    splits = std::max<int64_t>(1, std::min(ceil_div(2 * n_threads, base_items), max_ctx / SPLIT_MIN));
  int64_t n_parts = 0;
  std::vector<int64_t> part_owner;  // part -> seq * kv_heads + kvh (parts of one owner are consecutive)
  for (int64_t b = 0; b < n_seqs; ++b) {
    const int64_t q_len = g.q_starts[b + 1] - g.q_starts[b], ctx = g.ctx_lens[b];
    if (skip != nullptr && skip[b]) continue;
    if (all_heads) {
      for (int64_t r0 = 0; r0 < q_len; r0 += QB) {
        const int64_t r1 = std::min(q_len, r0 + QB);
        items.push_back({b, 0, g.kv_heads, r0, r1, 0, ctx, -1, (r1 - r0) * (ctx - q_len + r1)});
      }
      continue;
    }
    for (int64_t kvh = 0; kvh < g.kv_heads; ++kvh) {
      if (q_len == 1 && splits > 1 && ctx >= 2 * SPLIT_MIN) {
        const int64_t n = std::min(splits, ctx / SPLIT_MIN);
        const int64_t step = ceil_div(ceil_div(ctx, n), g.block_size) * g.block_size;
        for (int64_t c0 = 0; c0 < ctx; c0 += step) {
          items.push_back({b, kvh, 1, 0, 1, c0, std::min(ctx, c0 + step), n_parts++, std::min(step, ctx - c0)});
          part_owner.push_back(b * g.kv_heads + kvh);
        }
        continue;
      }
      for (int64_t r0 = 0; r0 < q_len; r0 += QB) {
        const int64_t r1 = std::min(q_len, r0 + QB);
        items.push_back({b, kvh, 1, r0, r1, 0, ctx, -1, (r1 - r0) * (ctx - q_len + r1)});
      }
    }
  }
  std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) { return a.cost > b.cost; });
  const int64_t n_items = static_cast<int64_t>(items.size());
  std::vector<float> parts(n_parts * G * (D + 2));  // per split part: G x (max, sum, acc[D])
  bool ok = true;
  const int64_t osz = sb::elem_size(g.q_dt);
#pragma omp parallel num_threads(n_threads) if (n_items > 1 && n_threads > 1)
  {
    Scratch sc;
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const Item& w = items[it];
      if (!run_item(g, w, sc)) {
        ok = false;
        continue;
      }
      const int64_t rows = w.r1 - w.r0, hg = w.nkv * G;
      for (int64_t j = 0; j < rows; ++j) {
        for (int64_t h = 0; h < hg; ++h) {
          const int64_t q = j * hg + h;
          if (w.part >= 0) {  // split items have one kv head: h < G
            float* p = parts.data() + (w.part * G + h) * (D + 2);
            p[0] = sc.m[q];
            p[1] = sc.l[q];
            std::copy(sc.acc.data() + q * D, sc.acc.data() + (q + 1) * D, p + 2);
          } else {
            const int64_t tok = g.q_starts[w.seq] + w.r0 + j;
            store_row(g.out + (tok * g.o_s0 + (w.kvh * G + h) * g.o_s1) * osz, g.q_dt, sc.acc.data() + q * D,
                      1.f / sc.l[q], D);
          }
        }
      }
    }
  }
  if (!ok) return -1;
  // merge each (sequence, kv head)'s split parts by their softmax statistics
  std::vector<float> merged(D);
  for (int64_t p0 = 0; p0 < n_parts;) {
    int64_t p1 = p0 + 1;
    while (p1 < n_parts && part_owner[p1] == part_owner[p0]) ++p1;
    const int64_t seq = part_owner[p0] / g.kv_heads, kvh = part_owner[p0] % g.kv_heads;
    for (int64_t h = 0; h < G; ++h) {
      float mx = -std::numeric_limits<float>::infinity(), sum = 0.f;
      for (int64_t p = p0; p < p1; ++p) mx = std::max(mx, parts[(p * G + h) * (D + 2)]);
      std::fill(merged.begin(), merged.end(), 0.f);
      for (int64_t p = p0; p < p1; ++p) {
        const float* part = parts.data() + (p * G + h) * (D + 2);
        const float w = part[1] > 0.f ? std::exp(part[0] - mx) : 0.f;
        sum += part[1] * w;
        for (int64_t d = 0; d < D; ++d) merged[d] += part[2 + d] * w;
      }
      const int64_t tok = g.q_starts[seq];
      store_row(g.out + (tok * g.o_s0 + (kvh * G + h) * g.o_s1) * osz, g.q_dt, merged.data(), 1.f / sum, D);
    }
    p0 = p1;
  }
  return n_items;
}

// attention(q, q_s0, q_s1, q_dt, k, k_s0, k_s1, v, v_s0, v_s1, kv_dt, n_slots, out, o_s0, o_s1, q_starts,
//           ctx_lens, tables, table_ld, n_seqs, block_size, heads, kv_heads, dim, scale, skip, n_threads)
// (skip: address of uint8 [n_seqs], 0 = none)
PyObject* py_attention(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 27) return sb::arg_error("attention: 27 arguments");
  int64_t v[27];
  if (!sb::read_ints(args, 24, v)) return nullptr;
  const double scale = PyFloat_AsDouble(args[24]);
  if (scale == -1.0 && PyErr_Occurred()) return nullptr;
  if (!sb::read_ints(args + 25, 2, v + 25)) return nullptr;
  Geometry g{reinterpret_cast<const char*>(v[0]), reinterpret_cast<const char*>(v[4]),
             reinterpret_cast<const char*>(v[7]), reinterpret_cast<char*>(v[12]),
             v[1], v[2], v[5], v[6], v[8], v[9], v[13], v[14], v[3], v[10], v[11],
             reinterpret_cast<const int64_t*>(v[15]), reinterpret_cast<const int64_t*>(v[16]),
             reinterpret_cast<const int32_t*>(v[17]), v[18], v[20], v[21], v[22], v[23], static_cast<float>(scale)};
  if (g.dim <= 0 || g.kv_heads <= 0 || g.heads % g.kv_heads || g.block_size <= 0 || g.block_size > 1024)
    return sb::arg_error("attention: bad geometry (heads % kv_heads, block_size 1..1024)");
  int64_t n;
  Py_BEGIN_ALLOW_THREADS
  n = paged_attention(g, v[19], reinterpret_cast<const uint8_t*>(v[25]), v[26]);
  Py_END_ALLOW_THREADS
  return PyLong_FromLongLong(n);
}

PyMethodDef methods[] = {
    {"attention", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_attention)), METH_FASTCALL,
     "paged attention over raw pointers"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "sb_attention", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_sb_attention() { return PyModule_Create(&module); }
