// CPU block-causal attention over a KV cache (flash-style, online softmax) and store_kv.
//
// One work item is (batch row, kv head, query tile). Its query rows are the tile's tokens times
// the query heads of the kv head's group, so every K/V tile loaded is shared by the whole group.
// Queries and the output accumulator are kept transposed ([D][rows]) so that the score tile
// S^T[key][row], the softmax statistics and the rescaling all vectorise over rows.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "cpu_simd.h"
#include "kernels.h"

// ISO C++ modes default to -ffp-contract=off; the micro-kernels are written as a*b+c and need FMA.
#pragma GCC optimize("fp-contract=fast")

namespace d2f {
namespace {

using namespace simd;

constexpr int kRowChunk = 16;  // rows per micro-tile: two vectors
constexpr int kKeyBlock = 4;   // keys per QK micro-tile
constexpr int kKeyTile = 64;   // keys per softmax step
constexpr int kMaxRows = 64;   // query rows (tokens x group heads) per work item

D2F_INLINE float to_float(float x) { return x; }
D2F_INLINE float to_float(uint16_t x) { return bf16_to_float(x); }
D2F_INLINE void from_float(float x, float* dst) { *dst = x; }
D2F_INLINE void from_float(float x, uint16_t* dst) { *dst = float_to_bf16(x); }

template <typename T>
D2F_INLINE void load_row(const T* src, float* dst, int n) {
  if constexpr (sizeof(T) == 4) {
    std::memcpy(dst, src, sizeof(float) * n);
  } else {
#pragma omp simd
    for (int i = 0; i < n; ++i) dst[i] = to_float(src[i]);
  }
}

struct Item {
  int b, kvh, t0, t1;  // window tokens [t0, t1) as queries
  int key_begin, key_end;  // window keys they can see (tile skipping)
};

// Per-thread scratch, 64-byte aligned so whole vectors load from it.
struct Workspace {
  float* base = nullptr;
  float *qt, *ot, *st, *kb, *vb, *m, *l, *alpha;
  int32_t *row_bid, *key_bid;
  Workspace(int D, int rows_padded) {
    size_t n = 0;
    auto take = [&](size_t count) { size_t at = n; n += (count + 15) / 16 * 16; return at; };
    size_t qt_at = take(size_t(D) * rows_padded), ot_at = take(size_t(D) * rows_padded);
    size_t st_at = take(size_t(kKeyTile) * rows_padded);
    size_t kb_at = take(size_t(kKeyTile) * D), vb_at = take(size_t(kKeyTile) * D);
    size_t m_at = take(rows_padded), l_at = take(rows_padded), a_at = take(rows_padded);
    size_t rb_at = take(rows_padded), kbid_at = take(kKeyTile);
    base = static_cast<float*>(std::aligned_alloc(64, n * sizeof(float)));
    if (base == nullptr) throw std::bad_alloc();
    qt = base + qt_at; ot = base + ot_at; st = base + st_at; kb = base + kb_at; vb = base + vb_at;
    m = base + m_at; l = base + l_at; alpha = base + a_at;
    row_bid = reinterpret_cast<int32_t*>(base + rb_at);
    key_bid = reinterpret_cast<int32_t*>(base + kbid_at);
  }
  ~Workspace() { std::free(base); }
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
};

// S^T[j][rows] = sum_d K[j][d] * Q^T[d][rows] for keys [0, nk4) and all row chunks.
template <int DT>
D2F_INLINE void scores(const Workspace& ws, int D, int mp, int nk4) {
  if (DT > 0) D = DT;
  for (int c = 0; c < mp; c += kRowChunk) {
    for (int j = 0; j < nk4; j += kKeyBlock) {
      VecF acc[kKeyBlock][2] = {};
      const float* k = ws.kb + size_t(j) * D;
      for (int d = 0; d < D; ++d) {
        VecF q0 = load(ws.qt + size_t(d) * mp + c), q1 = load(ws.qt + size_t(d) * mp + c + kLanes);
#pragma GCC unroll 4
        for (int r = 0; r < kKeyBlock; ++r) {
          float kv = k[size_t(r) * D + d];
          acc[r][0] += kv * q0;
          acc[r][1] += kv * q1;
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < kKeyBlock; ++r) {
        store(ws.st + size_t(j + r) * mp + c, acc[r][0]);
        store(ws.st + size_t(j + r) * mp + c + kLanes, acc[r][1]);
      }
    }
  }
}

// O^T[d][rows] = alpha[rows] * O^T[d][rows] + sum_j V[j][d] * P^T[j][rows].
template <int DT>
D2F_INLINE void accumulate(const Workspace& ws, int D, int mp, int nk4) {
  if (DT > 0) D = DT;
  for (int c = 0; c < mp; c += kRowChunk) {
    VecF a0 = load(ws.alpha + c), a1 = load(ws.alpha + c + kLanes);
    for (int d = 0; d < D; d += 4) {
      VecF acc[4][2];
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        acc[r][0] = load(ws.ot + size_t(d + r) * mp + c) * a0;
        acc[r][1] = load(ws.ot + size_t(d + r) * mp + c + kLanes) * a1;
      }
      for (int j = 0; j < nk4; ++j) {
        VecF p0 = load(ws.st + size_t(j) * mp + c), p1 = load(ws.st + size_t(j) * mp + c + kLanes);
        const float* v = ws.vb + size_t(j) * D + d;
#pragma GCC unroll 4
        for (int r = 0; r < 4; ++r) {
          acc[r][0] += v[r] * p0;
          acc[r][1] += v[r] * p1;
        }
      }
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        store(ws.ot + size_t(d + r) * mp + c, acc[r][0]);
        store(ws.ot + size_t(d + r) * mp + c + kLanes, acc[r][1]);
      }
    }
  }
}

// Masks the window keys of the tile, then turns scores into probabilities in place and
// updates the running max / sum; alpha receives each row's rescale factor.
D2F_INLINE void softmax_step(const Workspace& ws, int mp, int nk, int nk4, bool masked) {
  const VecF ninf = splat(-std::numeric_limits<float>::infinity());
  for (int c = 0; c < mp; c += kLanes) {
    if (masked) {
      VecI rb = load(ws.row_bid + c);
      for (int j = 0; j < nk; ++j) {
        float* s = ws.st + size_t(j) * mp + c;
        store(s, ws.key_bid[j] <= rb ? load(s) : ninf);
      }
    }
    VecF mx = ninf;
    for (int j = 0; j < nk; ++j) mx = vmax(mx, load(ws.st + size_t(j) * mp + c));
    VecF m_old = load(ws.m + c);
    VecF m_new = vmax(m_old, mx);
    VecF m_use = m_new == ninf ? VecF{} : m_new;  // rows that saw nothing yet: avoid -inf - -inf
    VecF alpha = exp_nonpos(m_old - m_use);
    VecF sum = {};
    for (int j = 0; j < nk; ++j) {
      float* s = ws.st + size_t(j) * mp + c;
      VecF p = exp_nonpos(load(s) - m_use);
      store(s, p);
      sum += p;
    }
    for (int j = nk; j < nk4; ++j) store(ws.st + size_t(j) * mp + c, VecF{});
    store(ws.l + c, load(ws.l + c) * alpha + sum);
    store(ws.m + c, m_new);
    store(ws.alpha + c, alpha);
  }
}

template <typename T, int DT>
D2F_INLINE void process_item(const AttentionParams& p, const Item& it, Workspace& ws) {
  const int D = DT > 0 ? DT : p.head_dim;
  const int G = p.heads / p.kv_heads;
  const int rows = (it.t1 - it.t0) * G;
  const int mp = (rows + kRowChunk - 1) / kRowChunk * kRowChunk;
  const int32_t* bid = p.block_ids + size_t(it.b) * p.window;

  const T* q = static_cast<const T*>(p.q) + it.b * p.q_batch_stride;
  std::memset(ws.qt, 0, sizeof(float) * D * mp);
  std::memset(ws.ot, 0, sizeof(float) * D * mp);
  for (int i = 0; i < mp; ++i) {
    ws.m[i] = -std::numeric_limits<float>::infinity();
    ws.l[i] = 0.0f;
    ws.row_bid[i] = i < rows ? bid[it.t0 + i / G] : std::numeric_limits<int32_t>::max();
  }
  for (int i = 0; i < rows; ++i) {
    const T* src = q + (it.t0 + i / G) * p.q_row_stride + (it.kvh * G + i % G) * p.q_head_stride;
    for (int d = 0; d < D; ++d) ws.qt[size_t(d) * mp + i] = to_float(src[d]) * p.scale;
  }

  const int c = p.cache_rows ? p.cache_rows[it.b] : it.b;
  const int n_cache = p.cache_lens[it.b];
  const size_t cache_row_stride = size_t(p.kv_heads) * D;
  const T* kc = static_cast<const T*>(p.k_cache) + (size_t(c) * p.cache_capacity * p.kv_heads + it.kvh) * D;
  const T* vc = static_cast<const T*>(p.v_cache) + (size_t(c) * p.cache_capacity * p.kv_heads + it.kvh) * D;
  const T* kw = static_cast<const T*>(p.k) + it.b * p.k_batch_stride + it.kvh * p.k_head_stride;
  const T* vw = static_cast<const T*>(p.v) + it.b * p.v_batch_stride + it.kvh * p.v_head_stride;
  const int n_keys = n_cache + (it.key_end - it.key_begin);

  for (int k0 = 0; k0 < n_keys; k0 += kKeyTile) {
    const int nk = std::min(kKeyTile, n_keys - k0);
    const int nk4 = (nk + kKeyBlock - 1) / kKeyBlock * kKeyBlock;
    bool masked = false;
    for (int j = 0; j < nk; ++j) {
      const int u = k0 + j;
      if (u < n_cache) {
        load_row(kc + u * cache_row_stride, ws.kb + size_t(j) * D, D);
        load_row(vc + u * cache_row_stride, ws.vb + size_t(j) * D, D);
        ws.key_bid[j] = std::numeric_limits<int32_t>::min();
      } else {
        const int w = it.key_begin + u - n_cache;
        load_row(kw + w * p.k_row_stride, ws.kb + size_t(j) * D, D);
        load_row(vw + w * p.v_row_stride, ws.vb + size_t(j) * D, D);
        ws.key_bid[j] = bid[w] < 0 ? std::numeric_limits<int32_t>::max() : bid[w];
        masked = true;
      }
    }
    std::memset(ws.kb + size_t(nk) * D, 0, sizeof(float) * (nk4 - nk) * D);
    std::memset(ws.vb + size_t(nk) * D, 0, sizeof(float) * (nk4 - nk) * D);
    scores<DT>(ws, D, mp, nk4);
    softmax_step(ws, mp, nk, nk4, masked);
    accumulate<DT>(ws, D, mp, nk4);
  }

  T* out = static_cast<T*>(p.out) + size_t(it.b) * p.window * p.heads * D;
  for (int i = 0; i < rows; ++i) {
    if (ws.row_bid[i] < 0) continue;  // padding rows were zeroed beforehand
    const float inv = ws.l[i] > 0.0f ? 1.0f / ws.l[i] : 0.0f;
    T* dst = out + (size_t(it.t0 + i / G) * p.heads + it.kvh * G + i % G) * D;
    for (int d = 0; d < D; ++d) from_float(ws.ot[size_t(d) * mp + i] * inv, dst + d);
  }
}

using ItemFn = void (*)(const AttentionParams&, const Item&, Workspace&);

template <typename T, int DT>
void item_generic(const AttentionParams& p, const Item& it, Workspace& ws) {
  process_item<T, DT>(p, it, ws);
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename T, int DT>
__attribute__((target("avx2,fma"))) void item_avx2(const AttentionParams& p, const Item& it, Workspace& ws) {
  process_item<T, DT>(p, it, ws);
}
#endif

template <typename T, int DT>
ItemFn pick_item_fn() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return item_avx2<T, DT>;
#endif
  return item_generic<T, DT>;
}

template <typename T>
ItemFn pick_item_fn(int D) {
  if (D == 64) return pick_item_fn<T, 64>();
  if (D == 128) return pick_item_fn<T, 128>();
  return pick_item_fn<T, 0>();
}

int max_threads() {
#if defined(_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

int thread_num() {
#if defined(_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Query tiles of every (row, kv head), each with the window keys its newest block can see.
std::vector<Item> make_items(const AttentionParams& p) {
  const int G = p.heads / p.kv_heads;
  struct Span { int t0, t1; };
  std::vector<Span> spans(p.batch);
  int longest = 0;
  for (int b = 0; b < p.batch; ++b) {
    const int32_t* bid = p.block_ids + size_t(b) * p.window;
    int t0 = 0, t1 = p.window;
    while (t0 < t1 && bid[t0] < 0) ++t0;
    while (t1 > t0 && bid[t1 - 1] < 0) --t1;
    spans[b] = {t0, t1};
    longest = std::max(longest, t1 - t0);
  }
  // Bigger tiles reread the cache less; smaller ones keep every thread busy.
  int tile = std::max(1, std::min(longest, kMaxRows / G));
  auto count = [&](int t) {
    int64_t n = 0;
    for (const Span& s : spans) n += (s.t1 - s.t0 + t - 1) / t;
    return n * p.kv_heads;
  };
  while (tile > 1 && tile * G > kRowChunk && count(tile) < 2 * max_threads()) tile = (tile + 1) / 2;

  std::vector<Item> items;
  for (int b = 0; b < p.batch; ++b) {
    const int32_t* bid = p.block_ids + size_t(b) * p.window;
    for (int t0 = spans[b].t0; t0 < spans[b].t1; t0 += tile) {
      const int t1 = std::min(spans[b].t1, t0 + tile);
      int newest = -1;
      for (int t = t0; t < t1; ++t) newest = std::max(newest, bid[t]);
      int key_end = spans[b].t1;
      while (key_end > spans[b].t0 && (bid[key_end - 1] < 0 || bid[key_end - 1] > newest)) --key_end;
      for (int h = 0; h < p.kv_heads; ++h) items.push_back({b, h, t0, t1, spans[b].t0, key_end});
    }
  }
  return items;
}

template <typename T>
void attention_typed(const AttentionParams& p) {
  const int D = p.head_dim;
  const size_t row_elems = size_t(p.heads) * D;
  T* out = static_cast<T*>(p.out);
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < int64_t(p.batch) * p.window; ++r)
    if (p.block_ids[r] < 0) std::memset(out + r * row_elems, 0, sizeof(T) * row_elems);

  const std::vector<Item> items = make_items(p);
  const ItemFn fn = pick_item_fn<T>(D);
  const int G = p.heads / p.kv_heads;
  int max_rows = 0;
  for (const Item& it : items) max_rows = std::max(max_rows, (it.t1 - it.t0) * G);
  const int mp = (max_rows + kRowChunk - 1) / kRowChunk * kRowChunk;
  const int64_t n_items = static_cast<int64_t>(items.size());
  const int threads = n_items > 1 ? max_threads() : 1;
  // Made before the parallel region: an exception thrown inside one ends the process.
  std::vector<std::unique_ptr<Workspace>> ws;
  for (int t = 0; t < threads; ++t) ws.push_back(std::make_unique<Workspace>(D, mp));
#pragma omp parallel num_threads(threads) if (threads > 1)
  {
    Workspace& w = *ws[thread_num()];
#pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < n_items; ++i) fn(p, items[i], w);
  }
}

template <typename T>
void store_kv_typed(const StoreKVParams& p) {
  const int D = p.head_dim;
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* kc = static_cast<T*>(p.k_cache);
  T* vc = static_cast<T*>(p.v_cache);
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < p.batch; ++b) {
    for (int i = 0; i < p.window; ++i) {
      if (i >= p.src_len[b]) continue;
      const int c = p.cache_rows ? p.cache_rows[b] : b;
      const int64_t src = p.src_start[b] + i;
      const size_t dst = (size_t(c) * p.cache_capacity + p.cache_lens[b] + i) * p.kv_heads * D;
      for (int h = 0; h < p.kv_heads; ++h) {
        std::memcpy(kc + dst + size_t(h) * D, k + b * p.k_batch_stride + src * p.k_row_stride + h * p.k_head_stride,
                    sizeof(T) * D);
        std::memcpy(vc + dst + size_t(h) * D, v + b * p.v_batch_stride + src * p.v_row_stride + h * p.v_head_stride,
                    sizeof(T) * D);
      }
    }
  }
}

}  // namespace

void attention_cpu(const AttentionParams& p) {
  if (p.dtype == DType::kBFloat16) {
    attention_typed<uint16_t>(p);
  } else {
    attention_typed<float>(p);
  }
}

void store_kv_cpu(const StoreKVParams& p) {
  if (p.dtype == DType::kFloat32) {
    store_kv_typed<float>(p);
  } else {
    store_kv_typed<uint16_t>(p);  // bf16 and fp16 are both 2-byte copies
  }
}

}  // namespace d2f
