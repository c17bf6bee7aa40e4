// The merge of the vocabulary splits' partial results that both paths end with: the forward's
// softmax states by log-sum-exp, d hidden by a sum, per row in split order. Inline in a header for
// the two path files alone, which already include the ATen operators it needs, so that plan.cpp
// need not.
#pragma once

#include "host.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>

GIRCSE_NAMESPACE {

// Log-sum-exp merge of S partial states (acc [S, B, ld], run max / sum [S, B]) into (out32 [B, d_e],
// lse [B]), per row in split order. A row with every entry masked: total 0 -> NaN output, lse -inf.
inline std::tuple<Tensor, Tensor> merge_splits(Tensor acc, const Tensor& run_m, const Tensor& run_s,
                                                int64_t d_e) {
  const int64_t S = acc.size(0), rows = acc.size(1), ld = acc.size(2);
  const auto f32 = acc.options();
  Tensor lse = at::empty({rows}, f32);
  const bool in_place = S == 1 && ld == d_e;
  Tensor out = in_place ? acc[0] : at::empty({rows, d_e}, f32);
  const float *M = run_m.data_ptr<float>(), *Sm = run_s.data_ptr<float>(), *A = acc.data_ptr<float>();
  float *O = out.data_ptr<float>(), *L = lse.data_ptr<float>();
  Tensor weights = at::empty({rows, S}, f32);
  float* Wt = weights.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float top = -kInf;
      for (int64_t s = 0; s < S; ++s) top = std::max(top, M[s * rows + r]);
      const float safe = top == -kInf ? 0.f : top;
      float total = 0.f;
      float* w = Wt + r * S;
      for (int64_t s = 0; s < S; ++s) {
        w[s] = std::exp(M[s * rows + r] - safe);
        total += w[s] * Sm[s * rows + r];
      }
      float* o = O + r * d_e;
      for (int64_t k = 0; k < d_e; ++k) {
        float num = 0.f;
        for (int64_t s = 0; s < S; ++s) num += w[s] * A[(s * rows + r) * ld + k];
        o[k] = num / total;
      }
      L[r] = safe + std::log(total);
    }
  });
  return {out, lse};
}

// Sum of S fp32 partials [S, B, ld] in split order -> [B, width] in `dtype`.
inline Tensor sum_partials(const Tensor& part, int64_t width, at::ScalarType dtype) {
  const int64_t S = part.size(0), rows = part.size(1), ld = part.size(2);
  Tensor out = at::empty({rows, width}, part.options());
  const float* P = part.data_ptr<float>();
  float* O = out.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t k = 0; k < width; ++k) {
        float s = P[r * ld + k];
        for (int64_t i = 1; i < S; ++i) s += P[(i * rows + r) * ld + k];
        O[r * width + k] = s;
      }
    }
  });
  return dtype == at::kFloat ? out : out.to(dtype);
}

}  // namespace gircse
