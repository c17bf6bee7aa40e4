// C++ CPU backend of the soft-token-embedding op (gircse_kernels._C).
//
//     z   = (hidden @ W^T + b) / T            (optionally z = c * tanh(z / c), softcap)
//     out = softmax(z) @ E
//
// computed, forward and backward, without ever allocating a [B, V] buffer.
//
// Work decomposition
// ------------------
// The vocabulary is cut into tiles of `tile_v` rows and the tiles into S contiguous *splits*, S =
// min(threads, tiles); split s is processed by one thread (at::parallel_for, grain 1), so even B = 1
// keeps every core busy. Inside a split the loop is tile-outer, row-block-inner: a W tile (and the E
// tile; the same memory when the weights are tied, so a tied matrix is read once) stays in cache while
// every block of `row_block` hidden rows is multiplied with it. Largest temporaries: [row_block,
// tile_v] fp32 logits/probabilities per thread, plus the per-split partials below.
//
// Forward: each split keeps an online-softmax state per row (running max m, running sum s, fp32
// accumulator acc[B, d_e]); the S partial states are merged at the end with a log-sum-exp merge.
// Backward: p = exp(z - lse) is recomputed tile by tile with the same tiling; the split owning a tile
// writes that tile's rows of dW / dE / db (fp32 accumulation over row blocks, one conversion at the
// end, no atomics); d hidden is accumulated per split in fp32 and the S partials are summed.
//
// GEMMs go through ATen (at::mm / addmm on tile views: MKL for fp32, oneDNN for bf16, whose kernels
// use AVX512-BF16 / AMX when the CPU has them). CPU ATen has no bf16 x bf16 -> fp32 matmul, so a bf16
// GEMM yields bf16 results (fp32 accumulation inside, one rounding at the end: the precision of the
// plain bf16 PyTorch formula) that are widened to fp32 right away; every reduction across tiles
// (softmax state, accumulators, gradients) is fp32. fp16 has no fast CPU GEMM: its tiles are upcast
// to fp32. Elementwise work (bias, temperature, softcap, exp, row max/sum) uses ATen's vectorized
// (at::vec, runtime-dispatched AVX2/AVX512) kernels on the cache-resident tiles. Inside
// at::parallel_for every ATen call runs single-threaded, so the threads never oversubscribe.
//
// Small batches take a *streaming* path instead (by default B <= 4 in bf16, B <= 8 in fp32 / fp16;
// cached decoding embeds one soft token per sequence per step, so B is the number of sequences). There
// the tile GEMMs degenerate into GEMVs that read every W / E tile twice (logits, then p @ E) at a
// fraction of the memory bandwidth, and per-call BLAS overhead dominates. The streaming path walks each
// split's vocabulary rows once: a W row gives the logits of all B hidden rows and, still in L1, the E
// row (the same memory when tied) is added into the online-softmax accumulators; the backward likewise
// recomputes p, dp and every gradient from one visit of the W / E rows. All of its arithmetic is fp32
// (bf16 / fp16 rows are widened on load), so it is also more precise than the bf16 GEMM path. Its
// loops are plain C++ with 16-lane vector types, compiled for AVX512, AVX2 and baseline x86-64 (GCC
// target_clones, dispatched at load time by the CPU's features).
#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;

struct Tiling {
  int64_t tile_v;     // vocabulary rows per tile
  int64_t row_block;  // hidden rows per GEMM
  int64_t tiles;      // number of tiles
  int64_t splits;     // number of contiguous groups of tiles (one per thread)
};

// Tile sizes: row blocks of up to 256 rows (GEMMs big enough for the BLAS kernels to run near their
// peak); vocabulary tiles of 2048 rows (measured best on a 2-core AVX512-BF16 machine), fewer when
// needed to give every thread a tile. The tiling deliberately does not depend on B, so a row's
// result does not depend on which other rows share the batch (cached vs uncached decoding, DDP
// shards vs one process) as long as both batches take the tile path (the streaming path for small B
// rounds differently: within fp32 rounding in fp32, and more precisely than bf16 GEMMs in bf16).
Tiling make_tiling(int64_t rows, int64_t vocab, int64_t tile_v, int64_t row_block) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  Tiling t{};
  t.row_block = row_block > 0 ? row_block : std::min<int64_t>(rows, 256);
  t.tile_v = tile_v > 0 ? tile_v : std::min<int64_t>(2048, (vocab + threads - 1) / threads);
  // Never one tile spanning the whole vocabulary (a [B, V] tile) unless V == 1.
  t.tile_v = std::max<int64_t>(1, std::min(t.tile_v, (vocab + 1) / 2));
  t.tiles = (vocab + t.tile_v - 1) / t.tile_v;
  t.splits = std::min(threads, t.tiles);
  return t;
}

// Tiles [first, last) owned by split s (contiguous, sizes differing by at most one).
std::pair<int64_t, int64_t> split_range(const Tiling& t, int64_t s) {
  const int64_t base = t.tiles / t.splits, extra = t.tiles % t.splits;
  const int64_t first = s * base + std::min(s, extra);
  return {first, first + base + (s < extra ? 1 : 0)};
}

