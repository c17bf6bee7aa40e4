// Streaming kernels: for small batches (cached decoding) and batch-invariant calls, each split walks
// its vocabulary rows in chunks of one vector width, computing the chunk's logits from its W rows and
// adding its E rows into the accumulators while they are still in L1 (csrc/README.md). fp32
// arithmetic throughout (bf16 / fp16 widened on load), own vector exp / tanh. Apart from their host
// side (stream_path.cpp) because they are compiled three times, once per instruction set
// (kernels.h), from vector code that inlines into each clone (vec.h); no ATen header here.
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

GIRCSE_NAMESPACE {
namespace {

// Pointers to the chunk's n vocabulary rows (unit stride); rows with a non-unit last stride are first
// gathered into `buf` (cols elements per row), column by column so the reads stay sequential for a
// transposed view. Lanes n..kW-1 repeat row 0 (their results are masked).
template <int kW, typename T>
GI void chunk_rows(const T* base, int64_t s0, int64_t s1, int64_t v0, int64_t n, int64_t cols, T* buf,
                   const T** rows) {
  if (s1 == 1) {
    for (int64_t i = 0; i < n; ++i) rows[i] = base + (v0 + i) * s0;
  } else {
    for (int64_t k = 0; k < cols; ++k) {
      const T* src = base + v0 * s0 + k * s1;
      for (int64_t i = 0; i < n; ++i) buf[i * cols + k] = src[i * s0];
    }
    for (int64_t i = 0; i < n; ++i) rows[i] = buf + i * cols;
  }
  for (int64_t i = n; i < kW; ++i) rows[i] = rows[0];
}

// bf16 rows: 2 kW values load as kW 32-bit words whose low halves (shifted up) are the even
// elements and whose high halves (masked) are the odd ones, exact fp32 with two integer ops and no
// lane conversion. `x` is then in pair-split order (see split_pairs): per 2 kW block, the kW even
// elements, then the kW odd ones; the remainder past the last full block in natural order.
template <int kW>
GI void bf16_halves(const at::BFloat16* p, typename VT<kW>::F& even, typename VT<kW>::F& odd) {
  typename VT<kW>::U u;
  std::memcpy(&u, p, sizeof u);
  const typename VT<kW>::U lo = u << 16, hi = u & 0xffff0000u;
  std::memcpy(&even, &lo, sizeof even);
  std::memcpy(&odd, &hi, sizeof odd);
}

// Lane i = <rows[i], x> (fp32, length len): kW accumulators, one per vocabulary row, each with a
// fixed summation order, reduced by transpose_reduce; the remainder of len is added per lane last.
template <int kW, typename T>
GI typename VT<kW>::F chunk_dots(const T* const* rows, const float* x, int64_t len) {
  typedef typename VT<kW>::F F;
  constexpr int64_t kStep = std::is_same_v<T, at::BFloat16> ? 2 * kW : kW;
  F acc[kW];
  for (int i = 0; i < kW; ++i) acc[i] = F{};
  int64_t j = 0;
  for (; j + kStep <= len; j += kStep) {
    if constexpr (kStep == 2 * kW) {  // bf16: x in pair-split order (bf16_halves)
      const F xe = vload<kW>(x + j), xo = vload<kW>(x + j + kW);
#pragma GCC unroll 16
      for (int i = 0; i < kW; ++i) {
        F e, o;
        bf16_halves<kW>(rows[i] + j, e, o);
        acc[i] += e * xe;
        acc[i] += o * xo;
      }
    } else {
      const F xv = vload<kW>(x + j);
#pragma GCC unroll 16
      for (int i = 0; i < kW; ++i) acc[i] += vload<kW>(rows[i] + j) * xv;
    }
  }
  F out = transpose_reduce<kW>(acc);
  for (; j < len; ++j) {
    F col;
    for (int i = 0; i < kW; ++i) col[i] = widen(rows[i][j]);
    out += col * x[j];
  }
  return out;
}

}  // namespace

// Rows of x [rows, len] in the order chunk_dots<kW> expects for bf16 rows (identity otherwise).
void split_pairs(const float* x, int64_t rows, int64_t len, int64_t kw, float* out) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = x + r * len;
    float* dst = out + r * len;
    int64_t j = 0;
    for (; j + 2 * kw <= len; j += 2 * kw) {
      for (int64_t l = 0; l < kw; ++l) {
        dst[j + l] = src[j + 2 * l];
        dst[j + kw + l] = src[j + 2 * l + 1];
      }
    }
    for (; j < len; ++j) dst[j] = src[j];
  }
}

