// How a call is cut up, and how its pieces come back together: the path a call takes (choose), the
// streaming path's split count and row passes, the tile path's tile size, vocabulary splits and row
// groups, and the merge of the splits' partial results (log-sum-exp of the forward's softmax states,
// sums of d hidden). Both paths and plan() use these; apart so that the paths' files hold their loops
// and this one every sizing rule, with the measurements behind it.
#include "host.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>

namespace gircse {
namespace {

// Automatic tiling: a W tile plus an E tile of about kTileElems elements (512 KiB in bf16), so tile_v
// falls as 1 / (d + d_e) and the per-thread buffers (the packed E or W tile, the fp32 logits of a row
// block) stay small; but at least kMinTileV rows, the K dimension of the GEMMs that accumulate over
// the tile (p E, dz W), below which those GEMMs spend more time loading and storing their fp32
// accumulators than multiplying (measured on the AVX512-BF16 machine: d = 3584 backward 1.3x slower
// with 64-row tiles than with 256). So every real width (d + d_e >= 1024) gets 256 rows: measured
// side by side there (bench/results/cpu-amd-epyc-avx512bf16-2c/tile-size/), SmolLM2 and Qwen2.5-0.5B
// at B = 64 and 512 ran at 0.96-1.01x the time of the 2^20-element tiles (896 and 576 rows) used
// before, with 40-60% less extra memory at B = 64.
constexpr int64_t kTileElems = 1ll << 18;
constexpr int64_t kMinTileV = 256;
constexpr int64_t kMaxTileV = 2048;
// Rows per GEMM block; the backward's GEMMs over wide rows (large d) prefer twice as many.
constexpr int64_t kRowBlock = 128;
constexpr int64_t kWideRows = 4096;
constexpr int64_t kMinGroupRows = 32;

// Automatic threshold: at most this many rows take the streaming path. Measured side by side on the
// 2-core AVX512-BF16 machine (forward + backward): with native bf16 GEMMs the tiles win from B ~ 8 in
// bf16; against fp32 GEMMs (fp32 / fp16 inputs, or bf16 without native bf16 GEMMs) the streaming
// path was still ahead at B = 16 (and, there, up to B = 48 against MKL fp32).
int64_t stream_rows_limit(int64_t requested, at::ScalarType dtype, int64_t engine) {
  TORCH_CHECK(requested >= -1 && requested <= kMaxStreamRows, "gircse_kernels._C: stream_rows must be in [-1, ",
              kMaxStreamRows, "], got ", requested);
  if (requested >= 0) return requested;
  if (dtype == at::kBFloat16 && engine == kGemmBf16) return 8;
  return 16;
}

// `budget`: bytes the per-split partials may take (resolved by choose()).
TileConfig tile_config(int64_t rows, int64_t vocab, int64_t d, int64_t d_e, int64_t tile_v, int64_t row_block,
                       int64_t budget, bool backward) {
  TORCH_CHECK(tile_v >= 0 && row_block >= 0, "gircse_kernels._C: tile_v and row_block must be >= 0");
  const int64_t t = threads();
  TileConfig c{};
  if (tile_v > 0) {
    c.tile_v = tile_v;
  } else {
    c.tile_v = std::clamp<int64_t>(kTileElems / (d + d_e) / 32 * 32, kMinTileV, kMaxTileV);
    c.tile_v = std::min(c.tile_v, ceil_div(vocab, t));  // every thread gets a tile
  }
  // Never one tile spanning the whole vocabulary (a [B, V] tile) unless V == 1.
  c.tile_v = std::max<int64_t>(1, std::min(c.tile_v, (vocab + 1) / 2));
  c.tiles = ceil_div(vocab, c.tile_v);
  const int64_t width = round_up(backward ? d : d_e, 16) + 2;
  const int64_t affordable = std::max<int64_t>(1, budget / (rows * width * 4));
  const int64_t block = backward && d + d_e >= kWideRows ? 2 * kRowBlock : kRowBlock;
  if (affordable >= std::min(t, c.tiles)) {  // split the vocabulary only
    c.splits = std::min(t, c.tiles);
    c.row_block = row_block > 0 ? row_block : std::min(rows, block);
    c.groups = 1;
  } else {  // large batch: few splits, the rest of the parallelism from row groups of whole row blocks
    c.splits = std::min(affordable, c.tiles);
    const int64_t wanted = ceil_div(t, c.splits);
    c.row_block = row_block > 0 ? row_block
                                : std::clamp<int64_t>(ceil_div(rows, wanted), std::min(rows, kMinGroupRows), block);
    c.groups = std::clamp<int64_t>(wanted, 1, ceil_div(rows, c.row_block));
  }
  return c;
}

}  // namespace

Choice choose(int64_t rows, int64_t vocab, int64_t d, int64_t d_e, at::ScalarType dtype, bool backward,
              bool invariant, int64_t tile_v, int64_t row_block, int64_t partial_budget, int64_t stream_rows,
              const std::string& isa, const std::string& gemm) {
  TORCH_CHECK(partial_budget >= 0, "gircse_kernels._C: partial_budget must be >= 0");
  Choice ch{};
  ch.budget = partial_budget > 0 ? partial_budget : kPartialBudget;
  ch.isa = resolve_isa(isa);
  ch.engine = resolve_gemm(gemm, dtype, d, d_e);
  ch.stream = invariant || rows <= stream_rows_limit(stream_rows, dtype, ch.engine);
  if (!ch.stream) ch.tiles = tile_config(rows, vocab, d, d_e, tile_v, row_block, ch.budget, backward);
  return ch;
}

// The streaming path's split count: one vocabulary range per thread (each at least 64 rows), or,
// for batch invariance, a count fixed by V alone.
int64_t stream_split_count(int64_t vocab, bool invariant) {
  if (invariant) return std::clamp<int64_t>(vocab / 8192, 1, 8);
  return std::max<int64_t>(1, std::min(threads(), vocab / 64));
}

// Rows per streaming pass: the S per-split partials of a row (S x ld floats, plus its running max and
// sum) of every row in flight stay under `budget` bytes, in whole kStreamRows groups. Only batch-
// invariant calls stream large batches (S up to 8 there); each row's arithmetic is the same in any
// pass, so running the rows in several passes changes no bit of the result.
int64_t stream_pass_rows(int64_t rows, int64_t splits, int64_t width, int64_t budget) {
  const int64_t per_row = splits * (round_up(width, 16) + 2) * static_cast<int64_t>(sizeof(float));
  return std::min(rows, std::max<int64_t>(kStreamRows, budget / per_row / kStreamRows * kStreamRows));
}

// Tiles [first, last) of split s (contiguous, sizes differing by at most one).
std::pair<int64_t, int64_t> split_tiles(const TileConfig& c, int64_t s) {
  const int64_t base = c.tiles / c.splits, extra = c.tiles % c.splits;
  const int64_t first = s * base + std::min(s, extra);
  return {first, first + base + (s < extra ? 1 : 0)};
}

// Rows [first, last) of row group g: whole row blocks (the per-call operands are packed per block).
std::pair<int64_t, int64_t> group_rows(const TileConfig& c, int64_t rows, int64_t g) {
  const int64_t blocks = ceil_div(rows, c.row_block);
  return {blocks * g / c.groups * c.row_block, std::min(rows, blocks * (g + 1) / c.groups * c.row_block)};
}

// Log-sum-exp merge of S partial states (acc [S, B, ld], run max / sum [S, B]) into (out32 [B, d_e],
// lse [B]), per row in split order. A row with every entry masked: total 0 -> NaN output, lse -inf.
std::tuple<Tensor, Tensor> merge_splits(Tensor acc, const Tensor& run_m, const Tensor& run_s, int64_t d_e) {
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
Tensor sum_partials(const Tensor& part, int64_t width, at::ScalarType dtype) {
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