// The dtype the A operand of a GEMM is cast to: bf16 stays bf16 (fast kernels), fp16 goes to fp32.
at::ScalarType gemm_dtype(at::ScalarType t) {
  return t == at::kBFloat16 ? at::kBFloat16 : at::kFloat;
}

// out32 (fp32, [m, n]) = a @ b, or out32 += a @ b with `accumulate`. `a` and `b` are views (any
// strides BLAS accepts); `b` is cast to `a`'s dtype when they differ (fp16 tiles -> fp32).
void mm_into(Tensor out32, const Tensor& a, const Tensor& b, bool accumulate) {
  const Tensor bb = b.scalar_type() == a.scalar_type() ? b : b.to(a.scalar_type());
  if (a.scalar_type() == at::kFloat) {
    if (accumulate) {
      out32.addmm_(a, bb);
    } else {
      at::mm_out(out32, a, bb);
    }
    return;
  }
  const Tensor prod = at::mm(a, bb);  // bf16 result, fp32 accumulation inside
  if (accumulate) {
    out32.add_(prod);
  } else {
    out32.copy_(prod);
  }
}

struct Params {
  double temperature;
  std::optional<double> softcap;
};

// In place: raw logits z [m, n] fp32 -> final logits (bias, temperature, softcap). With a softcap,
// `cap_grad` (when given) receives dz/dz_pre = 1 - tanh^2.
void finish_logits(Tensor& z, const std::optional<Tensor>& b_tile, const Params& prm, Tensor* cap_grad) {
  if (b_tile) z.add_(b_tile->unsqueeze(0));  // promotes bf16/fp16 bias to fp32
  if (prm.temperature != 1.0) z.div_(prm.temperature);
  if (prm.softcap) {
    const double c = *prm.softcap;
    z.div_(c).tanh_();
    if (cap_grad) *cap_grad = 1.0 - z * z;
    z.mul_(c);
  }
}

// Final logits z [m, n] fp32 of hidden rows `h_blk` (already in the GEMM dtype) against vocabulary
// rows `w_tile` (+ `b_tile`).
Tensor tile_logits(const Tensor& h_blk, const Tensor& w_tile, const std::optional<Tensor>& b_tile,
                   const Params& prm, Tensor* cap_grad) {
  Tensor z = at::empty({h_blk.size(0), w_tile.size(0)}, h_blk.options().dtype(at::kFloat));
  mm_into(z, h_blk, w_tile.t(), /*accumulate=*/false);
  finish_logits(z, b_tile, prm, cap_grad);
  return z;
}

std::optional<Tensor> bias_tile(const std::optional<Tensor>& bias, int64_t v0, int64_t n) {
  if (!bias) return std::nullopt;
  return bias->narrow(0, v0, n);
}

// Calls fn(split, v0, n, w_tile, e_tile, b_tile) for every vocabulary tile [v0, v0 + n), the splits
// spread over ATen threads (each split's tiles in order, on one thread). Grad and inference mode are
// thread-local: workers run without grad, in the caller's inference mode.
template <typename Fn>
void for_each_tile(const Tiling& t, const Tensor& weight, const Tensor& embed, const std::optional<Tensor>& bias,
                   bool tied, const Fn& fn) {
  const int64_t vocab = weight.size(0);
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, t.splits, 1, [&](int64_t s_begin, int64_t s_end) {
    c10::InferenceMode inference_guard(inference);
    at::NoGradGuard worker_no_grad;
    for (int64_t s = s_begin; s < s_end; ++s) {
      const auto [first, last] = split_range(t, s);
      for (int64_t tile = first; tile < last; ++tile) {
        const int64_t v0 = tile * t.tile_v, n = std::min(t.tile_v, vocab - v0);
        const Tensor w_tile = weight.narrow(0, v0, n);
        fn(s, v0, n, w_tile, tied ? w_tile : embed.narrow(0, v0, n), bias_tile(bias, v0, n));
      }
    }
  });
}


// ---------------------------------------------------------------------------------------------
// Small-batch streaming path (see the header comment).

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define GIRCSE_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GIRCSE_MULTIVERSION
#endif
// The helpers are inlined into each clone so that they are vectorized for its instruction set.
#define GIRCSE_INLINE inline __attribute__((always_inline))

// fn(scalar_t{}) for the three input dtypes (check_inputs rejects the others).
template <typename Fn>
void dispatch_input_dtype(at::ScalarType dtype, const Fn& fn) {
  if (dtype == at::kBFloat16) {
    fn(at::BFloat16{});
  } else if (dtype == at::kHalf) {
    fn(at::Half{});
  } else {
    fn(float{});
  }
}

constexpr int64_t kStreamCapacity = 16;  // most rows the streaming path handles (stack buffers)

