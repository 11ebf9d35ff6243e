// CPU unmasking: phase 1 reduces each masked position's logits row to (token, p, confidence) in
// one streaming pass (a second one only for the entropy), phase 2 applies the per-block rule.
// The softmax is never materialised: the row is read in L1-sized chunks, converted to float,
// and each chunk gives its max, its lowest argmax and its sum of exp against the running max.
#include <omp.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_simd.h"
#include "kernels.h"

namespace d2f {
namespace {

using namespace simd;

constexpr int kChunk = 2048;  // floats per chunk: 8 KiB, stays in L1 across the chunk's passes
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// log for positive normal x, about 1 ulp.
inline VecF log_pos(VecF x) {
  const VecI bits = (VecI)x;
  VecF e = __builtin_convertvector((bits >> 23) - 127, VecF);
  const VecI mbits = (bits & 0x007fffff) | 0x3f800000;
  VecF m = (VecF)mbits;  // [1, 2)
  const VecI big = m > 1.41421356f;
  m = big ? m * 0.5f : m;
  e = big ? e + 1.0f : e;
  const VecF f = m - 1.0f;
  const VecF z = f * f;
  VecF y = splat(7.0376836292e-2f);
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  y += e * -2.12194440e-4f;
  y += -0.5f * z;
  return f + y + e * 0.693359375f;
}

inline float lane_sum(VecF v) {
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += v[j];
  return s;
}
inline float lane_max(VecF v) {
  float s = v[0];
  for (int j = 1; j < kLanes; ++j) s = std::max(s, v[j]);
  return s;
}

struct Bf16 {
  static float load(const uint16_t* p, int i) { return bf16_to_float(p[i]); }
};
struct F16 {
  static float load(const uint16_t* p, int i) { return fp16_to_float(p[i]); }
};
struct F32 {
  static float load(const float* p, int i) { return p[i]; }
};

// A value as the rule in params.h reads it: NaN as -inf.
inline float not_nan(float x) { return x != x ? kNegInf : x; }

// e_v of the rule in params.h for x <= m: values equal to the max weigh 1, so that +inf maxima
// (and a row of -inf only) are well defined; for x < m, x - m is never NaN.
inline float weight(float x, float m) { return x == m ? 1.0f : exp_nonpos(x - m); }

// Reads n values into buf (divided by T when T > 0, as the reference divides the float row;
// NaN as -inf) and pads buf to a multiple of kLanes with -inf, which no reduction below notices
// (sums over a non-finite max count the n values themselves).
template <class E, class T>
inline int load_chunk(const T* src, int n, float temperature, float* buf) {
  if (temperature > 0.0f) {
#pragma omp simd
    for (int i = 0; i < n; ++i) buf[i] = not_nan(E::load(src, i) / temperature);
  } else {
#pragma omp simd
    for (int i = 0; i < n; ++i) buf[i] = not_nan(E::load(src, i));
  }
  const int padded = (n + kLanes - 1) / kLanes * kLanes;
  for (int i = n; i < padded; ++i) buf[i] = kNegInf;
  return padded;
}

struct RowResult {
  int64_t token;
  float p, conf;
  float m, s;  // the row's max and sum of weights
};

template <class E, class T>
inline __attribute__((always_inline)) RowResult row_stats(const T* row, int vocab, float temperature,
                                                           Confidence kind, uint32_t key) {
  alignas(64) float buf[kChunk];
  const bool sample = temperature > 0.0f;
  const bool margin = kind == Confidence::kMargin;
  float m = kNegInf, s = 0.0f;
  int64_t arg = 0;
  // Per-lane largest and second largest (duplicates count twice) for the margin.
  VecF top1 = splat(kNegInf), top2 = splat(kNegInf);
  float best = kNegInf;
  int64_t sampled = -1;
  float sampled_x = kNegInf;

  for (int c0 = 0; c0 < vocab; c0 += kChunk) {
    const int n = std::min(kChunk, vocab - c0);
    const int padded = load_chunk<E>(row + c0, n, temperature, buf);
    float cmax;
    if (margin) {
      for (int i = 0; i < padded; i += kLanes) {
        const VecF x = load(buf + i);
        top2 = vmax(vmin(x, top1), top2);
        top1 = vmax(x, top1);
      }
      cmax = lane_max(top1);  // the running max, which is >= m only if this chunk holds it
    } else {
      VecF mx = splat(kNegInf);
      for (int i = 0; i < padded; i += kLanes) mx = vmax(load(buf + i), mx);
      cmax = lane_max(mx);
    }
    if (cmax > m) {  // strictly: an equal max of a later chunk keeps the earlier index
      int i = 0;
      while (buf[i] != cmax) ++i;
      arg = c0 + i;
      s *= exp_nonpos(m - cmax);  // m < cmax: the exponent is never NaN
      m = cmax;
    }
    if (std::isfinite(m)) {
      VecF acc = splat(0.0f);
      for (int i = 0; i < padded; i += kLanes) acc += exp_nonpos(load(buf + i) - m);
      s += lane_sum(acc);
    } else {  // +inf or -inf max: the values equal to it weigh 1, all others 0
      for (int i = 0; i < n; ++i) s += buf[i] == m ? 1.0f : 0.0f;
    }
    if (sample && (sampled < 0 || cmax + kGumbelBound > best)) {
      for (int i = 0; i < n; ++i) {
        const float x = buf[i];
        if (sampled >= 0 && x + kGumbelBound <= best) continue;
        const float score = x + -std::log(-std::log(noise_uniform(key, static_cast<uint32_t>(c0 + i))));
        if (sampled < 0 || score > best) {  // strict: the lowest index wins ties
          best = score;
          sampled = c0 + i;
          sampled_x = x;
        }
      }
    }
  }

  RowResult r;
  r.m = m;
  r.s = s;
  r.token = sample ? sampled : arg;
  r.p = (sample ? weight(sampled_x, m) : 1.0f) / s;
  if (kind == Confidence::kProbability) {
    r.conf = r.p;
  } else if (margin) {
    float a = kNegInf, b = kNegInf;  // the two largest of the lanes' lists, duplicates kept
    for (int j = 0; j < kLanes; ++j) {
      for (float x : {top1[j], top2[j]}) {
        if (x > a) {
          b = a;
          a = x;
        } else if (x > b) {
          b = x;
        }
      }
    }
    r.conf = weight(a, m) / s - weight(b, m) / s;
  } else if (std::isfinite(m)) {
    const float inv_s = 1.0f / s;
    VecF acc = splat(0.0f);
    for (int c0 = 0; c0 < vocab; c0 += kChunk) {
      const int padded = load_chunk<E>(row + c0, std::min(kChunk, vocab - c0), temperature, buf);
      for (int i = 0; i < padded; i += kLanes) {
        const VecF q = exp_nonpos(load(buf + i) - m) * inv_s;
        acc += q * log_pos(q + 1e-10f);
      }
    }
    r.conf = lane_sum(acc);
  } else {  // rare (an infinite max): the -inf padding would count as weight-1 values here
    float acc = 0.0f;
    for (int c0 = 0; c0 < vocab; c0 += kChunk) {
      const int n = std::min(kChunk, vocab - c0);
      load_chunk<E>(row + c0, n, temperature, buf);
      for (int i = 0; i < n; ++i) {
        const float q = weight(buf[i], m) / s;
        acc += q * std::log(q + 1e-10f);
      }
    }
    r.conf = acc;
  }
  return r;
}

// One non-template entry per dtype so that each gets an AVX2 clone beside the baseline.
#define D2F_ROW_STATS(NAME, E, T)                                                            \
  __attribute__((target_clones("avx2", "default"))) RowResult NAME(                          \
      const T* row, int vocab, float temperature, Confidence kind, uint32_t key) {           \
    return row_stats<E>(row, vocab, temperature, kind, key);                                 \
  }
D2F_ROW_STATS(row_stats_f32, F32, float)
D2F_ROW_STATS(row_stats_bf16, Bf16, uint16_t)
D2F_ROW_STATS(row_stats_f16, F16, uint16_t)
#undef D2F_ROW_STATS

const char* position_row(const UnmaskParams& p, int b, int w) {
  const int elem = p.dtype == DType::kFloat32 ? 4 : 2;
  if (p.prev_logits == nullptr) {
    return static_cast<const char*>(p.logits) + (b * p.logits_batch_stride + w * p.logits_row_stride) * elem;
  }
  if (w == 0) return static_cast<const char*>(p.prev_logits) + b * p.prev_batch_stride * elem;
  return static_cast<const char*>(p.logits) + (b * p.logits_batch_stride + (w - 1) * p.logits_row_stride) * elem;
}

float logit_at(const UnmaskParams& p, const char* row, int64_t v) {
  float x;
  switch (p.dtype) {
    case DType::kFloat32: x = F32::load(reinterpret_cast<const float*>(row), static_cast<int>(v)); break;
    case DType::kBFloat16: x = Bf16::load(reinterpret_cast<const uint16_t*>(row), static_cast<int>(v)); break;
    default: x = F16::load(reinterpret_cast<const uint16_t*>(row), static_cast<int>(v)); break;
  }
  return not_nan(p.temperature > 0.0f ? x / p.temperature : x);
}

// The mask token is never a decoded token (a position that "decodes" to it would stay masked and
// the block could never finish), so when it wins, the best other token is taken instead, with
// its probability under the full softmax. This path is rare (a trained model hardly ever
// predicts [MASK]) and therefore scalar.
void exclude_mask(const UnmaskParams& p, const char* row, uint32_t key, RowResult& r) {
  const bool sample = p.temperature > 0.0f;
  float best = kNegInf;
  int64_t tok = -1;
  for (int64_t v = 0; v < p.vocab; ++v) {
    if (v == p.mask_id) continue;
    const float x = logit_at(p, row, v);
    const float score = sample ? x + -std::log(-std::log(noise_uniform(key, static_cast<uint32_t>(v)))) : x;
    if (tok < 0 || score > best) {  // strict: the lowest index wins ties
      best = score;
      tok = v;
    }
  }
  if (tok < 0) return;  // a vocabulary of the mask token alone: nothing else to pick
  r.p = weight(logit_at(p, row, tok), r.m) / r.s;
  if (p.confidence == Confidence::kProbability) r.conf = r.p;
  r.token = tok;
}

RowResult position_stats(const UnmaskParams& p, int b, int w, uint32_t key) {
  const char* row = position_row(p, b, w);
  RowResult r;
  switch (p.dtype) {
    case DType::kFloat32:
      r = row_stats_f32(reinterpret_cast<const float*>(row), p.vocab, p.temperature, p.confidence, key);
      break;
    case DType::kBFloat16:
      r = row_stats_bf16(reinterpret_cast<const uint16_t*>(row), p.vocab, p.temperature, p.confidence, key);
      break;
    default:
      r = row_stats_f16(reinterpret_cast<const uint16_t*>(row), p.vocab, p.temperature, p.confidence, key);
      break;
  }
  if (r.token == p.mask_id) exclude_mask(p, row, key, r);
  return r;
}

void decide_row(const UnmaskParams& p, int b, std::vector<int>& best) {
  const int64_t base = static_cast<int64_t>(b) * p.window;
  int32_t* counts = p.counts + static_cast<int64_t>(b) * p.num_blocks;
  const int32_t* fully_activated = p.fully_activated + b * p.fully_activated_batch_stride;
  std::fill(counts, counts + p.num_blocks, 0);
  best.assign(p.num_blocks, -1);
  int eos = INT_MAX;
  auto decode = [&](int64_t i, int blk) {
    p.tokens[i] = p.cand_token[i];
    ++counts[blk];
    if (p.eos_id >= 0 && p.cand_token[i] == p.eos_id) eos = std::min(eos, blk);
  };
  for (int w = 0; w < p.window; ++w) {
    const int64_t i = base + w;
    if (p.cand_token[i] < 0) continue;
    const int blk = p.block_ids[i];
    if (p.cand_prob[i] > p.skip_threshold) {
      decode(i, blk);
    } else if (best[blk] < 0 || p.cand_conf[i] > p.cand_conf[base + best[blk]]) {
      best[blk] = w;  // strict: the lowest position wins ties
    }
  }
  for (int blk = 0; blk < p.num_blocks; ++blk) {
    if (counts[blk] == 0 && best[blk] >= 0 && fully_activated[blk]) decode(base + best[blk], blk);
  }
  p.eos_block[b] = eos == INT_MAX ? -1 : eos;
}

}  // namespace

void unmask_cpu(const UnmaskParams& p) {
  const int64_t positions = static_cast<int64_t>(p.batch) * p.window;
  // Dynamic: only masked positions cost anything, and they cluster at the window's end.
#pragma omp parallel for schedule(dynamic, 1)
  for (int64_t i = 0; i < positions; ++i) {
    const int b = static_cast<int>(i / p.window), w = static_cast<int>(i % p.window);
    // Ids past num_blocks (which only the op's value checks reject) are skipped as padding.
    if (p.tokens[i] != p.mask_id || p.block_ids[i] < 0 || p.block_ids[i] >= p.num_blocks) {
      p.cand_token[i] = -1;
      continue;
    }
    const uint32_t key = noise_key(p.seed, static_cast<uint32_t>(b), static_cast<uint32_t>(w));
    const RowResult r = position_stats(p, b, w, key);
    p.cand_token[i] = r.token;
    p.cand_prob[i] = r.p;
    p.cand_conf[i] = r.conf;
  }
#pragma omp parallel
  {
    std::vector<int> best;
#pragma omp for
    for (int b = 0; b < p.batch; ++b) decide_row(p, b, best);
  }
}

}  // namespace d2f
