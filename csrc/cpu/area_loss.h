// The small (B, K) part of the fused Seg-CFT area loss on the CPU: the loss from the areas, and
// dL/d(raw sums) for the backward kernel. Same formulas as segcft.ops.reference (area_loss,
// rho, variable_areas) and the autograd formula in segcft/ops/_custom.py, in the accumulation
// type S (float, or double for float64 logits), summed in a fixed order.
#pragma once

#include <cmath>
#include <cstdint>
#include <vector>

namespace segcft {
namespace cpu {

enum class Penalty : int { L1 = 0, L2 = 1, Huber = 2 };

struct LossTerms {
  int64_t batch = 0, channels = 0, region_slots = 1;  // areas (B, C, R')
  int64_t k = 0;                                       // variables
  const int64_t* index = nullptr;                      // (K, 2) rows (class, region or -1)
  const void* targets = nullptr;                       // (B, K), S
  const void* weights = nullptr;                       // (B, K), S
  const void* scale = nullptr;                         // (K,), S
  Penalty penalty = Penalty::L1;
  double huber_delta = 1.0;
};

// Smallest and largest class id and region id of the index rows (for the caller's range check).
inline void index_ranges(const LossTerms& t, int64_t out[4]) {
  out[0] = out[2] = INT64_MAX;
  out[1] = out[3] = INT64_MIN;
  for (int64_t k = 0; k < t.k; ++k) {
    const int64_t c = t.index[2 * k], r = t.index[2 * k + 1];
    out[0] = c < out[0] ? c : out[0];
    out[1] = c > out[1] ? c : out[1];
    out[2] = r < out[2] ? r : out[2];
    out[3] = r > out[3] ? r : out[3];
  }
}

// Area of variable k of batch item b: A[b, c, r], or the sum over regions for r == -1.
template <class S>
inline S variable_area(const LossTerms& t, const S* areas, int64_t b, int64_t k) {
  const int64_t c = t.index[2 * k], r = t.index[2 * k + 1];
  const S* row = areas + (b * t.channels + c) * t.region_slots;
  if (r >= 0) return row[r];
  S a = S(0);
  for (int64_t j = 0; j < t.region_slots; ++j) a += row[j];
  return a;
}

template <class S>
inline S rho(S u, Penalty penalty, S delta) {
  if (penalty == Penalty::L1) return std::fabs(u);
  if (penalty == Penalty::L2) return u * u;
  const S a = std::fabs(u);
  return a < delta ? S(0.5) * u * u : delta * (a - S(0.5) * delta);
}

template <class S>
inline S rho_grad(S u, Penalty penalty, S delta) {
  if (penalty == Penalty::L1) return u > S(0) ? S(1) : (u < S(0) ? S(-1) : S(0));  // torch.sign: NaN -> 0
  if (penalty == Penalty::L2) return S(2) * u;
  return u < -delta ? -delta : (u > delta ? delta : u);  // NaN stays NaN
}

// Batch mean of sum_k w rho((A - t) / s).
template <class S>
S area_loss_value(const LossTerms& t, const S* areas) {
  const S* tg = static_cast<const S*>(t.targets);
  const S* w = static_cast<const S*>(t.weights);
  const S* s = static_cast<const S*>(t.scale);
  const S delta = static_cast<S>(t.huber_delta);
  S total = S(0);
  for (int64_t b = 0; b < t.batch; ++b) {
    S item = S(0);
    for (int64_t k = 0; k < t.k; ++k) {
      const S u = (variable_area(t, areas, b, k) - tg[b * t.k + k]) / s[k];
      item += w[b * t.k + k] * rho(u, t.penalty, delta);
    }
    total += item;
  }
  return total / static_cast<S>(t.batch > 0 ? t.batch : 1);
}

// g = scale * (dL/dA scattered to (B, C, R') + grad_areas), with dL/dA[b, k] =
// grad_loss / B * w rho'((A - t) / s) / s; a variable with region -1 reaches every region slot.
template <class S>
std::vector<S> area_loss_grad(const LossTerms& t, const S* areas, double grad_loss, const S* grad_areas,
                              double scale) {
  const S* tg = static_cast<const S*>(t.targets);
  const S* w = static_cast<const S*>(t.weights);
  const S* s = static_cast<const S*>(t.scale);
  const S delta = static_cast<S>(t.huber_delta);
  const int64_t Rb = t.region_slots, CR = t.channels * Rb;
  const S per_batch = static_cast<S>(grad_loss) / static_cast<S>(t.batch > 0 ? t.batch : 1);
  std::vector<S> g(static_cast<std::size_t>(t.batch * CR), S(0));
  for (int64_t b = 0; b < t.batch; ++b) {
    S* gb = g.data() + b * CR;
    for (int64_t k = 0; k < t.k; ++k) {
      const S u = (variable_area(t, areas, b, k) - tg[b * t.k + k]) / s[k];
      const S ga = per_batch * w[b * t.k + k] * rho_grad(u, t.penalty, delta) / s[k];
      const int64_t c = t.index[2 * k], r = t.index[2 * k + 1];
      if (r >= 0) {
        gb[c * Rb + r] += ga;
      } else {
        for (int64_t j = 0; j < Rb; ++j) gb[c * Rb + j] += ga;
      }
    }
  }
  const S sc = static_cast<S>(scale);
  for (std::size_t i = 0; i < g.size(); ++i) g[i] = ((grad_areas != nullptr ? g[i] + grad_areas[i] : g[i])) * sc;
  return g;
}

}  // namespace cpu
}  // namespace segcft