GIRCSE_INLINE float widen(float x) { return x; }
GIRCSE_INLINE float widen(at::Half x) { return static_cast<float>(x); }
GIRCSE_INLINE float widen(at::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;  // bf16 is the top half of an fp32
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// 16 fp32 lanes (GCC / Clang vector extension): one AVX512 register in the x86-64-v4 clone, two AVX2
// registers in the v3 clone, four SSE registers otherwise.
typedef float Lanes __attribute__((vector_size(64)));
typedef uint16_t Lanes16 __attribute__((vector_size(32)));
typedef uint32_t Lanes32 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;

GIRCSE_INLINE Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
GIRCSE_INLINE Lanes load_lanes(const at::BFloat16* p) {
  Lanes16 half;
  std::memcpy(&half, p, sizeof half);
  const Lanes32 bits = __builtin_convertvector(half, Lanes32) << 16;  // bf16 is the top half of an fp32
  Lanes v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
GIRCSE_INLINE Lanes load_lanes(const at::Half* p) {
  float wide[kLanes];
  for (int64_t l = 0; l < kLanes; ++l) wide[l] = static_cast<float>(p[l]);
  return load_lanes(wide);
}
GIRCSE_INLINE void store_lanes(float* p, Lanes v) { std::memcpy(p, &v, sizeof v); }

// out[r] = sum_j a[j] x[r, j] for R in {1, 2, 4} hidden rows x (row stride ldx), fp32: each 16-wide
// piece of the vocabulary row `a` is loaded and widened once for all R rows. The accumulators are
// named variables, not an array, so that they stay in registers; one row alone gets two of them to
// hide the FMA latency.
template <int R, typename T>
GIRCSE_INLINE void dot_rows(const T* __restrict a, const float* __restrict x, int64_t ldx, int64_t n,
                            float* __restrict out) {
  static_assert(R == 1 || R == 2 || R == 4, "dot_rows: R must be 1, 2 or 4");
  Lanes acc0 = {}, acc1 = {}, acc2 = {}, acc3 = {};
  int64_t j = 0;
  if constexpr (R == 1) {
    for (; j + 2 * kLanes <= n; j += 2 * kLanes) {
      acc0 += load_lanes(a + j) * load_lanes(x + j);
      acc1 += load_lanes(a + j + kLanes) * load_lanes(x + j + kLanes);
    }
    acc0 += acc1;
  }
  for (; j + kLanes <= n; j += kLanes) {
    const Lanes av = load_lanes(a + j);
    acc0 += av * load_lanes(x + j);
    if constexpr (R >= 2) acc1 += av * load_lanes(x + ldx + j);
    if constexpr (R == 4) {
      acc2 += av * load_lanes(x + 2 * ldx + j);
      acc3 += av * load_lanes(x + 3 * ldx + j);
    }
  }
  const Lanes acc[4] = {acc0, acc1, acc2, acc3};
  for (int r = 0; r < R; ++r) {
    float s = 0.f;
    for (int64_t t = j; t < n; ++t) s += widen(a[t]) * x[r * ldx + t];
    for (int64_t l = 0; l < kLanes; ++l) s += acc[r][l];
    out[r] = s;
  }
}

// y[r, :] += alpha[r] * x for R rows y (row stride ldy), fp32: x loaded and widened once for all R.
template <int R, typename T>
GIRCSE_INLINE void axpy_rows(float* __restrict y, int64_t ldy, const float* __restrict alpha,
                             const T* __restrict x, int64_t n) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    const Lanes xv = load_lanes(x + j);
    for (int r = 0; r < R; ++r) store_lanes(y + r * ldy + j, load_lanes(y + r * ldy + j) + alpha[r] * xv);
  }
  for (; j < n; ++j) {
    const float xj = widen(x[j]);
    for (int r = 0; r < R; ++r) y[r * ldy + j] += alpha[r] * xj;
  }
}

// dot_rows / axpy_rows over all `rows` rows, in groups of 4, 2 and 1.
template <typename T>
GIRCSE_INLINE void dot_all_rows(const T* a, const float* x, int64_t ldx, int64_t rows, int64_t n, float* out) {
  int64_t b = 0;
  for (; b + 4 <= rows; b += 4) dot_rows<4>(a, x + b * ldx, ldx, n, out + b);
  if (b + 2 <= rows) {
    dot_rows<2>(a, x + b * ldx, ldx, n, out + b);
    b += 2;
  }
  if (b < rows) dot_rows<1>(a, x + b * ldx, ldx, n, out + b);
}

template <typename T>
GIRCSE_INLINE void axpy_all_rows(float* y, int64_t ldy, const float* alpha, const T* x, int64_t rows, int64_t n) {
  int64_t b = 0;
  for (; b + 4 <= rows; b += 4) axpy_rows<4>(y + b * ldy, ldy, alpha + b, x, n);
  if (b + 2 <= rows) {
    axpy_rows<2>(y + b * ldy, ldy, alpha + b, x, n);
    b += 2;
  }
  if (b < rows) axpy_rows<1>(y + b * ldy, ldy, alpha + b, x, n);
}

template <typename T>
struct StreamOperands {
  const T* weight;  // [V, d], row stride ldw
  const T* embed;   // [V, d_e], row stride lde (the same memory as weight when tied)
  const T* bias;    // [V] or nullptr
  const float* hidden;  // [B, d] fp32, contiguous
  int64_t ldw, lde, rows, d, d_e;
  float temperature, softcap;  // softcap 0: none
};

template <typename T>
StreamOperands<T> stream_operands(const Tensor& weight, const Tensor& embed, const std::optional<Tensor>& bias,
                                  const Tensor& h32, const Params& prm) {
  return {weight.data_ptr<T>(), embed.data_ptr<T>(), bias ? bias->data_ptr<T>() : nullptr,
          h32.data_ptr<float>(), weight.stride(0), embed.stride(0), h32.size(0), h32.size(1), embed.size(1),
          static_cast<float>(prm.temperature), prm.softcap ? static_cast<float>(*prm.softcap) : 0.f};
}

