// What runs, and how the work is cut: what the CPU can do (the instruction sets of the kernel clones,
// AVX512-BF16 / AMX and a probe of oneDNN's brgemm ukernel for the tile path's bf16 engine, with the
// wrapper that engine calls), the clone tables (kernels_for), `isa=` and `gemm=`, the path a call
// takes (choose), the streaming path's split count and row passes, and the tile path's tile size,
// vocabulary splits and row groups, with the measurements behind them. Apart from the paths so that
// their files hold their loops and this one every decision; it needs no ATen operator header.
#include "host.h"

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include <algorithm>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

GIRCSE_NAMESPACE {

// ---- What the CPU can do

bool isa_supported(int64_t isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return isa == kBaseline || (isa == kAvx2 && avx2) || (isa == kAvx512 && avx512);
#else
  return isa == kBaseline;
#endif
}

int64_t best_isa() { return isa_supported(kAvx512) ? kAvx512 : isa_supported(kAvx2) ? kAvx2 : kBaseline; }

int64_t resolve_isa(const std::string& name) {
  if (name.empty() || name == "auto") return best_isa();
  for (int64_t i = 0; i < 3; ++i) {
    if (name == kIsaNames[i]) {
      TORCH_CHECK(isa_supported(i), "gircse_kernels._C: isa='", name,
                  "' was requested but this CPU does not support it (best: '", kIsaNames[best_isa()], "')");
      return i;
    }
  }
  TORCH_CHECK(false, "gircse_kernels._C: isa must be 'auto', 'avx512', 'avx2' or 'baseline', got '", name, "'");
}

bool cpu_avx512_bf16() {
#if defined(__x86_64__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 1, &a, &b, &c, &d) && ((a >> 5) & 1u) && isa_supported(kAvx512);
#else
  return false;
#endif
}

bool cpu_amx_bf16() {
#if defined(__x86_64__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  return __get_cpuid_count(7, 0, &a, &b, &c, &d) && ((d >> 22) & 1u);
#else
  return false;
#endif
}

namespace {

uint16_t bf16_bits(float x) {  // exact for the small integers the probe uses
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return static_cast<uint16_t>(u >> 16);
}

}  // namespace

// C [M, N] (+)= A [M, K] B, B in VNNI layout [K / 2, ldb, 2]. The ukernel has no blocking of its
// own, so N and K are cut into 512-wide pieces that keep each B piece in L2 while all of A's rows
// pass (measured ~1.5x faster than one call for N or K in the thousands, on par with at::mm).
void brgemm(int64_t M, int64_t N, int64_t K, const at::BFloat16* A, int64_t lda, const at::BFloat16* B,
            int64_t ldb, float* C, int64_t ldc, bool add_C) {
  constexpr int64_t kPiece = 512;
  for (int64_t n0 = 0; n0 < N; n0 += kPiece) {
    for (int64_t k0 = 0; k0 < K; k0 += kPiece) {
      at::native::cpublas::brgemm(M, std::min(kPiece, N - n0), std::min(kPiece, K - k0), lda, ldb, ldc,
                                  add_C || k0 > 0, A + k0, B + k0 * ldb + 2 * n0, C + n0, /*is_vnni=*/true);
    }
  }
}

namespace {

// The bf16 engine's GEMM (brgemm below) computes an awkward product exactly (small integers; odd M,
// N and K pieces past the 512-wide blocking), or this CPU / build cannot use it (no oneDNN ukernel,
// or a B layout other than the one pack_pairs writes, which would be a wrong answer, not an error).
bool probe_brgemm() {
  constexpr int64_t M = 9, N = 600, K = 1030;
  std::vector<uint16_t> a(M * K), b(K * N);  // b: VNNI [K/2][N][2]
  std::vector<float> c(M * N, 0.f), want(M * N, 0.f);
  auto av = [](int64_t i, int64_t k) { return static_cast<float>((i * 3 + k) % 7 - 3); };
  auto bv = [](int64_t k, int64_t j) { return static_cast<float>((k * 5 + j * 2) % 9 - 4); };
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) a[i * K + k] = bf16_bits(av(i, k));
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < N; ++j) b[(k / 2) * N * 2 + j * 2 + (k % 2)] = bf16_bits(bv(k, j));
  for (int64_t i = 0; i < M; ++i)
    for (int64_t j = 0; j < N; ++j)
      for (int64_t k = 0; k < K; ++k) want[i * N + j] += av(i, k) * bv(k, j);
  try {
    brgemm(M, N, K, reinterpret_cast<const at::BFloat16*>(a.data()), K, reinterpret_cast<const at::BFloat16*>(b.data()),
           N, c.data(), N, false);
    at::native::cpublas::brgemm_release(true);
  } catch (const std::exception&) {
    return false;
  }
  return c == want;
}

}  // namespace

