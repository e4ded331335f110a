// A projection group's base matmuls and its LoRA deltas in one parallel region (q/k/v, o, gate/up or down of a
// decode step), the memory-bound LoRA items beside the compute-bound base tiles.
//
// Called one after the other (linear.cpp, then lora.cpp's apply), both phases use every thread: the tiles are
// compute-bound, and the LoRA items read each adapter's A and B from memory once, bound by bandwidth that two
// threads share (on a 2-core Zen 3: 38 ms of LoRA reads per decode step with one thread, 26 ms with two). Here
// a quarter of the threads (at least one) start on the LoRA items while the others start on the tiles; whoever
// runs out of its own work takes the other's: tiles are handed out from both ends of one list (compute threads
// from the front, LoRA threads from the back, so each end's next tile is the one it prefetches), LoRA items from
// one counter. The items write their unscaled deltas into fp32 buffers; after a barrier, every LoRA token's row
// gets y += scale * delta, the same rounding as lora.cpp's expand into y, then (DoRA) y *= gain[slot], the same
// rounding as the multiply the two-call path does after it.
// Tiles: linear_tiles.h. LoRA items: lora_items.h (apply_block).
#include "pyargs.h"  // Python.h first, as the C API asks

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <vector>

#include "linear_tiles.h"
#include "lora_items.h"

namespace {

using sb::APPLY_FIELDS, sb::SEG_FIELDS, sb::TB, sb::tok_at;

// Per projection: base weights (dense_ptr or 0 for NF4, dense row stride, packed, absmax, code, bs, N), the
// output y (y_ptr, y_ld), the LoRA tables (a_ptr, a_s0, a_s1, padded rank, b_ptr, b_s0, b_s1, b_s2), a gain
// table applied after the delta (gain_ptr or 0 for none, gain_ld: fp32 [slots, N] rows gain_ld apart).
constexpr int64_t PROJ_FIELDS = 19;
constexpr int64_t MAX_PROJ = 8;

// Indices [0, n) handed out from both ends, lock-free (one 64-bit word: front << 32 | back).
class TwoEnds {
 public:
  explicit TwoEnds(int64_t n) : v_(static_cast<uint64_t>(n)) {}
  bool front(int64_t& i) { return take(true, i); }
  bool back(int64_t& i) { return take(false, i); }

 private:
  bool take(bool from_front, int64_t& i) {
    uint64_t cur = v_.load(std::memory_order_relaxed);
    for (;;) {
      const uint64_t lo = cur >> 32, hi = cur & 0xffffffffu;
      if (lo >= hi) return false;
      const uint64_t next = from_front ? ((lo + 1) << 32) | hi : (lo << 32) | (hi - 1);
      if (v_.compare_exchange_weak(cur, next, std::memory_order_relaxed)) {
        i = static_cast<int64_t>(from_front ? lo : hi - 1);
        return true;
      }
    }
  }
  std::atomic<uint64_t> v_;
};

struct Item { int64_t seg, j0, j1; };  // one LoRA work item: a segment's tokens [j0, j1) in sorted order

}  // namespace