namespace {

template <int kW, typename T>
GI typename VT<kW>::F chunk_bias(const T* bias, int64_t v0, int64_t n) {
  typename VT<kW>::F b = typename VT<kW>::F{};
  if (bias) {
    for (int64_t i = 0; i < n; ++i) b[i] = widen(bias[v0 + i]);
  }
  return b;
}

// y[g, :] = y[g, :] * scale[g] + sum_i coef[g * kW + i] * rows[i][:] for G rows of y (row stride ldy):
// each kW-wide piece of the G rows lives in a register while the n rows stream through, so y is read
// and written once per chunk. Per element the arithmetic is the same for every G (no mixing of rows).
template <int kW, int G, typename T>
GI void accumulate_group(float* y, int64_t ldy, const float* scale, const float* coef, const T* const* rows, int64_t n,
                         int64_t cols) {
  typedef typename VT<kW>::F F;
  int64_t j = 0;
  for (; j + kW <= cols; j += kW) {
    F s[G];
    for (int g = 0; g < G; ++g) s[g] = vload<kW>(y + g * ldy + j) * scale[g];
    for (int64_t i = 0; i < n; ++i) {
      const F ev = vload<kW>(rows[i] + j);
      for (int g = 0; g < G; ++g) s[g] += coef[g * kW + i] * ev;
    }
    for (int g = 0; g < G; ++g) vstore<kW>(y + g * ldy + j, s[g]);
  }
  for (; j < cols; ++j) {
    for (int g = 0; g < G; ++g) {
      float s = y[g * ldy + j] * scale[g];
      for (int64_t i = 0; i < n; ++i) s += coef[g * kW + i] * widen(rows[i][j]);
      y[g * ldy + j] = s;
    }
  }
}

// bf16 rows: even / odd halves as in chunk_dots; the G rows of y are split into even and odd
// columns on load and merged back on store (once per chunk). Per element the same arithmetic.

template <int kW, int G>
GI void accumulate_group(float* y, int64_t ldy, const float* scale, const float* coef,
                         const at::BFloat16* const* rows, int64_t n, int64_t cols) {
  typedef typename VT<kW>::F F;
  int64_t j = 0;
  for (; j + 2 * kW <= cols; j += 2 * kW) {
    F se[G], so[G];
    for (int g = 0; g < G; ++g) {
      const F a0 = vload<kW>(y + g * ldy + j), a1 = vload<kW>(y + g * ldy + j + kW);
      se[g] = deinterleave<kW, 0>(a0, a1) * scale[g];
      so[g] = deinterleave<kW, 1>(a0, a1) * scale[g];
    }
    for (int64_t i = 0; i < n; ++i) {
      F e, o;
      bf16_halves<kW>(rows[i] + j, e, o);
      for (int g = 0; g < G; ++g) {
        se[g] += coef[g * kW + i] * e;
        so[g] += coef[g * kW + i] * o;
      }
    }
    for (int g = 0; g < G; ++g) {
      vstore<kW>(y + g * ldy + j, interleave<kW, 0>(se[g], so[g]));
      vstore<kW>(y + g * ldy + j + kW, interleave<kW, 1>(se[g], so[g]));
    }
  }
  for (; j < cols; ++j) {
    for (int g = 0; g < G; ++g) {
      float s = y[g * ldy + j] * scale[g];
      for (int64_t i = 0; i < n; ++i) s += coef[g * kW + i] * widen(rows[i][j]);
      y[g * ldy + j] = s;
    }
  }
}

template <int kW, typename T>
GI void accumulate_rows(float* y, int64_t ldy, int64_t count, const float* scale, const float* coef,
                        const T* const* rows, int64_t n, int64_t cols) {
  int64_t g = 0;
  for (; g + 4 <= count; g += 4) accumulate_group<kW, 4>(y + g * ldy, ldy, scale + g, coef + g * kW, rows, n, cols);
  const int64_t rest = count - g;
  if (rest == 3) accumulate_group<kW, 3>(y + g * ldy, ldy, scale + g, coef + g * kW, rows, n, cols);
  if (rest == 2) accumulate_group<kW, 2>(y + g * ldy, ldy, scale + g, coef + g * kW, rows, n, cols);
  if (rest == 1) accumulate_group<kW, 1>(y + g * ldy, ldy, scale + g, coef + g * kW, rows, n, cols);
}

// out row (v0 + i) = sum_b c1[b * kW + i] x1[b, :] (+ sum_b c2[b * kW + i] x2[b, :]) for i < n, in T:
// one weight-gradient row per vocabulary row, four vocabulary rows sharing each load of x.
template <int kW, typename T>
GI void weight_grad_rows(T* out, int64_t cols, int64_t rows, int64_t n, const float* c1, const float* x1,
                         const float* c2, const float* x2) {
  typedef typename VT<kW>::F F;
  for (int64_t i0 = 0; i0 < n; i0 += 4) {
    const int64_t ni = std::min<int64_t>(4, n - i0);
    int64_t j = 0;
    for (; j + kW <= cols; j += kW) {
      F s[4] = {F{}, F{}, F{}, F{}};
      for (int64_t b = 0; b < rows; ++b) {
        const F xv = vload<kW>(x1 + b * cols + j);
        for (int r = 0; r < 4; ++r) s[r] += c1[b * kW + i0 + r] * xv;
        if (c2) {
          const F xv2 = vload<kW>(x2 + b * cols + j);
          for (int r = 0; r < 4; ++r) s[r] += c2[b * kW + i0 + r] * xv2;
        }
      }
      for (int64_t r = 0; r < ni; ++r) vstore<kW>(out + (i0 + r) * cols + j, s[r]);
    }
    for (; j < cols; ++j) {
      for (int64_t r = 0; r < ni; ++r) {
        float s = 0.f;
        for (int64_t b = 0; b < rows; ++b) {
          s += c1[b * kW + i0 + r] * x1[b * cols + j];
          if (c2) s += c2[b * kW + i0 + r] * x2[b * cols + j];
        }
        out[(i0 + r) * cols + j] = narrow_to<T>(s);
      }
    }
  }
}

// The chunk of vocabulary rows [v0, v0 + n), n <= kW: its W rows and E rows (the same ones when
// tied; see chunk_rows), its bias lanes and which lanes are real rows.
template <int kW, typename T>
struct Chunk {
  int64_t n;
  const T* wrows[kW];
  const T* erows[kW];
  typename VT<kW>::F bias;
  typename VT<kW>::I valid;