// Final logits z[b] of every hidden row against vocabulary row v (bias, temperature, softcap, in the
// order of finish_logits); cap_grad[b] receives the softcap derivative 1 - tanh^2 (1 without one).
template <typename T>
GIRCSE_INLINE void stream_logits(const StreamOperands<T>& o, const T* w_row, int64_t v, float* z, float* cap_grad) {
  dot_all_rows(w_row, o.hidden, o.d, o.rows, o.d, z);
  const float bias = o.bias ? widen(o.bias[v]) : 0.f;
  for (int64_t b = 0; b < o.rows; ++b) {
    z[b] = (z[b] + bias) / o.temperature;
    cap_grad[b] = 1.f;
    if (o.softcap > 0.f) {
      const float t = std::tanh(z[b] / o.softcap);
      cap_grad[b] = 1.f - t * t;
      z[b] = o.softcap * t;
    }
  }
}

// Online softmax over vocabulary rows [v_begin, v_end) for every hidden row: updates the running max,
// running sum and unnormalized output acc [B, d_e] of one split. Rows are taken in chunks of 16 so
// that the max (and a rescale of acc) is updated once per chunk; the chunk's W / E rows stay in L1
// between the logits and the accumulation.
template <typename T>
GIRCSE_MULTIVERSION void stream_forward_range(const StreamOperands<T>& o, int64_t v_begin, int64_t v_end,
                                              float* run_max, float* run_sum, float* acc) {
  constexpr int64_t kChunk = 16;
  float z[kChunk][kStreamCapacity], cap_grad[kStreamCapacity], p[kStreamCapacity];
  for (int64_t v0 = v_begin; v0 < v_end; v0 += kChunk) {
    const int64_t n = std::min(kChunk, v_end - v0);
    for (int64_t i = 0; i < n; ++i) stream_logits(o, o.weight + (v0 + i) * o.ldw, v0 + i, z[i], cap_grad);
    for (int64_t b = 0; b < o.rows; ++b) {
      float chunk_max = z[0][b];
      for (int64_t i = 1; i < n; ++i) chunk_max = std::max(chunk_max, z[i][b]);
      if (chunk_max > run_max[b]) {  // exp(-inf) = 0 on the first chunk
        const float rescale = std::exp(run_max[b] - chunk_max);
        run_sum[b] *= rescale;
        for (int64_t j = 0; j < o.d_e; ++j) acc[b * o.d_e + j] *= rescale;
        run_max[b] = chunk_max;
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t b = 0; b < o.rows; ++b) {
        p[b] = std::exp(z[i][b] - run_max[b]);
        run_sum[b] += p[b];
      }
      axpy_all_rows(acc, o.d_e, p, o.embed + (v0 + i) * o.lde, o.rows, o.d_e);
    }
  }
}

template <typename T>
struct StreamGrads {
  const float* grad_out;  // [B, d_e] fp32
  const float* lse;       // [B]
  const float* delta;     // [B]
  float* d_hidden;        // [B, d] fp32 partial of this split, or nullptr
  T* d_weight;            // [V, d] contiguous, or nullptr
  T* d_embed;             // [V, d_e] contiguous, or nullptr (also when merged into d_weight)
  T* d_bias;              // [V] or nullptr
  bool merge_tied;        // dE rows are added into d_weight
  float grad_filter_eps;
};

// Gradients from vocabulary rows [v_begin, v_end): p = exp(z - lse) and dp = dO E_v^T are recomputed
// per row (both fp32, so no bf16 cancellation in dz = p (dp - delta)); the rows of dW / dE / db are
// owned by this split, d hidden goes into the split's fp32 partial. `scratch` holds d + d_e floats.
template <typename T>
GIRCSE_MULTIVERSION void stream_backward_range(const StreamOperands<T>& o, const StreamGrads<T>& g,
                                               int64_t v_begin, int64_t v_end, float* scratch) {
  const bool need_dz = g.d_hidden || g.d_weight || g.d_bias;
  float p[kStreamCapacity], dp[kStreamCapacity], dz[kStreamCapacity], cap_grad[kStreamCapacity];
  float* dw_row = scratch;
  float* de_row = scratch + o.d;
  for (int64_t v = v_begin; v < v_end; ++v) {
    const T* w_row = o.weight + v * o.ldw;
    const T* e_row = o.embed + v * o.lde;
    stream_logits(o, w_row, v, p, cap_grad);
    float p_max = 0.f;
    for (int64_t b = 0; b < o.rows; ++b) {
      p[b] = std::exp(p[b] - g.lse[b]);
      p_max = std::max(p_max, p[b]);
    }
    // Gradient filter (grad_filter.py): a vocabulary row below eps for every hidden row is skipped.
    const bool skip = g.grad_filter_eps > 0.f && p_max < g.grad_filter_eps;
    if (skip) {
      std::fill(p, p + o.rows, 0.f);
      std::fill(dz, dz + o.rows, 0.f);
    } else if (need_dz) {
      dot_all_rows(e_row, g.grad_out, o.d_e, o.rows, o.d_e, dp);
      for (int64_t b = 0; b < o.rows; ++b) {
        dz[b] = p[b] * (dp[b] - g.delta[b]) * cap_grad[b] / o.temperature;  // d raw logit
      }
    }
    if (g.d_hidden && !skip) axpy_all_rows(g.d_hidden, o.d, dz, w_row, o.rows, o.d);
    if (g.d_weight) {
      std::fill(dw_row, dw_row + o.d, 0.f);
      for (int64_t b = 0; b < o.rows; ++b) axpy_rows<1>(dw_row, 0, dz + b, o.hidden + b * o.d, o.d);
      if (g.merge_tied) {
        for (int64_t b = 0; b < o.rows; ++b) axpy_rows<1>(dw_row, 0, p + b, g.grad_out + b * o.d_e, o.d_e);
      }
      T* out = g.d_weight + v * o.d;
      for (int64_t j = 0; j < o.d; ++j) out[j] = static_cast<T>(dw_row[j]);
    }
    if (g.d_embed) {
      std::fill(de_row, de_row + o.d_e, 0.f);
      for (int64_t b = 0; b < o.rows; ++b) axpy_rows<1>(de_row, 0, p + b, g.grad_out + b * o.d_e, o.d_e);
      T* out = g.d_embed + v * o.d_e;
      for (int64_t j = 0; j < o.d_e; ++j) out[j] = static_cast<T>(de_row[j]);
    }
    if (g.d_bias) {
      float db = 0.f;
      for (int64_t b = 0; b < o.rows; ++b) db += dz[b];
      g.d_bias[v] = static_cast<T>(db);
    }
  }
}

