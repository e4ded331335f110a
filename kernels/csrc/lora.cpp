// Segmented LoRA shrink / expand on CPU: one call per op for the whole batch, OpenMP over work items.
//
// A work item is (segment, block of up to TB of its tokens, one stack, a range of rank rows) for shrink and
// (segment, token block, a range of output features) for expand. Rank / output ranges are split only when
// the batch has too few items to keep every thread busy (one long prefill segment, a single token), so in
// the usual decode step every adapter's A and B is read from memory by exactly one thread, once; a
// segment's token blocks re-read its A/B from cache, not memory. Accumulation is in fp32 throughout.
#include <algorithm>
#include <cstdint>
#include <vector>

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
  int64_t base = 0;
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
      }
    }
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t xsz = sb::elem_size(x_dt), asz = sb::elem_size(a_dt);
#pragma omp parallel num_threads(n_threads) if (n_items > 1 && n_threads > 1)
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

// y[tok] += scale[slot] * t[tok, :r] @ B[slot]^T, B[slot] is [n_out, rank] (rank contiguous).
int64_t sb_lora_expand(const float* t, int64_t t_ld, const void* b, int64_t b_s0, int64_t b_s1, int64_t b_rank,
                       int64_t b_dt, int64_t n_out, const float* scales, int64_t scale_stride, void* y, int64_t y_ld,
                       int64_t y_dt, const int64_t* segs, int64_t n_segs, const int64_t* tok_index,
                       int64_t n_threads) {
  std::vector<ExpandItem> items;
  int64_t base = 0;
  for (int64_t s = 0; s < n_segs; ++s) base += ceil_div(segs[s * SEG_FIELDS + 1] - segs[s * SEG_FIELDS], TB);
  const int64_t want = 2 * n_threads;
  const int64_t splits = base >= want || base == 0 ? 1 : ceil_div(want, base);
  const int64_t ostep = std::max<int64_t>(OC, ceil_div(ceil_div(n_out, splits), OC) * OC);
  for (int64_t s = 0; s < n_segs; ++s) {
    const int64_t* sg = segs + s * SEG_FIELDS;
    if (seg_rank(sg, b_rank) == 0) continue;
    for (int64_t j0 = sg[0]; j0 < sg[1]; j0 += TB)
      for (int64_t o0 = 0; o0 < n_out; o0 += ostep)
        items.push_back({s, j0, std::min(j0 + TB, sg[1]), o0, std::min(o0 + ostep, n_out)});
  }
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t bsz = sb::elem_size(b_dt);
#pragma omp parallel num_threads(n_threads) if (n_items > 1 && n_threads > 1)
  {
    std::vector<float> bt(b_rank * OC);
    float delta[OC];
#pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < n_items; ++it) {
      const ExpandItem& w = items[it];
      const int64_t* sg = segs + w.seg * SEG_FIELDS;
      const int64_t r = seg_rank(sg, b_rank);
      const float scale = scales[sg[2] * scale_stride];
      const char* b_slot = static_cast<const char*>(b) + sg[2] * b_s0 * bsz;
      for (int64_t o0 = w.o0; o0 < w.o1; o0 += OC) {
        const int64_t oc = std::min(OC, w.o1 - o0);
        for (int64_t o = 0; o < oc; ++o) {  // B tile [oc, r] -> bt [r][OC] in fp32
          const char* row = b_slot + (o0 + o) * b_s1 * bsz;
          if (b_dt == sb::F32) {
            const float* br = reinterpret_cast<const float*>(row);
            for (int64_t k = 0; k < r; ++k) bt[k * OC + o] = br[k];
          } else {
            const uint16_t* br = reinterpret_cast<const uint16_t*>(row);
            for (int64_t k = 0; k < r; ++k) bt[k * OC + o] = sb::bf16_to_f32(br[k]);
          }
        }
        for (int64_t j = w.j0; j < w.j1; ++j) {
          const int64_t tok = tok_at(tok_index, j);
          const float* tr = t + tok * t_ld;
          for (int64_t o = 0; o < OC; ++o) delta[o] = 0.f;
          for (int64_t k = 0; k < r; ++k) {
            const float tk = tr[k];
            const float* bk = bt.data() + k * OC;
#pragma omp simd
            for (int64_t o = 0; o < OC; ++o) delta[o] += tk * bk[o];
          }
          if (y_dt == sb::F32) {
            float* yr = static_cast<float*>(y) + tok * y_ld + o0;
#pragma omp simd
            for (int64_t o = 0; o < oc; ++o) yr[o] += scale * delta[o];
          } else {
            uint16_t* yr = static_cast<uint16_t*>(y) + tok * y_ld + o0;
            for (int64_t o = 0; o < oc; ++o) yr[o] = sb::f32_to_bf16(sb::bf16_to_f32(yr[o]) + delta[o] * scale);
          }
        }
      }
    }
  }
  return n_items;
}

}  // extern "C"
