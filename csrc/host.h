// What the host-side files share (plan.cpp, stream_path.cpp, tile_path.cpp, bindings.cpp): the op's
// parameters, the tile configuration and the path choice, small helpers, and the functions one of
// them defines for the others. It includes ATen's tensor headers, which the
// kernel files (kernels.h) do without. What the op computes and how the files divide it:
// csrc/README.md.
#pragma once

#include "kernels.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

GIRCSE_NAMESPACE {

using at::Tensor;

// The tile path's GEMM engines (resolve_gemm).
enum Gemm : int64_t { kGemmFp32 = 0, kGemmBf16 = 1 };
inline constexpr const char* kGemmNames[] = {"fp32", "bf16"};

struct Params {
  double temperature;
  std::optional<double> softcap;
};

inline int64_t round_up(int64_t x, int64_t k) { return (x + k - 1) / k * k; }
inline int64_t ceil_div(int64_t x, int64_t k) { return (x + k - 1) / k; }
inline int64_t threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// Per-split partial accumulators (S x B x width floats) never exceed this, whatever the thread count
// or B: the tile path spreads rows over row groups, the streaming path runs the rows in passes (except
// a backward with weight gradients). `partial_budget` overrides it, e.g. for tests of either schedule.
inline constexpr int64_t kPartialBudget = 64ll << 20;

struct TileConfig {
  int64_t tile_v, row_block, tiles, splits, groups;
};

// Which path and configuration a call takes (also reported by plan()).
struct Choice {
  bool stream;
  int64_t isa, engine;
  int64_t budget;  // bytes the per-split partials may take: `partial_budget`, or kPartialBudget for 0
  TileConfig tiles;
};

// Runs fn(item) for items [0, count) over ATen threads. Grad and inference mode are thread-local:
// workers run without grad, in the caller's inference mode, and release the AMX state (brgemm) at
// the end.
template <typename Fn>
void parallel_items(int64_t count, const Fn& fn) {
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    c10::InferenceMode inference_guard(inference);
    at::NoGradGuard worker_no_grad;
    for (int64_t item = begin; item < end; ++item) fn(item);
  });
}

template <typename Fn>
void dispatch_dtype(at::ScalarType dt, const Fn& fn) {
  if (dt == at::kBFloat16) {
    fn(at::BFloat16{});
  } else if (dt == at::kHalf) {
    fn(at::Half{});
  } else {
    fn(float{});
  }
}

// ---- plan.cpp: what the CPU can do.
bool isa_supported(int64_t isa);
int64_t best_isa();
int64_t resolve_isa(const std::string& name);
bool cpu_avx512_bf16();
bool cpu_amx_bf16();
bool bf16_gemm_available();
int64_t resolve_gemm(const std::string& name, at::ScalarType dtype, int64_t d, int64_t d_e);
// The bf16 engine's GEMM: C [M, N] (+)= A [M, K] B, B in VNNI layout [K / 2, ldb, 2].
void brgemm(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda, const at::BFloat16* B,
            int64_t ldb, float* C, int64_t ldc, bool add_C);

// ---- plan.cpp: which path a call takes, and how its work is cut.
Choice choose(int64_t rows, int64_t vocab, int64_t d, int64_t d_e, at::ScalarType dtype, bool backward,
              bool invariant, int64_t tile_v, int64_t row_block, int64_t partial_budget, int64_t stream_rows,
              const std::string& isa, const std::string& gemm);
int64_t stream_split_count(int64_t vocab, bool invariant);
int64_t stream_pass_rows(int64_t rows, int64_t splits, int64_t width, int64_t budget, bool backward);
std::pair<int64_t, int64_t> split_tiles(const TileConfig& c, int64_t s);
std::pair<int64_t, int64_t> group_rows(const TileConfig& c, int64_t rows, int64_t g);

// ---- stream_path.cpp
std::tuple<Tensor, Tensor> stream_forward(const Tensor& hidden, const Tensor& weight, const Tensor& embed,
                                          const std::optional<Tensor>& bias, const Params& prm, bool tied,
                                          bool invariant, int64_t isa, int64_t budget);
void stream_backward(const Tensor& grad_out, const Tensor& hidden, const Tensor& weight, const Tensor& embed,
                     const std::optional<Tensor>& bias, const Tensor& lse, const Tensor& delta, const Params& prm,
                     bool tied, bool merge_tied, double grad_filter_eps, bool invariant, int64_t isa, int64_t budget,
                     std::optional<Tensor>& d_hidden, std::optional<Tensor>& d_weight,
                     std::optional<Tensor>& d_embed, std::optional<Tensor>& d_bias);

// ---- tile_path.cpp
std::tuple<Tensor, Tensor> tile_forward(const Tensor& hidden, const Tensor& weight, const Tensor& embed,
                                        const std::optional<Tensor>& bias, const Params& prm, bool tied,
                                        int64_t engine, const TileConfig& c, const Kernels& k);
void tile_backward(const Tensor& grad_out, const Tensor& hidden, const Tensor& weight, const Tensor& embed,
                   const std::optional<Tensor>& bias, const Tensor& lse, const Tensor& delta, const Params& prm,
                   bool tied, bool merge_tied, double grad_filter_eps, int64_t engine, const TileConfig& c,
                   const Kernels& k, std::optional<Tensor>& d_hidden, std::optional<Tensor>& d_weight,
                   std::optional<Tensor>& d_embed, std::optional<Tensor>& d_bias);

}  // namespace gircse