// One contiguous vocabulary range per thread (fixed by V and the thread count, never by B).
struct StreamSplits {
  int64_t splits, vocab;
  std::pair<int64_t, int64_t> range(int64_t s) const { return {vocab * s / splits, vocab * (s + 1) / splits}; }
};

StreamSplits stream_splits(int64_t vocab) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  return {std::max<int64_t>(1, std::min(threads, vocab / 64)), vocab};
}

// Automatic threshold: the crossover with the tile GEMMs measured on a 2-core AVX512-BF16 machine
// (bench/results/cpu_op_small_batch.md): bf16 tiles (oneDNN bf16 GEMMs) overtake the streaming path
// between B = 4 and 8, fp32 and fp16 (upcast) tiles between B = 8 and 16.
int64_t stream_rows_limit(int64_t requested, at::ScalarType dtype) {
  TORCH_CHECK(requested <= kStreamCapacity, "gircse_kernels._C: stream_rows must be <= ", kStreamCapacity,
              ", got ", requested);
  if (requested >= 0) return requested;
  return dtype == at::kBFloat16 ? 4 : 8;
}

void check_inputs(const Tensor& hidden, const Tensor& weight, const Tensor& embed,
                  const std::optional<Tensor>& bias) {
  TORCH_CHECK(hidden.device().is_cpu() && weight.device().is_cpu() && embed.device().is_cpu(),
              "gircse_kernels._C: all tensors must be on the CPU");
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && embed.dim() == 2,
              "gircse_kernels._C: hidden [B, d], lm_head_weight [V, d], embed_weight [V, d_e] must be 2-D");
  TORCH_CHECK(hidden.size(1) == weight.size(1), "gircse_kernels._C: hidden has d=", hidden.size(1),
              " but lm_head_weight has d=", weight.size(1));
  TORCH_CHECK(embed.size(0) == weight.size(0), "gircse_kernels._C: embed_weight has ", embed.size(0),
              " rows, lm_head_weight has ", weight.size(0));
  TORCH_CHECK(hidden.size(0) >= 1 && weight.size(0) >= 1 && hidden.size(1) >= 1 && embed.size(1) >= 1,
              "gircse_kernels._C: empty input");
  const auto dt = hidden.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf,
              "gircse_kernels._C: dtype must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK(weight.scalar_type() == dt && embed.scalar_type() == dt,
              "gircse_kernels._C: hidden, lm_head_weight and embed_weight must share one dtype");
  TORCH_CHECK(hidden.stride(1) == 1 && weight.stride(1) == 1 && embed.stride(1) == 1,
              "gircse_kernels._C: hidden, lm_head_weight and embed_weight need a unit last stride");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == dt &&
                    bias->device().is_cpu(),
                "gircse_kernels._C: lm_head_bias must be a CPU [V] tensor of the inputs' dtype");
  }
}

void check_params(double temperature, const std::optional<double>& softcap) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "gircse_kernels._C: temperature must be > 0");
  TORCH_CHECK(!softcap || (std::isfinite(*softcap) && *softcap > 0),
              "gircse_kernels._C: softcap must be > 0");
}

// Log-sum-exp merge of per-split online-softmax states [S, B], [S, B], [S, B, d_e]: (out32, lse).
std::tuple<Tensor, Tensor> merge_splits(const Tensor& run_max, const Tensor& run_sum, const Tensor& acc) {
  if (run_max.size(0) == 1) {
    return {acc[0].div(run_sum[0].unsqueeze(1)), run_max[0] + run_sum[0].log()};
  }
  const Tensor top = run_max.amax(0);                         // [B]
  const Tensor weights = (run_max - top.unsqueeze(0)).exp_();  // [S, B]
  const Tensor total = (weights * run_sum).sum(0);             // [B]
  Tensor out = (acc * weights.unsqueeze(2)).sum(0).div_(total.unsqueeze(1));
  return {out, top + total.log()};
}