bool bf16_gemm_available() {
  if (!at::globalContext().userEnabledMkldnn()) return false;  // torch.backends.mkldnn.enabled = False
  static const bool ok = (cpu_avx512_bf16() || cpu_amx_bf16()) && probe_brgemm();
  return ok;
}

// The GEMM engine of the tile path: bf16 inputs use native bf16 GEMMs where the CPU has them (and
// d, d_e are even, as the VNNI pairs need); everything else runs fp32 GEMMs.
int64_t resolve_gemm(const std::string& name, at::ScalarType dtype, int64_t d, int64_t d_e) {
  TORCH_CHECK(name.empty() || name == "auto" || name == "fp32" || name == "bf16",
              "gircse_kernels._C: gemm must be 'auto', 'fp32' or 'bf16', got '", name, "'");
  if (dtype != at::kBFloat16 || name == "fp32") return kGemmFp32;
  const bool even = d % 2 == 0 && d_e % 2 == 0;
  if (name == "bf16") {
    TORCH_CHECK(bf16_gemm_available(), "gircse_kernels._C: gemm='bf16' was requested but this CPU has no native "
                "bf16 GEMM (AVX512-BF16 or AMX through oneDNN's brgemm)");
    TORCH_CHECK(even, "gircse_kernels._C: gemm='bf16' needs even d and d_e, got d=", d, ", d_e=", d_e);
    return kGemmBf16;
  }
  return bf16_gemm_available() && even ? kGemmBf16 : kGemmFp32;
}

namespace {

#define GIRCSE_KERNEL_TABLE(SUFFIX)                                                            \
  const Kernels kKernels_##SUFFIX = {stream_##SUFFIX, tile_forward_softmax_##SUFFIX,           \
                                     tile_backward_elementwise_##SUFFIX, pack_pairs_##SUFFIX};

GIRCSE_KERNEL_TABLE(baseline)
#if GIRCSE_ISA_CLONES
GIRCSE_KERNEL_TABLE(avx2)
GIRCSE_KERNEL_TABLE(avx512)
#endif

}  // namespace

const Kernels& kernels_for(int64_t isa) {
#if GIRCSE_ISA_CLONES
  if (isa == kAvx512) return kKernels_avx512;
  if (isa == kAvx2) return kKernels_avx2;
#endif
  return kKernels_baseline;
}

// ---- Which path a call takes, and how its work is cut

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
// sum) of every row in flight stay under `budget` bytes, in whole kStreamRows groups; in the backward,
// so do the block sums of d hidden (ld floats per row for each split running at once; the forward's
// are kStreamRows rows per thread whatever the batch). Only batch-invariant calls stream
// large batches (S up to 8 there); each row's arithmetic is the same in any pass, so running the rows
// in several passes changes no bit of the result.
int64_t stream_pass_rows(int64_t rows, int64_t splits, int64_t width, int64_t budget, bool backward) {
  const int64_t buffers = splits + (backward ? std::min(splits, threads()) : 0);
  const int64_t per_row = buffers * (round_up(width, 16) + 2) * static_cast<int64_t>(sizeof(float));
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

}  // namespace gircse