  GI Chunk(const StreamArgs<T>& a, int64_t v0, int64_t v_end, T* gather) : n(std::min<int64_t>(kW, v_end - v0)) {
    chunk_rows<kW>(a.w, a.w_s0, a.w_s1, v0, n, a.d, gather, wrows);
    if (a.tied) {
      for (int i = 0; i < kW; ++i) erows[i] = wrows[i];
    } else {
      chunk_rows<kW>(a.e, a.e_s0, a.e_s1, v0, n, a.d_e, gather + kMaxW * a.d, erows);
    }
    bias = chunk_bias<kW>(a.bias, v0, n);
    valid = lane_index<kW>() < static_cast<int32_t>(n);
  }
};

// acc[r, :] = acc[r, :] * scale[r] + block[r, :] for `rows` rows (row stride ld, width cols): a
// finished vocabulary block folded into the split's running sums.
GI void fold_block(float* acc, const float* block, int64_t ld, int64_t rows, int64_t cols, const float* scale) {
  for (int64_t r = 0; r < rows; ++r) {
    float* a = acc + r * ld;
    const float* x = block + r * ld;
    for (int64_t k = 0; k < cols; ++k) a[k] = a[k] * scale[r] + x[k];
  }
}

// Online softmax over vocabulary rows [v_begin, v_end) for `rows` hidden rows, in blocks of
// kStreamBlock vocabulary rows: each block's terms go into a block accumulator (and block sum) that
// starts at zero and is folded into the running ones when the block ends, so an output element is
// the end of ~kStreamBlock + (v_end - v_begin) / kStreamBlock dependent additions instead of
// v_end - v_begin (whose fp32 error was ~10x the naive formula's at V = 49k on 2 threads).
// A new running max inside a block rescales the block accumulator at once and the running one when
// the block is folded (by exp(max at the block's start - max now)).
template <int kW, typename T>
GI void stream_forward_impl(const StreamForwardJob<T>& job) {
  typedef typename VT<kW>::F F;
  const StreamArgs<T>& a = job.a;
  float run_m[kStreamRows], run_s[kStreamRows], block_m[kStreamRows], block_s[kStreamRows], scale[kStreamRows];
  alignas(64) float p[kStreamRows * kW];
  for (int64_t b = 0; b < job.rows; ++b) {
    run_m[b] = -kInf;
    run_s[b] = 0.f;
  }
  for (int64_t v_block = job.v_begin; v_block < job.v_end; v_block += kStreamBlock) {
    const int64_t v_block_end = std::min(job.v_end, v_block + kStreamBlock);
    for (int64_t b = 0; b < job.rows; ++b) {
      block_m[b] = run_m[b];
      block_s[b] = 0.f;
      std::memset(job.block + b * job.ld_acc, 0, a.d_e * sizeof(float));
    }
    for (int64_t v0 = v_block; v0 < v_block_end; v0 += kW) {
      const Chunk<kW, T> c(a, v0, v_block_end, job.gather);
      for (int64_t b = 0; b < job.rows; ++b) {
        F z = finish_logits<kW>(chunk_dots<kW>(c.wrows, job.h + b * a.d, a.d), c.bias, a.temperature, a.softcap,
                                nullptr);
        z = c.valid ? z : F{} - kInf;
        const float m_new = std::max(run_m[b], hmax<kW>(z));
        const float safe = m_new == -kInf ? 0.f : m_new;  // fully masked so far: exp(-inf - 0) = 0
        scale[b] = std::exp(run_m[b] - safe);
        const F pv = vexp<kW>(z - safe);
        block_s[b] = block_s[b] * scale[b] + hsum<kW>(pv);
        run_m[b] = m_new;
        vstore<kW>(p + b * kW, pv);
      }
      accumulate_rows<kW>(job.block, job.ld_acc, job.rows, scale, p, c.erows, c.n, a.d_e);
    }
    for (int64_t b = 0; b < job.rows; ++b) {
      scale[b] = std::exp(block_m[b] - (run_m[b] == -kInf ? 0.f : run_m[b]));
      run_s[b] = run_s[b] * scale[b] + block_s[b];
    }
    fold_block(job.acc, job.block, job.ld_acc, job.rows, a.d_e, scale);
  }
  for (int64_t b = 0; b < job.rows; ++b) {
    job.m_out[b] = run_m[b];
    job.s_out[b] = run_s[b];
  }
}

// Gradients from vocabulary rows [v_begin, v_end): p = exp(z - lse) and dp = <dO, E_v> recomputed
// per chunk (fp32, so no cancellation error in dz = p (dp - delta)); the rows of dW / dE / db are
// owned by this split, d hidden goes into the split's fp32 partial a block of kStreamBlock
// vocabulary rows at a time (summed in dh_block from zero, then added), as in the forward.
template <int kW, typename T>
GI void stream_backward_impl(const StreamBackwardJob<T>& job) {
  typedef typename VT<kW>::F F;
  const StreamArgs<T>& a = job.a;
  const bool need_dz = job.dh || job.dw || job.db;
  float* P = job.work;                      // [rows][kW]
  float* DZ = job.work + job.rows * kMaxW;  // [rows][kW]
  float* ones = DZ + job.rows * kMaxW;      // [rows]
  for (int64_t b = 0; b < job.rows; ++b) ones[b] = 1.f;
  for (int64_t v_block = job.v_begin; v_block < job.v_end; v_block += kStreamBlock) {
    const int64_t v_block_end = std::min(job.v_end, v_block + kStreamBlock);
    if (job.dh) {
      for (int64_t b = 0; b < job.rows; ++b) std::memset(job.dh_block + b * job.ld_dh, 0, a.d * sizeof(float));
    }
    for (int64_t v0 = v_block; v0 < v_block_end; v0 += kW) {
      const Chunk<kW, T> c(a, v0, v_block_end, job.gather);
      for (int64_t b = 0; b < job.rows; ++b) {
        F cap_grad;
        const F z = finish_logits<kW>(chunk_dots<kW>(c.wrows, job.h_dot + b * a.d, a.d), c.bias, a.temperature,
                                      a.softcap, &cap_grad);
        F p = vexp<kW>(z - job.lse[b]);
        p = c.valid ? p : F{};
        F dz = F{};
        if (need_dz) {
          const F dp = chunk_dots<kW>(c.erows, job.g_dot + b * a.d_e, a.d_e);
          dz = p * (dp - job.delta[b]) * cap_grad;
          if (a.temperature != 1.0f) dz = dz / a.temperature;  // d raw logit
          dz = c.valid ? dz : F{};
        }
        vstore<kW>(P + b * kW, p);
        vstore<kW>(DZ + b * kW, dz);
      }
      if (job.grad_filter_eps > 0.f) {  // grad_filter.py: skip vocabulary rows below eps for every hidden row
        F p_max = F{};
        for (int64_t b = 0; b < job.rows; ++b) {
          const F p = vload<kW>(P + b * kW);
          p_max = (p > p_max) | (p != p) ? p : p_max;
        }
        const typename VT<kW>::I skip = p_max < job.grad_filter_eps;
        for (int64_t b = 0; b < job.rows; ++b) {
          vstore<kW>(P + b * kW, skip ? F{} : vload<kW>(P + b * kW));
          vstore<kW>(DZ + b * kW, skip ? F{} : vload<kW>(DZ + b * kW));
        }
      }
      if (job.dh) accumulate_rows<kW>(job.dh_block, job.ld_dh, job.rows, ones, DZ, c.wrows, c.n, a.d);
      if (job.dw) {
        weight_grad_rows<kW>(job.dw + v0 * a.d, a.d, job.rows, c.n, DZ, job.h, job.merge_tied ? P : nullptr, job.g);
      }
      if (job.de) weight_grad_rows<kW>(job.de + v0 * a.d_e, a.d_e, job.rows, c.n, P, job.g, nullptr, nullptr);
      if (job.db) {
        F s = F{};
        for (int64_t b = 0; b < job.rows; ++b) s += vload<kW>(DZ + b * kW);
        for (int64_t i = 0; i < c.n; ++i) job.db[v0 + i] = narrow_to<T>(s[i]);
      }
    }
    if (job.dh) fold_block(job.dh, job.dh_block, job.ld_dh, job.rows, a.d, ones);
  }
}

template <int kW, typename T>
GI void stream_run(bool backward, const void* job) {
  if (backward) {
    stream_backward_impl<kW>(*static_cast<const StreamBackwardJob<T>*>(job));
  } else {
    stream_forward_impl<kW>(*static_cast<const StreamForwardJob<T>*>(job));
  }
}

// A streaming job (StreamForwardJob<T> or StreamBackwardJob<T>, T from dt).
template <int kW>
GI void stream_any(at::ScalarType dt, bool backward, const void* job) {
  if (dt == at::kBFloat16) {
    stream_run<kW, at::BFloat16>(backward, job);
  } else if (dt == at::kHalf) {
    stream_run<kW, at::Half>(backward, job);
  } else {
    stream_run<kW, float>(backward, job);
  }
}

}  // namespace

// The streaming clones (kernels.h).
#define GIRCSE_STREAM_CLONE(SUFFIX, KW)                                                            \
  GIRCSE_TARGET_##SUFFIX void stream_##SUFFIX(at::ScalarType dt, bool backward, const void* job) { \
    stream_any<KW>(dt, backward, job);                                                             \
  }

GIRCSE_STREAM_CLONE(baseline, 4)
#if GIRCSE_ISA_CLONES
GIRCSE_STREAM_CLONE(avx2, 8)
GIRCSE_STREAM_CLONE(avx512, 16)
#endif

}  // namespace gircse