std::tuple<Tensor, Tensor> stream_forward(const Tensor& hidden, const Tensor& weight, const Tensor& embed,
                                          const std::optional<Tensor>& bias, const Params& prm) {
  const int64_t rows = hidden.size(0), d_e = embed.size(1);
  const StreamSplits sp = stream_splits(weight.size(0));
  const auto f32 = hidden.options().dtype(at::kFloat);
  Tensor run_max = at::full({sp.splits, rows}, -std::numeric_limits<float>::infinity(), f32);
  Tensor run_sum = at::zeros({sp.splits, rows}, f32);
  Tensor acc = at::zeros({sp.splits, rows, d_e}, f32);
  const Tensor h32 = hidden.to(at::kFloat).contiguous();
  float *mx = run_max.data_ptr<float>(), *sm = run_sum.data_ptr<float>(), *ac = acc.data_ptr<float>();
  dispatch_input_dtype(hidden.scalar_type(), [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    const auto o = stream_operands<scalar_t>(weight, embed, bias, h32, prm);
    at::parallel_for(0, sp.splits, 1, [&](int64_t s_begin, int64_t s_end) {
      for (int64_t s = s_begin; s < s_end; ++s) {
        const auto [v_begin, v_end] = sp.range(s);
        stream_forward_range(o, v_begin, v_end, mx + s * rows, sm + s * rows, ac + s * rows * d_e);
      }
    });
  });
  return merge_splits(run_max, run_sum, acc);
}

void stream_backward(const Tensor& grad_out, const Tensor& hidden, const Tensor& weight, const Tensor& embed,
                     const std::optional<Tensor>& bias, const Tensor& lse, const Tensor& delta, const Params& prm,
                     bool merge_tied, double grad_filter_eps, std::optional<Tensor>& d_hidden,
                     std::optional<Tensor>& d_weight, std::optional<Tensor>& d_embed,
                     std::optional<Tensor>& d_bias) {
  const int64_t rows = hidden.size(0), d = hidden.size(1), d_e = embed.size(1);
  const StreamSplits sp = stream_splits(weight.size(0));
  const auto f32 = hidden.options().dtype(at::kFloat);
  const Tensor h32 = hidden.to(at::kFloat).contiguous(), g32 = grad_out.to(at::kFloat).contiguous();
  const Tensor lse32 = lse.contiguous(), delta32 = delta.contiguous();
  Tensor dh_part = d_hidden ? at::zeros({sp.splits, rows, d}, f32) : Tensor();
  Tensor scratch = at::empty({sp.splits, d + d_e}, f32);
  dispatch_input_dtype(hidden.scalar_type(), [&](auto dtype_tag) {
    using scalar_t = decltype(dtype_tag);
    const auto o = stream_operands<scalar_t>(weight, embed, bias, h32, prm);
    at::parallel_for(0, sp.splits, 1, [&](int64_t s_begin, int64_t s_end) {
      for (int64_t s = s_begin; s < s_end; ++s) {
        const StreamGrads<scalar_t> g{
            g32.data_ptr<float>(), lse32.data_ptr<float>(), delta32.data_ptr<float>(),
            d_hidden ? dh_part.data_ptr<float>() + s * rows * d : nullptr,
            d_weight ? d_weight->data_ptr<scalar_t>() : nullptr,
            d_embed ? d_embed->data_ptr<scalar_t>() : nullptr,
            d_bias ? d_bias->data_ptr<scalar_t>() : nullptr,
            merge_tied, static_cast<float>(grad_filter_eps)};
        const auto [v_begin, v_end] = sp.range(s);
        stream_backward_range(o, g, v_begin, v_end, scratch.data_ptr<float>() + s * (d + d_e));
      }
    });
  });
  if (d_hidden) d_hidden = dh_part.sum(0).to(hidden.scalar_type());
}

}  // namespace