extern "C" {

// y_p = x @ W_p^T for every projection p of the group; then for every token of every segment (slot >= 0):
// y_p[tok] += scale[slot] * (x[tok] @ A_p[slot, :r]^T) @ B_p[slot, :, :r]^T in fp32, r = the segment's true rank,
// then y_p[tok] *= gain_p[slot] where p has a gain table.
// x [M, K] fp32 (rows x_ld apart), y_p [M, N_p] fp32, tables of dtype w_dt.
void sb_projection_group(const float* x, int64_t x_ld, int64_t M, int64_t K, int64_t n_proj, const int64_t* proj,
                         int64_t w_dt, const float* scales, int64_t scale_stride, const int64_t* segs,
                         int64_t n_segs, const int64_t* tok_index, int64_t n_threads) {
  std::vector<sb::tiles::Weights> weights;
  std::vector<int64_t> first_tile(n_proj + 1, 0), d(n_proj * APPLY_FIELDS);
  std::vector<std::vector<float>> delta(n_proj);  // [M, N_p] unscaled LoRA deltas
  int64_t max_rank = 0, buf_floats = 0;
  for (int64_t p = 0; p < n_proj; ++p) {
    const int64_t* f = proj + p * PROJ_FIELDS;
    weights.push_back({reinterpret_cast<const float*>(f[0]), f[1], reinterpret_cast<const uint8_t*>(f[2]),
                       reinterpret_cast<const float*>(f[3]), reinterpret_cast<const float*>(f[4]), f[5], f[6], K});
    first_tile[p + 1] = first_tile[p] + weights[p].tiles();
    buf_floats = std::max(buf_floats, weights[p].buf_floats());
    if (f[12] > 0) delta[p].assign(static_cast<size_t>(M * f[6]), 0.f);  // padded rank 0: no LoRA tables
    const int64_t ds[APPLY_FIELDS] = {f[9], f[10], f[11], f[12], f[13], f[14], f[15], f[16], f[6],
                                      reinterpret_cast<int64_t>(delta[p].data()), f[6]};
    std::copy(ds, ds + APPLY_FIELDS, d.begin() + p * APPLY_FIELDS);
    max_rank = std::max(max_rank, f[12]);
  }
  std::vector<Item> items;
  for (int64_t s = 0; s < n_segs; ++s)
    for (int64_t j0 = segs[s * SEG_FIELDS]; j0 < segs[s * SEG_FIELDS + 1]; j0 += TB)
      items.push_back({s, j0, std::min(j0 + TB, segs[s * SEG_FIELDS + 1])});
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int64_t lora_threads = n_items ? std::max<int64_t>(1, n_threads / 4) : 0;
  TwoEnds tiles(first_tile[n_proj]);
  std::atomic<int64_t> next_item{0};

  // tile g of the concatenated list, prefetching tile `ahead`'s weights (the taker's likely next)
  auto run_tile = [&](int64_t g, int64_t ahead, float* buf) {
    const int64_t p = std::upper_bound(first_tile.begin(), first_tile.end(), g) - first_tile.begin() - 1;
    std::pair<const char*, const char*> next{nullptr, nullptr};
    if (ahead >= 0 && ahead < first_tile[n_proj]) {
      const int64_t q = std::upper_bound(first_tile.begin(), first_tile.end(), ahead) - first_tile.begin() - 1;
      next = weights[q].source(ahead - first_tile[q]);
    }
    const int64_t* f = proj + p * PROJ_FIELDS;
    sb::tiles::run_tile(x, x_ld, M, weights[p], g - first_tile[p], buf, reinterpret_cast<float*>(f[7]), f[8],
                        next.first, next.second);
  };
#pragma omp parallel num_threads(static_cast<int>(std::max<int64_t>(1, n_threads)))
  {
    std::vector<float> buf(static_cast<size_t>(buf_floats)), t_block(static_cast<size_t>(TB * max_rank));
    sb::Scratch sc;
    auto lora_items = [&] {
      for (int64_t it; (it = next_item.fetch_add(1, std::memory_order_relaxed)) < n_items;) {
        const Item& w = items[it];
        const int64_t* sg = segs + w.seg * SEG_FIELDS;
        int64_t toks[TB];
        const int64_t m = sb::block_tokens(tok_index, w.j0, w.j1, toks);
        sb::apply_block(x, x_ld, sb::F32, K, w_dt, toks, m, sg, 1.f, sb::F32, n_proj, d.data(), t_block.data(),
                        max_rank, sc);
      }
    };
    int64_t g;
    if (omp_get_thread_num() < lora_threads) {
      lora_items();
      while (tiles.back(g)) run_tile(g, g - 1, buf.data());
    } else {
      while (tiles.front(g)) run_tile(g, g + 1, buf.data());
      lora_items();
    }
#pragma omp barrier
#pragma omp for schedule(static)
    for (int64_t q = 0; q < n_proj * n_segs; ++q) {
      const int64_t p = q / n_segs, *sg = segs + (q % n_segs) * SEG_FIELDS, *f = proj + p * PROJ_FIELDS;
      if (delta[p].empty()) continue;  // no tables: y keeps its base output, untouched as in the two-call path
      const float scale = scales[sg[2] * scale_stride];
      for (int64_t j = sg[0]; j < sg[1]; ++j) {
        const int64_t tok = tok_at(tok_index, j);
        sb::add_scaled(reinterpret_cast<void*>(f[7]), sb::F32, tok * f[8], delta[p].data() + tok * f[6], scale, f[6]);
        if (f[17] != 0) {
          float* y = reinterpret_cast<float*>(f[7]) + tok * f[8];
          const float* gain = reinterpret_cast<const float*>(f[17]) + sg[2] * f[18];
          for (int64_t o = 0; o < f[6]; ++o) y[o] *= gain[o];
        }
      }
    }
  }
}

}  // extern "C"

namespace {

// group(x, x_ld, M, K, w_dt, scales, scale_stride, segs, n_segs, tok_index, n_threads, *projections): 19 ints per
// projection (PROJ_FIELDS), 1..8 projections
PyObject* py_group(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  constexpr Py_ssize_t FIXED = 11;
  const Py_ssize_t n_proj = (nargs - FIXED) / PROJ_FIELDS;
  if (nargs < FIXED + PROJ_FIELDS || (nargs - FIXED) % PROJ_FIELDS || n_proj > MAX_PROJ)
    return sb::arg_error("group: 11 ints then 19 per projection (1..8 projections)");
  int64_t v[FIXED + PROJ_FIELDS * MAX_PROJ];
  if (!sb::read_ints(args, nargs, v)) return nullptr;
  if (v[3] % 16) return sb::arg_error("group: K must be a multiple of 16");
  for (Py_ssize_t p = 0; p < n_proj; ++p) {
    const int64_t* f = v + FIXED + p * PROJ_FIELDS;
    if (f[0] == 0 && (f[5] % 32 || v[3] % f[5]))
      return sb::arg_error("group: NF4 needs K a multiple of the block size (a multiple of 32)");
    if (f[15] != 1 && f[16] != 1) return sb::arg_error("group: B needs a unit stride on its output or rank axis");
  }
  Py_BEGIN_ALLOW_THREADS
  sb_projection_group(reinterpret_cast<const float*>(v[0]), v[1], v[2], v[3], n_proj, v + FIXED, v[4],
                      reinterpret_cast<const float*>(v[5]), v[6], reinterpret_cast<const int64_t*>(v[7]), v[8],
                      reinterpret_cast<const int64_t*>(v[9]), v[10]);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"group", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(py_group)), METH_FASTCALL,
     "a projection group's base matmuls and LoRA deltas over raw pointers, fp32"},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "sb_projection", nullptr, -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit_sb_projection() { return PyModule_Create(&module); }