// Returns (out32 [B, d_e] fp32, lse [B] fp32).
std::tuple<Tensor, Tensor> forward(const Tensor& hidden, const Tensor& weight, const Tensor& embed,
                                   const std::optional<Tensor>& bias, double temperature,
                                   std::optional<double> softcap, bool tied, int64_t tile_v,
                                   int64_t row_block, int64_t stream_rows) {
  check_inputs(hidden, weight, embed, bias);
  check_params(temperature, softcap);
  at::NoGradGuard no_grad;
  const int64_t rows = hidden.size(0), vocab = weight.size(0), d_e = embed.size(1);
  const Params prm{temperature, softcap};
  if (rows <= stream_rows_limit(stream_rows, hidden.scalar_type())) return stream_forward(hidden, weight, embed, bias, prm);
  const Tiling t = make_tiling(rows, vocab, tile_v, row_block);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const auto ct = gemm_dtype(hidden.scalar_type());
  // Per-split online-softmax state: running max, running sum, unnormalized output.
  Tensor run_max = at::full({t.splits, rows}, -std::numeric_limits<float>::infinity(), f32);
  Tensor run_sum = at::zeros({t.splits, rows}, f32);
  Tensor acc = at::zeros({t.splits, rows, d_e}, f32);
  const Tensor h_ct = hidden.to(ct);

  for_each_tile(t, weight, embed, bias, tied, [&](int64_t s, int64_t, int64_t, const Tensor& w_tile,
                                               const Tensor& e_tile, const std::optional<Tensor>& b_tile) {
    for (int64_t r0 = 0; r0 < rows; r0 += t.row_block) {
      const int64_t m = std::min(t.row_block, rows - r0);
      Tensor z = tile_logits(h_ct.narrow(0, r0, m), w_tile, b_tile, prm, nullptr);
      Tensor mx = run_max[s].narrow(0, r0, m), sm = run_sum[s].narrow(0, r0, m);
      Tensor ac = acc[s].narrow(0, r0, m);
      const Tensor new_max = at::maximum(mx, z.amax(1));
      const Tensor rescale = (mx - new_max).exp_();  // exp(-inf) = 0 on the first tile
      Tensor p = z.sub_(new_max.unsqueeze(1)).exp_();  // at::vec (Sleef) exp, AVX2/AVX512 dispatch
      sm.mul_(rescale).add_(p.sum(1));
      ac.mul_(rescale.unsqueeze(1));
      mm_into(ac, p.to(ct), e_tile, /*accumulate=*/true);
      mx.copy_(new_max);
    }
  });

  return merge_splits(run_max, run_sum, acc);
}

// Returns (d_hidden, d_weight, d_embed, d_bias) in the inputs' dtype, None where not needed.
std::tuple<std::optional<Tensor>, std::optional<Tensor>, std::optional<Tensor>, std::optional<Tensor>>
backward(const Tensor& grad_out, const Tensor& hidden, const Tensor& weight, const Tensor& embed,
         const std::optional<Tensor>& bias, const Tensor& lse, const Tensor& delta, double temperature,
         std::optional<double> softcap, bool tied, bool need_hidden, bool need_weight, bool need_embed,
         bool need_bias, bool merge_tied_grads, double grad_filter_eps, int64_t tile_v,
         int64_t row_block, int64_t stream_rows) {
  check_inputs(hidden, weight, embed, bias);
  check_params(temperature, softcap);
  const int64_t rows = hidden.size(0), vocab = weight.size(0), d = hidden.size(1), d_e = embed.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == rows && grad_out.size(1) == d_e &&
                  grad_out.scalar_type() == hidden.scalar_type(),
              "gircse_kernels._C: grad_out must be [B, d_e] in the inputs' dtype");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == rows && lse.scalar_type() == at::kFloat &&
                  delta.dim() == 1 && delta.size(0) == rows && delta.scalar_type() == at::kFloat,
              "gircse_kernels._C: lse and delta must be fp32 [B]");
  TORCH_CHECK(!need_bias || bias, "gircse_kernels._C: need_bias without a bias");
  TORCH_CHECK(!merge_tied_grads || (need_weight && need_embed),
              "gircse_kernels._C: merge_tied_grads needs both weight gradients");
  at::NoGradGuard no_grad;
  const Params prm{temperature, softcap};
  const bool embed_grad = need_embed && !merge_tied_grads;
  std::optional<Tensor> d_hidden, d_weight, d_embed, d_bias;
  if (need_hidden) d_hidden = Tensor();  // allocated below
  if (need_weight) d_weight = at::empty({vocab, d}, weight.options());  // contiguous
  if (embed_grad) d_embed = at::empty({vocab, d_e}, embed.options());
  if (need_bias) d_bias = at::empty({vocab}, bias->options());
  if (rows <= stream_rows_limit(stream_rows, hidden.scalar_type())) {
    stream_backward(grad_out, hidden, weight, embed, bias, lse, delta, prm, merge_tied_grads, grad_filter_eps,
                    d_hidden, d_weight, d_embed, d_bias);
    return {d_hidden, d_weight, d_embed, d_bias};
  }
  const Tiling t = make_tiling(rows, vocab, tile_v, row_block);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const auto ct = gemm_dtype(hidden.scalar_type());
  const bool need_dz = need_hidden || need_weight || need_bias;
  const Tensor g = grad_out.contiguous();
  const Tensor g_ct = g.to(ct), h_ct = hidden.to(ct);
  // dz = p (dp - delta) cancels where p is peaked (delta = <dO, out32> is fp32 and tends to dp_j as
  // p_j -> 1), so a bf16-rounded dp would leave a residue p_j 2^-9 |dp_j| that exact arithmetic does
  // not have. The bf16 path therefore recomputes dp in fp32 for the few entries with p > 1/64 (at
  // most 64 per row); elsewhere the error this leaves in dz is below 2^-15 |dp|.
  const bool refine_dp = ct == at::kBFloat16 && need_dz;
  const Tensor g32 = refine_dp ? g.to(at::kFloat) : Tensor();
  constexpr double kRefineP = 1.0 / 64.0;

  // Tied weights: stack each row block of hidden over the same rows of dO ([2m, d]) so that one GEMM
  // with the W tile gives both the logits and dp (the tile is streamed once instead of twice).
  const bool stacked = tied && need_dz && d == d_e;
  std::vector<Tensor> stacked_blocks;
  if (stacked) {
    for (int64_t r0 = 0; r0 < rows; r0 += t.row_block) {
      const int64_t m = std::min(t.row_block, rows - r0);
      stacked_blocks.push_back(at::cat({h_ct.narrow(0, r0, m), g_ct.narrow(0, r0, m)}, 0));
    }
  }

  Tensor dh_part = need_hidden ? at::zeros({t.splits, rows, d}, f32) : Tensor();

  for_each_tile(t, weight, embed, bias, tied, [&](int64_t s, int64_t v0, int64_t n, const Tensor& w_tile,
                                               const Tensor& e_tile, const std::optional<Tensor>& b_tile) {
    // fp32 accumulators of this tile's weight-gradient rows, over all row blocks.
    Tensor dw_acc = need_weight ? at::zeros({n, d}, f32) : Tensor();
    Tensor de_acc = embed_grad ? at::zeros({n, d_e}, f32) : Tensor();
    Tensor db_acc = need_bias ? at::zeros({n}, f32) : Tensor();
    for (int64_t r0 = 0; r0 < rows; r0 += t.row_block) {
      const int64_t m = std::min(t.row_block, rows - r0);
      Tensor cap_grad, p, dz;
      if (stacked) {  // tied: logits and dp = dO W^T from one GEMM over the same W tile
        Tensor both = at::empty({2 * m, n}, f32);
        mm_into(both, stacked_blocks[r0 / t.row_block], w_tile.t(), /*accumulate=*/false);
        p = both.narrow(0, 0, m);
        dz = both.narrow(0, m, m);
        finish_logits(p, b_tile, prm, softcap ? &cap_grad : nullptr);
      } else {
        p = tile_logits(h_ct.narrow(0, r0, m), w_tile, b_tile, prm, softcap ? &cap_grad : nullptr);
      }
      p.sub_(lse.narrow(0, r0, m).unsqueeze(1)).exp_();
      // Gradient filter: skip a (row block, tile) whose probabilities are all below eps.
      if (grad_filter_eps > 0.0 && p.max().item<float>() < grad_filter_eps) continue;
      const Tensor g_blk = g_ct.narrow(0, r0, m);
      if (need_dz) {
        if (!stacked) {
          dz = at::empty({m, n}, f32);
          mm_into(dz, g_blk, e_tile.t(), /*accumulate=*/false);  // dp = dO E^T
        }
        if (refine_dp) {
          const Tensor big = (p > kRefineP).nonzero();  // [k, 2] (row, column) pairs
          if (big.size(0) > 0) {
            const Tensor ri = big.select(1, 0), cj = big.select(1, 1);
            const Tensor exact = (g32.narrow(0, r0, m).index_select(0, ri) *
                                  e_tile.index_select(0, cj).to(at::kFloat)).sum(1);
            dz.index_put_({ri, cj}, exact);
          }
        }
        dz.sub_(delta.narrow(0, r0, m).unsqueeze(1)).mul_(p);   // dz = p (dp - delta)
        if (softcap) dz.mul_(cap_grad);
        if (temperature != 1.0) dz.div_(temperature);          // d raw logit
        const Tensor dz_ct = dz.to(ct);
        if (need_hidden) mm_into(dh_part[s].narrow(0, r0, m), dz_ct, w_tile, true);
        if (need_weight) mm_into(dw_acc, dz_ct.t(), h_ct.narrow(0, r0, m), true);
        if (need_bias) db_acc.add_(dz.sum(0));
      }
      if (need_embed) mm_into(merge_tied_grads ? dw_acc : de_acc, p.to(ct).t(), g_blk, true);
    }
    if (need_weight) d_weight->narrow(0, v0, n).copy_(dw_acc);
    if (embed_grad) d_embed->narrow(0, v0, n).copy_(de_acc);
    if (need_bias) d_bias->narrow(0, v0, n).copy_(db_acc);
  });

  if (need_hidden) d_hidden = dh_part.sum(0).to(hidden.scalar_type());
  return {d_hidden, d_weight, d_embed, d_bias};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "C++ CPU backend of gircse_kernels.soft_token_embedding (see csrc/soft_token_embedding.cpp)";
  m.def("forward", &forward, "softmax(z) @ E without a [B, V] buffer: (out32, lse)", py::arg("hidden"),
        py::arg("lm_head_weight"), py::arg("embed_weight"), py::arg("lm_head_bias"), py::arg("temperature"),
        py::arg("softcap"), py::arg("tied"), py::arg("tile_v") = 0, py::arg("row_block") = 0,
        py::arg("stream_rows") = -1, py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "gradients of the op (d_hidden, d_weight, d_embed, d_bias)",
        py::arg("grad_out"), py::arg("hidden"), py::arg("lm_head_weight"), py::arg("embed_weight"),
        py::arg("lm_head_bias"), py::arg("lse"), py::arg("delta"), py::arg("temperature"),
        py::arg("softcap"), py::arg("tied"), py::arg("need_hidden"), py::arg("need_weight"),
        py::arg("need_embed"), py::arg("need_bias"), py::arg("merge_tied_grads"),
        py::arg("grad_filter_eps"), py::arg("tile_v") = 0, py::arg("row_block") = 0,
        py::arg("stream_rows") = -1, py::call_guard<py::gil_scoped_release>());
  m.def("num_threads", []() { return at::get_num_threads(); });
}
