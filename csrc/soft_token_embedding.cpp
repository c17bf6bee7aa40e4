// C++ CPU backend of the soft-token-embedding op (gircse_kernels._C).
//
//     z   = (hidden @ W^T + b) / T            (optionally z = c * tanh(z / c), softcap)
//     out = softmax(z) @ E
//
// computed, forward and backward, without ever allocating a [B, V] buffer. W and E may have any 2-D
// strides (e.g. a transposed view of a [d, V] matrix); they are never copied whole.
//
// Two paths
// ---------
// *Tile GEMMs* (the default for B above 8 rows with native bf16 GEMMs, else 16). The vocabulary is
// cut into tiles of `tile_v` rows (scaling with 1 / (d + d_e), so a W and an E tile stay
// small, but at least 256 rows), the tiles into S contiguous *splits* and the rows into G *row
// groups*; work item (split, group) runs an online softmax (running max m, running sum s, fp32
// accumulator) over its split's tiles for its rows, the tile outer and blocks of `row_block` rows
// inner, so a prepared tile serves every row block of the group. The S partial states are merged per
// row by log-sum-exp in a fixed order. S and G are chosen from the thread count under a memory
// budget: the per-split partials (S x B x d_e floats forward, S x B x d backward) never exceed
// kPartialBudget, whatever the thread count, so large batches get row groups instead of vocabulary
// splits (with G > 1 and weight gradients, the backward runs a few tiles per step and sums the
// groups' fp32 weight-gradient tiles in a fixed order). Per-thread buffers are tile-sized. Logits
// are kept vocabulary-major (z^T [tile, rows]), which lets the backward's weight gradients
// (dz^T h, p^T dO) use the elementwise outputs without a transpose.
//   GEMM engines (`gemm=`): "bf16" uses at::native::cpublas::brgemm (oneDNN's ukernel) with bf16
//   operands and an fp32 destination, on CPUs with a native bf16 dot product (AVX512-BF16 or AMX);
//   operands it needs in VNNI layout (pairs of K rows interleaved) are packed per tile or once per
//   call (the hidden rows). Logits, dp = dO E^T, and every accumulation are fp32; the GEMM operands
//   p and dz are rounded to bf16, as in FlashAttention. "fp32" runs every GEMM in fp32 through ATen
//   (MKL): fp32 inputs as they are (any strides), bf16 / fp16 inputs upcast tile by tile (never a
//   full fp32 copy of W or E); it is what a CPU without native bf16 GEMMs gets (where torch's bf16
//   matmul is a scalar fallback), and what fp16 always gets.
// *Streaming* (small B: cached decoding embeds one soft token per sequence per step, so B is the
// number of sequences; and every B under batch_invariant=True). Each split walks its vocabulary
// rows in chunks of one vector width (16 / 8 / 4 rows): the chunk's W rows give the logits of every
// hidden row, and, still in L1, its E rows (the same memory when tied) are added into the
// accumulators, each accumulator piece held in a register across the whole chunk. fp32 arithmetic
// throughout (bf16 / fp16 widened on load), own vector exp / tanh. The loops are plain C++ on GCC
// vector types compiled three times (AVX512, AVX2+FMA, baseline x86-64) and chosen at run time
// from the CPU's features (`isa=` forces one; `capabilities()` reports which one runs).
//
// Masked vocabularies: the bias may hold -inf. Every online-softmax update uses a safe max (0 in
// place of a running max that is still -inf), so fully masked tiles and splits contribute nothing
// and a row with every entry masked yields NaN (0 / 0) and lse = -inf, exactly like torch.softmax of
// an all -inf row; its gradients are NaN too, like the reference's autograd.
//
// Batch invariance (`batch_invariant=True`): the streaming path for every B, with a split count
// fixed by V (not by the thread count or B) and per-row arithmetic that never mixes rows, so a row's
// output, lse and d_hidden are bit-for-bit the same alone or inside any batch, on any thread count
// (for a given ISA clone). Large invariant batches run in passes of rows whose partials fit the
// 64 MiB budget (stream_forward / stream_backward), which changes no row's bits. Without it, the
// tile path's results for a row may differ in the last bits with the batch it is in (GEMM
// blocking), and the streaming / tile threshold moves with B.
#include <torch/extension.h>

#include <ATen/Context.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <c10/core/InferenceMode.h>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

using at::Tensor;
constexpr float kInf = std::numeric_limits<float>::infinity();

// =============================================================================================
// 1. What the CPU can do.

enum Isa : int64_t { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr const char* kIsaNames[] = {"baseline", "avx2", "avx512"};
constexpr int64_t kIsaWidth[] = {4, 8, 16};  // fp32 lanes of a vector in each clone

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

enum Gemm : int64_t { kGemmFp32 = 0, kGemmBf16 = 1 };
constexpr const char* kGemmNames[] = {"fp32", "bf16"};

uint16_t bf16_bits(float x) {  // exact for the small integers the probe uses
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return static_cast<uint16_t>(u >> 16);
}

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

// =============================================================================================
// 2. Vectors of kW fp32 lanes (GCC vector extension): one register per vector in each ISA clone
// (kW = 16 for AVX512, 8 for AVX2, 4 for baseline SSE2). Everything here is inlined into the
// clone's entry points, so it is compiled for that clone's instruction set.

#define GI inline __attribute__((always_inline))

template <int kW>
struct VT {
  typedef float F __attribute__((vector_size(kW * 4)));
  typedef int32_t I __attribute__((vector_size(kW * 4)));
  typedef uint32_t U __attribute__((vector_size(kW * 4)));
  typedef uint16_t H __attribute__((vector_size(kW * 2)));
};

GI float widen(float x) { return x; }
GI float widen(at::Half x) { return static_cast<float>(x); }
GI float widen(at::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;  // bf16 is the top half of an fp32
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
GI T narrow_to(float x) {
  return static_cast<T>(x);  // c10 conversions: round to nearest even, NaN stays NaN
}

template <int kW>
GI typename VT<kW>::F vload(const float* p) {
  typename VT<kW>::F v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <int kW>
GI typename VT<kW>::F vload(const at::BFloat16* p) {
  typename VT<kW>::H h;
  std::memcpy(&h, p, sizeof h);
  const typename VT<kW>::U bits = __builtin_convertvector(h, typename VT<kW>::U) << 16;
  typename VT<kW>::F v;
  std::memcpy(&v, &bits, sizeof v);
  return v;
}
template <int kW>
GI typename VT<kW>::F vload(const at::Half* p) {
  typename VT<kW>::F v;
  for (int l = 0; l < kW; ++l) v[l] = static_cast<float>(p[l]);
  return v;
}
template <int kW>
GI void vstore(float* p, typename VT<kW>::F v) {
  std::memcpy(p, &v, sizeof v);
}
// fp32 -> bf16 bits, round to nearest even, NaN kept NaN.
template <int kW>
GI typename VT<kW>::H to_bf16_bits(typename VT<kW>::F v) {
  typedef typename VT<kW>::U U;
  U u;
  std::memcpy(&u, &v, sizeof u);
  U r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const U nan = (U)(v != v);
  r = (r & ~nan) | (nan & 0x7fc0u);
  return __builtin_convertvector(r, typename VT<kW>::H);
}
template <int kW>
GI void vstore(at::BFloat16* p, typename VT<kW>::F v) {
  const typename VT<kW>::H h = to_bf16_bits<kW>(v);
  std::memcpy(p, &h, sizeof h);
}
template <int kW>
GI void vstore(at::Half* p, typename VT<kW>::F v) {
  for (int l = 0; l < kW; ++l) p[l] = static_cast<at::Half>(v[l]);
}
// The first `count` lanes from p, the rest `fill`.
template <int kW>
GI typename VT<kW>::F vload_part(const float* p, int64_t count, float fill) {
  typename VT<kW>::F v = typename VT<kW>::F{} + fill;
  for (int64_t l = 0; l < count; ++l) v[l] = p[l];
  return v;
}
template <int kW>
GI void vstore_part(float* p, typename VT<kW>::F v, int64_t count) {
  for (int64_t l = 0; l < count; ++l) p[l] = v[l];
}

template <int kW>
GI typename VT<kW>::I lane_index() {
  typename VT<kW>::I v;
  for (int l = 0; l < kW; ++l) v[l] = l;
  return v;
}

template <int kW>
GI float hsum(typename VT<kW>::F v) {  // fixed order: lane 0 + lane 1 + ...
  float s = v[0];
  for (int l = 1; l < kW; ++l) s += v[l];
  return s;
}
template <int kW>
GI float hmax(typename VT<kW>::F v) {
  float m = v[0];
  for (int l = 1; l < kW; ++l) m = v[l] > m ? v[l] : m;
  return m;
}

// exp with ~1 ulp error (Cephes expf): range reduction by ln 2, degree-6 polynomial, 2^n from the
// exponent bits. exp(-inf) = 0 (anything below -87.3 flushes to 0), NaN stays NaN.
template <int kW>
GI typename VT<kW>::F vexp(typename VT<kW>::F x) {
  typedef typename VT<kW>::F F;
  typedef typename VT<kW>::I I;
  const F lo = F{} - 87.3365447504f, hi = F{} + 88.3762626647f;
  const I under = x < lo, over = x > hi, nan = x != x;
  F xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const F fx = xc * 1.44269504088896341f + 0.5f;
  I n = __builtin_convertvector(fx, I);
  n -= (__builtin_convertvector(n, F) > fx) & 1;  // floor
  const F nf = __builtin_convertvector(n, F);
  xc = xc - nf * 0.693359375f;
  xc = xc - nf * -2.12194440e-4f;
  F y = 1.9875691500e-4f * xc + 1.3981999507e-3f;
  y = y * xc + 8.3334519073e-3f;
  y = y * xc + 4.1665795894e-2f;
  y = y * xc + 1.6666665459e-1f;
  y = y * xc + 5.0000001201e-1f;
  y = y * (xc * xc) + xc + 1.0f;
  const I pow2 = (n + 127) << 23;
  F scale;
  std::memcpy(&scale, &pow2, sizeof scale);
  y = y * scale;
  y = under ? F{} : y;
  y = over ? F{} + kInf : y;
  return nan ? x : y;
}

// tanh with a few ulp error (Cephes tanhf): odd polynomial below 0.625, 1 - 2 / (exp(2|x|) + 1) above.
template <int kW>
GI typename VT<kW>::F vtanh(typename VT<kW>::F x) {
  typedef typename VT<kW>::F F;
  const F ax = x < 0.f ? -x : x;
  const F z = x * x;
  F small = -5.70498872745e-3f * z + 2.06390887954e-2f;
  small = small * z - 5.37397155531e-2f;
  small = small * z + 1.33314422036e-1f;
  small = small * z - 3.33332819422e-1f;
  small = small * z * x + x;
  F big = 1.0f - 2.0f / (vexp<kW>(ax + ax) + 1.0f);
  big = x < 0.f ? -big : big;
  return ax < 0.625f ? small : big;
}

// Transpose-reduce: out[i] = sum of the lanes of v[i] (v holds kW vectors; destroyed). log2(kW)
// levels of shuffle + add halve the vectors; a last shuffle puts item i in lane i.
template <int kW, int kS>
constexpr int pair_index(int lane) {  // lane of (a ++ b) feeding `lane` of the low half-sum
  const int p = lane / kS, q = lane % kS;
  return q < kS / 2 ? p * kS + q : kW + p * kS + (q - kS / 2);
}
template <int kW>
constexpr int reduced_item(int lane) {  // which input vector ends up in `lane`
  int items[kW][kW] = {};
  for (int k = 0; k < kW; ++k)
    for (int l = 0; l < kW; ++l) items[k][l] = k;
  for (int s = kW; s >= 2; s /= 2) {
    for (int k = 0; k < s / 2; ++k) {
      int merged[kW] = {};
      for (int l = 0; l < kW; ++l) merged[l] = (l % s) < s / 2 ? items[2 * k][(l / s) * s] : items[2 * k + 1][(l / s) * s];
      for (int l = 0; l < kW; ++l) items[k][l] = merged[l];
    }
  }
  return items[0][lane];
}
template <int kW>
constexpr int lane_of_item(int item) {
  for (int l = 0; l < kW; ++l)
    if (reduced_item<kW>(l) == item) return l;
  return 0;
}
template <int kW, int kS, int... L>
GI typename VT<kW>::F pair_sum(typename VT<kW>::F a, typename VT<kW>::F b, std::integer_sequence<int, L...>) {
  return __builtin_shufflevector(a, b, pair_index<kW, kS>(L)...) +
         __builtin_shufflevector(a, b, (pair_index<kW, kS>(L) + kS / 2)...);
}
template <int kW, int kS>
GI void reduce_level(typename VT<kW>::F* v) {
  for (int k = 0; k < kS / 2; ++k) v[k] = pair_sum<kW, kS>(v[2 * k], v[2 * k + 1], std::make_integer_sequence<int, kW>{});
  if constexpr (kS > 2) reduce_level<kW, kS / 2>(v);
}
template <int kW, int... L>
GI typename VT<kW>::F unpermute(typename VT<kW>::F v, std::integer_sequence<int, L...>) {
  return __builtin_shufflevector(v, v, lane_of_item<kW>(L)...);
}
template <int kW>
GI typename VT<kW>::F transpose_reduce(typename VT<kW>::F* v) {
  reduce_level<kW, kW>(v);
  return unpermute<kW>(v[0], std::make_integer_sequence<int, kW>{});
}

// In-register transpose of kW vectors: v[i][l] <-> v[l][i]. log2(kW) stages, each swapping the
// off-diagonal b x b blocks of row pairs (i, i | b).
template <int kW, int kB, int kSecond, int... L>
GI typename VT<kW>::F swap_blocks(typename VT<kW>::F x, typename VT<kW>::F y, std::integer_sequence<int, L...>) {
  return __builtin_shufflevector(
      x, y, (kSecond == 0 ? ((L & kB) == 0 ? L : kW + L - kB) : ((L & kB) == 0 ? L + kB : kW + L))...);
}
template <int kW, int kB>
GI void transpose_stage(typename VT<kW>::F* v) {
  for (int i = 0; i < kW; ++i) {
    if ((i & kB) == 0) {
      const typename VT<kW>::F x = v[i], y = v[i | kB];
      v[i] = swap_blocks<kW, kB, 0>(x, y, std::make_integer_sequence<int, kW>{});
      v[i | kB] = swap_blocks<kW, kB, 1>(x, y, std::make_integer_sequence<int, kW>{});
    }
  }
  if constexpr (kB > 1) transpose_stage<kW, kB / 2>(v);
}
template <int kW>
GI void transpose(typename VT<kW>::F* v) {
  transpose_stage<kW, kW / 2>(v);
}

// Stores lanes [0, count) of v as bf16 at p.
template <int kW>
GI void store_bf16(at::BFloat16* p, typename VT<kW>::F v, int64_t count) {
  const typename VT<kW>::H h = to_bf16_bits<kW>(v);
  if (count == kW) {
    std::memcpy(p, &h, sizeof h);
  } else {
    for (int64_t l = 0; l < count; ++l) p[l].x = h[l];
  }
}

// kW x kW block of fp32 values (block[k] = row k, lanes = columns) written transposed as bf16:
// out[l * ld + k] for columns l < cols and rows k < rows_out.
template <int kW>
GI void store_transposed_bf16(typename VT<kW>::F* block, at::BFloat16* out, int64_t ld, int64_t cols,
                              int64_t rows_out) {
  transpose<kW>(block);
  for (int64_t l = 0; l < cols; ++l) store_bf16<kW>(out + l * ld, block[l], rows_out);
}

// Final logits from raw dot products (+ bias, / temperature, softcap), in the reference's order.
// `cap_grad` (when given) receives dz / dz_pre = 1 - tanh^2 (1 without a softcap).
template <int kW>
GI typename VT<kW>::F finish_logits(typename VT<kW>::F z, typename VT<kW>::F bias, float temperature, float softcap,
                                    typename VT<kW>::F* cap_grad) {
  z = z + bias;
  if (temperature != 1.0f) z = z / temperature;  // (x / 1 == x: skipping it changes nothing)
  if (softcap > 0.f) {
    const typename VT<kW>::F t = vtanh<kW>(z / softcap);
    if (cap_grad) *cap_grad = 1.0f - t * t;
    return softcap * t;
  }
  if (cap_grad) *cap_grad = typename VT<kW>::F{} + 1.0f;
  return z;
}

// =============================================================================================
// 3. Streaming kernels.

constexpr int64_t kMaxW = 16;        // widest vector (AVX512): chunk of vocabulary rows
constexpr int64_t kStreamRows = 16;     // hidden rows per streaming group (stack state)
constexpr int64_t kMaxStreamRows = 64;  // largest stream_rows threshold

template <typename T>
struct StreamArgs {
  const T* w;  // [V, d], element strides w_s0, w_s1
  int64_t w_s0, w_s1;
  const T* e;  // [V, d_e] (the same memory as w when tied)
  int64_t e_s0, e_s1;
  const T* bias;  // [V] contiguous, or nullptr
  int64_t d, d_e;
  float temperature, softcap;  // softcap 0: none
  bool tied;
};

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
template <int kW, int kOdd, int... L>
GI typename VT<kW>::F deinterleave_(typename VT<kW>::F a, typename VT<kW>::F b, std::integer_sequence<int, L...>) {
  return __builtin_shufflevector(a, b, (2 * L + kOdd)...);
}
template <int kW, int kOdd>  // the even (kOdd = 0) or odd lanes of a ++ b
GI typename VT<kW>::F deinterleave(typename VT<kW>::F a, typename VT<kW>::F b) {
  return deinterleave_<kW, kOdd>(a, b, std::make_integer_sequence<int, kW>{});
}
template <int kW, int kHalf, int... L>
GI typename VT<kW>::F interleave_(typename VT<kW>::F e, typename VT<kW>::F o, std::integer_sequence<int, L...>) {
  return __builtin_shufflevector(e, o, (((kHalf * kW + L) % 2) * kW + (kHalf * kW + L) / 2)...);
}
template <int kW, int kHalf>  // half kHalf of e[0], o[0], e[1], o[1], ...
GI typename VT<kW>::F interleave(typename VT<kW>::F e, typename VT<kW>::F o) {
  return interleave_<kW, kHalf>(e, o, std::make_integer_sequence<int, kW>{});
}
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

template <typename T>
struct StreamForwardJob {
  StreamArgs<T> a;
  const float* h;  // [rows, d] fp32, contiguous (pair-split order for bf16, see split_pairs)
  int64_t rows;    // <= kStreamRows
  int64_t v_begin, v_end;
  float* m_out;    // [rows] running max, running sum after the range
  float* s_out;
  float* acc;      // [rows, ld_acc] unnormalized output (zero on entry)
  int64_t ld_acc;
  T* gather;       // kMaxW * (d + d_e) elements
};

// Online softmax over vocabulary rows [v_begin, v_end) for `rows` hidden rows.
template <int kW, typename T>
GI void stream_forward_impl(const StreamForwardJob<T>& job) {
  typedef typename VT<kW>::F F;
  const StreamArgs<T>& a = job.a;
  float run_m[kStreamRows], run_s[kStreamRows], scale[kStreamRows];
  alignas(64) float p[kStreamRows * kW];
  for (int64_t b = 0; b < job.rows; ++b) {
    run_m[b] = -kInf;
    run_s[b] = 0.f;
  }
  for (int64_t v0 = job.v_begin; v0 < job.v_end; v0 += kW) {
    const Chunk<kW, T> c(a, v0, job.v_end, job.gather);
    for (int64_t b = 0; b < job.rows; ++b) {
      F z = finish_logits<kW>(chunk_dots<kW>(c.wrows, job.h + b * a.d, a.d), c.bias, a.temperature, a.softcap,
                              nullptr);
      z = c.valid ? z : F{} - kInf;
      const float m_new = std::max(run_m[b], hmax<kW>(z));
      const float safe = m_new == -kInf ? 0.f : m_new;  // fully masked so far: exp(-inf - 0) = 0
      scale[b] = std::exp(run_m[b] - safe);
      const F pv = vexp<kW>(z - safe);
      run_s[b] = run_s[b] * scale[b] + hsum<kW>(pv);
      run_m[b] = m_new;
      vstore<kW>(p + b * kW, pv);
    }
    accumulate_rows<kW>(job.acc, job.ld_acc, job.rows, scale, p, c.erows, c.n, a.d_e);
  }
  for (int64_t b = 0; b < job.rows; ++b) {
    job.m_out[b] = run_m[b];
    job.s_out[b] = run_s[b];
  }
}

template <typename T>
struct StreamBackwardJob {
  StreamArgs<T> a;
  const float* h;      // [rows, d] fp32
  const float* g;      // [rows, d_e] fp32 (grad_out)
  const float* h_dot;  // h and g in chunk_dots order (pair-split for bf16; else h, g)
  const float* g_dot;
  const float* lse;    // [rows]
  const float* delta;  // [rows]
  int64_t rows;
  int64_t v_begin, v_end;
  float* dh;  // [rows, ld_dh] this split's fp32 partial of d hidden, or nullptr
  int64_t ld_dh;
  T* dw;  // [V, d] contiguous, or nullptr
  T* de;  // [V, d_e] contiguous, or nullptr (also when merged into dw)
  T* db;  // [V], or nullptr
  bool merge_tied;
  float grad_filter_eps;
  T* gather;    // kMaxW * (d + d_e) elements
  float* work;  // 2 * rows * kMaxW + rows floats
};

// Gradients from vocabulary rows [v_begin, v_end): p = exp(z - lse) and dp = <dO, E_v> recomputed
// per chunk (fp32, so no cancellation error in dz = p (dp - delta)); the rows of dW / dE / db are
// owned by this split, d hidden goes into the split's fp32 partial.
template <int kW, typename T>
GI void stream_backward_impl(const StreamBackwardJob<T>& job) {
  typedef typename VT<kW>::F F;
  const StreamArgs<T>& a = job.a;
  const bool need_dz = job.dh || job.dw || job.db;
  float* P = job.work;                      // [rows][kW]
  float* DZ = job.work + job.rows * kMaxW;  // [rows][kW]
  float* ones = DZ + job.rows * kMaxW;      // [rows]
  for (int64_t b = 0; b < job.rows; ++b) ones[b] = 1.f;
  for (int64_t v0 = job.v_begin; v0 < job.v_end; v0 += kW) {
    const Chunk<kW, T> c(a, v0, job.v_end, job.gather);
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
    if (job.dh) accumulate_rows<kW>(job.dh, job.ld_dh, job.rows, ones, DZ, c.wrows, c.n, a.d);
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
}

// =============================================================================================
// 4. Tile-path elementwise kernels (vocabulary-major tiles: row r = vocabulary row, column i = hidden
// row) and bf16 packing for the GEMM engine.

struct TileSoftmaxJob {
  float* z;  // [n, ldz]: raw logits in, fp32 probabilities p = exp(z - safe max) out (fp32 engine)
  int64_t n, m, ldz;
  const float* bias;  // [n] or nullptr
  float temperature, softcap;
  float* run_m;  // [m] running max and sum of these rows (updated)
  float* run_s;
  float* acc;  // [m, ld_acc] accumulator rows, rescaled here
  int64_t ld_acc, d_e;
  at::BFloat16* p16;  // bf16 engine: P [m, ldp] (row-major, transposed from z), pad columns zero
  int64_t ldp;
  float* work;  // 4 * m floats
};

template <int kW>
GI void tile_forward_softmax_impl(const TileSoftmaxJob& j) {
  typedef typename VT<kW>::F F;
  float* col_max = j.work;
  float* safe = j.work + j.m;
  float* col_sum = j.work + 2 * j.m;
  float* scale = j.work + 3 * j.m;
  for (int64_t i = 0; i < j.m; ++i) {
    col_max[i] = -kInf;
    col_sum[i] = 0.f;
  }
  for (int64_t r = 0; r < j.n; ++r) {
    float* row = j.z + r * j.ldz;
    const F b = F{} + (j.bias ? j.bias[r] : 0.f);
    for (int64_t i = 0; i < j.m; i += kW) {
      const int64_t c = std::min<int64_t>(kW, j.m - i);
      if (c == kW) {
        const F z = finish_logits<kW>(vload<kW>(row + i), b, j.temperature, j.softcap, nullptr);
        vstore<kW>(row + i, z);
        const F cm = vload<kW>(col_max + i);
        vstore<kW>(col_max + i, z > cm ? z : cm);
      } else {
        const F z = finish_logits<kW>(vload_part<kW>(row + i, c, 0.f), b, j.temperature, j.softcap, nullptr);
        vstore_part<kW>(row + i, z, c);
        const F cm = vload_part<kW>(col_max + i, c, -kInf);
        vstore_part<kW>(col_max + i, z > cm ? z : cm, c);
      }
    }
  }
  for (int64_t i = 0; i < j.m; ++i) {
    const float m_new = std::max(j.run_m[i], col_max[i]);
    safe[i] = m_new == -kInf ? 0.f : m_new;
    scale[i] = std::exp(j.run_m[i] - safe[i]);
    j.run_m[i] = m_new;
  }
  // p = exp(z - safe max) in blocks of kW vocabulary rows x kW hidden rows; the bf16 engine's P is
  // written transposed ([hidden row, vocabulary row]), with zeros in the pad columns up to ldp.
  for (int64_t r0 = 0; r0 < j.n; r0 += kW) {
    const int64_t nr = std::min<int64_t>(kW, j.n - r0);
    for (int64_t i = 0; i < j.m; i += kW) {
      const int64_t c = std::min<int64_t>(kW, j.m - i);
      const F sv = vload_part<kW>(safe + i, c, 0.f);
      F sum = vload_part<kW>(col_sum + i, c, 0.f);
      F block[kW];
      for (int64_t k = 0; k < kW; ++k) {
        if (k >= nr) {
          block[k] = F{};
          continue;
        }
        float* row = j.z + (r0 + k) * j.ldz + i;
        const F p = vexp<kW>((c == kW ? vload<kW>(row) : vload_part<kW>(row, c, -kInf)) - sv);
        sum += p;
        block[k] = p;
        if (!j.p16) {
          if (c == kW) {
            vstore<kW>(row, p);
          } else {
            vstore_part<kW>(row, p, c);
          }
        }
      }
      vstore_part<kW>(col_sum + i, sum, c);
      if (j.p16) store_transposed_bf16<kW>(block, j.p16 + i * j.ldp + r0, j.ldp, c, std::min<int64_t>(kW, j.ldp - r0));
    }
  }
  for (int64_t i = 0; i < j.m; ++i) {
    j.run_s[i] = j.run_s[i] * scale[i] + col_sum[i];
    float* acc = j.acc + i * j.ld_acc;
    const F sv = F{} + scale[i];
    int64_t k = 0;
    for (; k + kW <= j.d_e; k += kW) vstore<kW>(acc + k, vload<kW>(acc + k) * sv);
    for (; k < j.d_e; ++k) acc[k] *= scale[i];
  }
}

struct TileGradJob {
  const float* zd;  // [n, ldz]: raw logits in columns [0, m), raw dp = <dO, E_v> in [m, 2m)
  int64_t n, m, ldz;
  const float* bias;
  float temperature, softcap;
  const float* lse;    // [m]
  const float* delta;  // [m]
  bool need_dz;
  // Outputs, per vocabulary row r: d raw logit in columns [0, m) and p in [p_col, p_col + m) of
  // pd32 (fp32 engine) or pd16 (bf16 engine; columns m..p_col and beyond p_col + m up to 2 * p_col zero),
  // or neither (both nullptr: the bf16 engine without weight gradients).
  float* pd32;
  at::BFloat16* pd16;
  int64_t ldpd, p_col;
  at::BFloat16* dz16;  // bf16 engine: d raw logits transposed [m, ld_dz16] (pad columns zero), or nullptr
  int64_t ld_dz16;
  float* db;  // [n]: row sums of the d raw logits (written), or nullptr
  float* p_max;  // out: largest p of the block (NaN if any is NaN)
};

template <int kW>
GI void tile_backward_elementwise_impl(const TileGradJob& j) {
  typedef typename VT<kW>::F F;
  F p_max = F{};
  for (int64_t r0 = 0; r0 < j.n; r0 += kW) {
    const int64_t nr = std::min<int64_t>(kW, j.n - r0);
    F db[kW];
    for (int k = 0; k < kW; ++k) db[k] = F{};
    for (int64_t i = 0; i < j.m; i += kW) {
      const int64_t c = std::min<int64_t>(kW, j.m - i);
      // Lanes past c: lse +inf makes p = 0 there.
      const F lse = vload_part<kW>(j.lse + i, c, kInf), delta = vload_part<kW>(j.delta + i, c, 0.f);
      F dz_block[kW];
      for (int64_t k = 0; k < kW; ++k) {
        dz_block[k] = F{};
        if (k >= nr) continue;
        const int64_t r = r0 + k;
        const float* zrow = j.zd + r * j.ldz;
        F cap_grad;
        const F z = finish_logits<kW>(vload_part<kW>(zrow + i, c, 0.f), F{} + (j.bias ? j.bias[r] : 0.f),
                                      j.temperature, j.softcap, &cap_grad);
        const F p = vexp<kW>(z - lse);
        p_max = (p > p_max) | (p != p) ? p : p_max;
        F dz = F{};
        if (j.need_dz) {
          dz = p * (vload_part<kW>(zrow + j.m + i, c, 0.f) - delta) * cap_grad;
          if (j.temperature != 1.0f) dz = dz / j.temperature;  // d raw logit
          db[k] += dz;
        }
        dz_block[k] = dz;
        if (j.pd32) {
          vstore_part<kW>(j.pd32 + r * j.ldpd + i, dz, c);
          vstore_part<kW>(j.pd32 + r * j.ldpd + j.p_col + i, p, c);
        } else if (j.pd16) {
          store_bf16<kW>(j.pd16 + r * j.ldpd + i, dz, c);
          store_bf16<kW>(j.pd16 + r * j.ldpd + j.p_col + i, p, c);
        }
      }
      if (j.dz16) {
        store_transposed_bf16<kW>(dz_block, j.dz16 + i * j.ld_dz16 + r0, j.ld_dz16, c,
                                  std::min<int64_t>(kW, j.ld_dz16 - r0));
      }
    }
    for (int64_t k = 0; k < nr; ++k) {
      if (j.db) j.db[r0 + k] = hsum<kW>(db[k]);
      if (j.pd16) {
        at::BFloat16* out = j.pd16 + (r0 + k) * j.ldpd;
        for (int64_t i = j.m; i < j.p_col; ++i) out[i].x = out[j.p_col + i].x = 0;
      }
    }
  }
  *j.p_max = hmax<kW>(p_max);
  for (int l = 0; l < kW; ++l) {
    if (p_max[l] != p_max[l]) *j.p_max = p_max[l];
  }
}

// VNNI pairs for the bf16 engine's B operand: dst [ceil(rows / 2), cols, 2] with
// dst[q, c, t] = src[2q + t, c] (a zero row pads an odd count). src element (r, c) at r * s0 + c * s1.
template <int kW>
GI void pack_pairs_impl(const at::BFloat16* src, int64_t s0, int64_t s1, int64_t rows, int64_t cols,
                        at::BFloat16* dst) {
  typedef typename VT<kW>::U U;
  const uint16_t* base = reinterpret_cast<const uint16_t*>(src);
  uint32_t* out = reinterpret_cast<uint32_t*>(dst);
  for (int64_t q = 0; q < (rows + 1) / 2; ++q) {
    const uint16_t* r0 = base + 2 * q * s0;
    const uint16_t* r1 = 2 * q + 1 < rows ? base + (2 * q + 1) * s0 : nullptr;
    uint32_t* o = out + q * cols;
    if (s1 == 1) {
      // 2 kW columns at a time: each 32-bit word of a row holds two neighbouring columns, so the
      // output words of the even / odd columns are bit blends of the two rows' words, then
      // interleaved back into column order. Pure vector ops, no lane conversion.
      typedef typename VT<kW>::F F;
      int64_t c = 0;
      for (; c + 2 * kW <= cols; c += 2 * kW) {
        U w0, w1;
        std::memcpy(&w0, r0 + c, sizeof w0);
        if (r1) {
          std::memcpy(&w1, r1 + c, sizeof w1);
        } else {
          w1 = U{};
        }
        const U even = (w0 & 0xffffu) | (w1 << 16), odd = (w0 >> 16) | (w1 & 0xffff0000u);
        F fe, fo;
        std::memcpy(&fe, &even, sizeof fe);
        std::memcpy(&fo, &odd, sizeof fo);
        const F lo = interleave<kW, 0>(fe, fo), hi = interleave<kW, 1>(fe, fo);
        std::memcpy(o + c, &lo, sizeof lo);
        std::memcpy(o + c + kW, &hi, sizeof hi);
      }
      for (; c < cols; ++c) o[c] = r0[c] | (static_cast<uint32_t>(r1 ? r1[c] : 0) << 16);
    } else {
      for (int64_t c = 0; c < cols; ++c) {
        o[c] = r0[c * s1] | (static_cast<uint32_t>(r1 ? r1[c * s1] : 0) << 16);
      }
    }
  }
}

// =============================================================================================
// 5. One set of entry points per instruction set, chosen at run time.

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

struct Kernels {
  void (*stream)(at::ScalarType, bool backward, const void* job);
  void (*tile_forward_softmax)(const TileSoftmaxJob&);
  void (*tile_backward_elementwise)(const TileGradJob&);
  void (*pack_pairs)(const at::BFloat16*, int64_t, int64_t, int64_t, int64_t, at::BFloat16*);
};

#define GIRCSE_KERNELS(SUFFIX, ATTR, KW)                                                                     \
  ATTR void stream_##SUFFIX(at::ScalarType dt, bool backward, const void* job) {                              \
    stream_any<KW>(dt, backward, job);                                                                         \
  }                                                                                                            \
  ATTR void tile_forward_softmax_##SUFFIX(const TileSoftmaxJob& j) { tile_forward_softmax_impl<KW>(j); }       \
  ATTR void tile_backward_elementwise_##SUFFIX(const TileGradJob& j) { tile_backward_elementwise_impl<KW>(j); } \
  ATTR void pack_pairs_##SUFFIX(const at::BFloat16* s, int64_t s0, int64_t s1, int64_t r, int64_t c,          \
                                at::BFloat16* d) {                                                             \
    pack_pairs_impl<KW>(s, s0, s1, r, c, d);                                                                   \
  }                                                                                                            \
  const Kernels kKernels_##SUFFIX = {stream_##SUFFIX, tile_forward_softmax_##SUFFIX,                            \
                                     tile_backward_elementwise_##SUFFIX, pack_pairs_##SUFFIX};

GIRCSE_KERNELS(baseline, , 4)
#if defined(__x86_64__) && defined(__GNUC__)
GIRCSE_KERNELS(avx2, __attribute__((target("arch=x86-64-v3"))), 8)
GIRCSE_KERNELS(avx512, __attribute__((target("arch=x86-64-v4"))), 16)
#endif

const Kernels& kernels_for(int64_t isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  if (isa == kAvx512) return kKernels_avx512;
  if (isa == kAvx2) return kKernels_avx2;
#endif
  return kKernels_baseline;
}

// =============================================================================================
// 6. Host side: configuration, the two paths, merging.

struct Params {
  double temperature;
  std::optional<double> softcap;
};

int64_t round_up(int64_t x, int64_t k) { return (x + k - 1) / k * k; }
int64_t ceil_div(int64_t x, int64_t k) { return (x + k - 1) / k; }
int64_t threads() { return std::max<int64_t>(1, at::get_num_threads()); }

// Per-split partial accumulators (S x B x width floats) never exceed this, whatever the thread count
// or B: the tile path spreads rows over row groups, the streaming path runs the rows in passes (except
// a backward with weight gradients). `partial_budget` overrides it, e.g. for tests of either schedule.
constexpr int64_t kPartialBudget = 64ll << 20;
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

// The streaming path's split count: one vocabulary range per thread (each at least 64 rows), or,
// for batch invariance, a count fixed by V alone.
int64_t stream_split_count(int64_t vocab, bool invariant) {
  if (invariant) return std::clamp<int64_t>(vocab / 8192, 1, 8);
  return std::max<int64_t>(1, std::min(threads(), vocab / 64));
}

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

struct TileConfig {
  int64_t tile_v, row_block, tiles, splits, groups;
};

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

template <typename T>
StreamArgs<T> stream_args(const Tensor& weight, const Tensor& embed, const std::optional<Tensor>& bias,
                          const Params& prm, bool tied) {
  return {weight.data_ptr<T>(), weight.stride(0), weight.stride(1), embed.data_ptr<T>(), embed.stride(0),
          embed.stride(1), bias ? bias->data_ptr<T>() : nullptr, weight.size(1), embed.size(1),
          static_cast<float>(prm.temperature), prm.softcap ? static_cast<float>(*prm.softcap) : 0.f, tied};
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

// ---- Streaming path

// x [rows, len] as fp32 in the order chunk_dots expects against vocabulary rows of `dtype`:
// pair-split (split_pairs) for bf16 rows.
Tensor dot_operand(const Tensor& x, at::ScalarType dtype, int64_t isa) {
  Tensor x32 = x.to(at::kFloat).contiguous();
  if (dtype != at::kBFloat16) return x32;
  Tensor out = at::empty_like(x32);
  split_pairs(x32.data_ptr<float>(), x32.size(0), x32.size(1), kIsaWidth[isa], out.data_ptr<float>());
  return out;
}

std::tuple<Tensor, Tensor> stream_forward_rows(const Tensor& hidden, const Tensor& weight, const Tensor& embed,
                                               const std::optional<Tensor>& bias, const Params& prm, bool tied,
                                               bool invariant, int64_t isa) {
  const Kernels& k = kernels_for(isa);
  const int64_t rows = hidden.size(0), vocab = weight.size(0), d = weight.size(1), d_e = embed.size(1);
  const int64_t S = stream_split_count(vocab, invariant), G = ceil_div(rows, kStreamRows);
  const int64_t ld = S == 1 ? d_e : round_up(d_e, 16);  // split partials on separate cache lines
  const auto f32 = hidden.options().dtype(at::kFloat);
  Tensor acc = at::zeros({S, rows, ld}, f32);
  Tensor run_m = at::empty({S, rows}, f32), run_s = at::empty({S, rows}, f32);
  const Tensor h32 = dot_operand(hidden, hidden.scalar_type(), isa);
  const bool gather = weight.stride(1) != 1 || embed.stride(1) != 1;
  Tensor scratch = at::empty({gather ? threads() : 0, kMaxW * (d + d_e)}, weight.options());
  dispatch_dtype(hidden.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const StreamArgs<T> args = stream_args<T>(weight, embed, bias, prm, tied);
    parallel_items(S * G, [&](int64_t item) {
      const int64_t s = item / G, g = item % G;
      const int64_t r0 = g * kStreamRows, n_rows = std::min(kStreamRows, rows - r0);
      StreamForwardJob<T> job{args, h32.data_ptr<float>() + r0 * d, n_rows, vocab * s / S, vocab * (s + 1) / S,
                              run_m.data_ptr<float>() + s * rows + r0, run_s.data_ptr<float>() + s * rows + r0,
                              acc.data_ptr<float>() + (s * rows + r0) * ld, ld,
                              gather ? scratch[at::get_thread_num()].template data_ptr<T>() : nullptr};
      k.stream(hidden.scalar_type(), false, &job);
    });
  });
  return merge_splits(acc, run_m, run_s, d_e);
}

void stream_backward_rows(const Tensor& grad_out, const Tensor& hidden, const Tensor& weight, const Tensor& embed,
                          const std::optional<Tensor>& bias, const Tensor& lse, const Tensor& delta, const Params& prm,
                          bool tied, bool merge_tied, double grad_filter_eps, bool invariant, int64_t isa,
                          std::optional<Tensor>& d_hidden, std::optional<Tensor>& d_weight,
                          std::optional<Tensor>& d_embed, std::optional<Tensor>& d_bias) {
  const int64_t rows = hidden.size(0), vocab = weight.size(0), d = weight.size(1), d_e = embed.size(1);
  const int64_t S = stream_split_count(vocab, invariant);
  const int64_t ld = S == 1 ? d : round_up(d, 16);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const Kernels& k = kernels_for(isa);
  const Tensor h32 = hidden.to(at::kFloat).contiguous(), g32 = grad_out.to(at::kFloat).contiguous();
  const Tensor h_dot = dot_operand(h32, hidden.scalar_type(), isa), g_dot = dot_operand(g32, hidden.scalar_type(), isa);
  Tensor dh_part = d_hidden ? at::zeros({S, rows, ld}, f32) : Tensor();
  const bool gather = weight.stride(1) != 1 || embed.stride(1) != 1;
  const int64_t t = threads();
  Tensor scratch = at::empty({gather ? t : 0, kMaxW * (d + d_e)}, weight.options());
  Tensor work = at::empty({t, (2 * kMaxW + 1) * rows}, f32);
  dispatch_dtype(hidden.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const StreamArgs<T> args = stream_args<T>(weight, embed, bias, prm, tied);
    parallel_items(S, [&](int64_t s) {
      const int64_t tid = at::get_thread_num();
      StreamBackwardJob<T> job{args, h32.data_ptr<float>(), g32.data_ptr<float>(), h_dot.data_ptr<float>(),
                               g_dot.data_ptr<float>(), lse.data_ptr<float>(),
                               delta.data_ptr<float>(), rows, vocab * s / S, vocab * (s + 1) / S,
                               d_hidden ? dh_part.data_ptr<float>() + s * rows * ld : nullptr, ld,
                               d_weight ? d_weight->template data_ptr<T>() : nullptr,
                               d_embed ? d_embed->template data_ptr<T>() : nullptr,
                               d_bias ? d_bias->template data_ptr<T>() : nullptr, merge_tied,
                               static_cast<float>(grad_filter_eps),
                               gather ? scratch[tid].template data_ptr<T>() : nullptr,
                               work[tid].data_ptr<float>()};
      k.stream(hidden.scalar_type(), true, &job);
    });
  });
  if (d_hidden) d_hidden = sum_partials(dh_part, d, hidden.scalar_type());
}

// Rows per streaming pass: the S per-split partials of a row (S x ld floats, plus its running max and
// sum) of every row in flight stay under `budget` bytes, in whole kStreamRows groups. Only batch-
// invariant calls stream large batches (S up to 8 there); each row's arithmetic is the same in any
// pass, so running the rows in several passes changes no bit of the result.
int64_t stream_pass_rows(int64_t rows, int64_t splits, int64_t width, int64_t budget) {
  const int64_t per_row = splits * (round_up(width, 16) + 2) * static_cast<int64_t>(sizeof(float));
  return std::min(rows, std::max<int64_t>(kStreamRows, budget / per_row / kStreamRows * kStreamRows));
}

std::tuple<Tensor, Tensor> stream_forward(const Tensor& hidden, const Tensor& weight, const Tensor& embed,
                                          const std::optional<Tensor>& bias, const Params& prm, bool tied,
                                          bool invariant, int64_t isa, int64_t budget) {
  const int64_t rows = hidden.size(0);
  const int64_t step = stream_pass_rows(rows, stream_split_count(weight.size(0), invariant), embed.size(1), budget);
  if (step >= rows) return stream_forward_rows(hidden, weight, embed, bias, prm, tied, invariant, isa);
  Tensor out = at::empty({rows, embed.size(1)}, hidden.options().dtype(at::kFloat));
  Tensor lse = at::empty({rows}, out.options());
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t n = std::min(step, rows - r0);
    auto [o, l] = stream_forward_rows(hidden.narrow(0, r0, n), weight, embed, bias, prm, tied, invariant, isa);
    out.narrow(0, r0, n).copy_(o);
    lse.narrow(0, r0, n).copy_(l);
  }
  return {out, lse};
}

// With weight gradients every row feeds every dW / dE row, so the rows run in one pass (the partials,
// S x B x d floats, are then no larger than dW itself while S x B <= V); d_hidden alone is per row.
void stream_backward(const Tensor& grad_out, const Tensor& hidden, const Tensor& weight, const Tensor& embed,
                     const std::optional<Tensor>& bias, const Tensor& lse, const Tensor& delta, const Params& prm,
                     bool tied, bool merge_tied, double grad_filter_eps, bool invariant, int64_t isa, int64_t budget,
                     std::optional<Tensor>& d_hidden, std::optional<Tensor>& d_weight,
                     std::optional<Tensor>& d_embed, std::optional<Tensor>& d_bias) {
  const int64_t rows = hidden.size(0);
  const int64_t step = stream_pass_rows(rows, stream_split_count(weight.size(0), invariant), hidden.size(1), budget);
  if (step >= rows || d_weight || d_embed || d_bias || !d_hidden) {
    stream_backward_rows(grad_out, hidden, weight, embed, bias, lse, delta, prm, tied, merge_tied, grad_filter_eps,
                         invariant, isa, d_hidden, d_weight, d_embed, d_bias);
    return;
  }
  Tensor dh = at::empty({rows, hidden.size(1)}, hidden.options());
  std::optional<Tensor> none;
  for (int64_t r0 = 0; r0 < rows; r0 += step) {
    const int64_t n = std::min(step, rows - r0);
    std::optional<Tensor> part = Tensor();
    stream_backward_rows(grad_out.narrow(0, r0, n), hidden.narrow(0, r0, n), weight, embed, bias,
                         lse.narrow(0, r0, n), delta.narrow(0, r0, n), prm, tied, merge_tied, grad_filter_eps,
                         invariant, isa, part, none, none, none);
    dh.narrow(0, r0, n).copy_(*part);
  }
  d_hidden = dh;
}

// ---- Tile path

// Per-thread buffers of the tile path: one [threads, numel] allocation per kind (none when unused).
struct ThreadBuffer {
  Tensor all;
  ThreadBuffer(int64_t threads_, int64_t numel, at::TensorOptions opt)
      : all(at::empty({numel > 0 ? threads_ : 0, std::max<int64_t>(numel, 1)}, opt)) {}
  template <typename T>
  T* get(int64_t tid) const {  // nullptr when unused
    return all.size(0) == 0 ? nullptr : all.data_ptr<T>() + tid * all.size(1);
  }
};

// The hidden rows of one row block in the bf16 engine's B layout for z^T = W h^T: [d / 2, m, 2]
// (dst[q, i, t] = a[i, 2q + t]); with `b` (dO rows) defined, its rows follow as columns m..2m.
void pack_rows_transposed(const Tensor& a, const Tensor& b, at::BFloat16* dst) {
  const int64_t m = a.size(0), cols = b.defined() ? 2 * m : m, pairs = a.size(1) / 2;
  for (int half = 0; half < (b.defined() ? 2 : 1); ++half) {
    const Tensor& src = half == 0 ? a : b;
    const at::BFloat16* in = src.data_ptr<at::BFloat16>();
    const int64_t ld = src.stride(0);
    for (int64_t i = 0; i < m; ++i) {
      const at::BFloat16* row = in + i * ld;
      at::BFloat16* out = dst + 2 * (half * m + i);
      for (int64_t q = 0; q < pairs; ++q) {
        out[q * 2 * cols] = row[2 * q];
        out[q * 2 * cols + 1] = row[2 * q + 1];
      }
    }
  }
}

// A view (or, for the bf16 engine with a non-unit last stride, a contiguous copy in `buf`) of
// vocabulary rows [v0, v0 + n) of `w` whose rows the GEMM reads with unit stride.
const at::BFloat16* unit_rows(const Tensor& w, int64_t v0, int64_t n, at::BFloat16* buf, int64_t* ld) {
  if (w.stride(1) == 1) {
    *ld = w.stride(0);
    return w.data_ptr<at::BFloat16>() + v0 * w.stride(0);
  }
  *ld = w.size(1);
  at::from_blob(buf, {n, w.size(1)}, w.options()).copy_(w.narrow(0, v0, n));
  return buf;
}

// Vocabulary rows [v0, v0 + n) of a bf16 matrix (any strides) as the bf16 engine's B operand with
// K = those rows: VNNI pairs [ceil(n / 2), cols, 2].
void pack_tile(const Kernels& k, const Tensor& w, int64_t v0, int64_t n, at::BFloat16* dst) {
  k.pack_pairs(w.data_ptr<at::BFloat16>() + v0 * w.stride(0), w.stride(0), w.stride(1), n, w.size(1), dst);
}

// fp32 operand for the fp32 engine: the view itself for fp32 inputs, else an upcast copy in `buf`.
Tensor fp32_rows(const Tensor& w, int64_t v0, int64_t n, float* buf) {
  const Tensor view = w.narrow(0, v0, n);
  if (w.scalar_type() == at::kFloat) return view;
  Tensor out = at::from_blob(buf, {n, w.size(1)}, w.options().dtype(at::kFloat));
  out.copy_(view);
  return out;
}

float* bias_tile(const std::optional<Tensor>& bias, int64_t v0, int64_t n, float* buf) {
  if (!bias) return nullptr;
  if (bias->scalar_type() == at::kFloat) return bias->data_ptr<float>() + v0;
  at::from_blob(buf, {n}, bias->options().dtype(at::kFloat)).copy_(bias->narrow(0, v0, n));
  return buf;
}

std::tuple<Tensor, Tensor> tile_forward(const Tensor& hidden, const Tensor& weight, const Tensor& embed,
                                        const std::optional<Tensor>& bias, const Params& prm, bool tied,
                                        int64_t engine, const TileConfig& c, const Kernels& k) {
  const int64_t rows = hidden.size(0), vocab = weight.size(0), d = weight.size(1), d_e = embed.size(1);
  const bool bf16 = engine == kGemmBf16, upcast = !bf16 && hidden.scalar_type() != at::kFloat;
  const int64_t S = c.splits, G = c.groups, t = threads(), tv = c.tile_v, rb = c.row_block;
  const int64_t tv_pad = round_up(tv, 2);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const int64_t ld = S == 1 ? d_e : round_up(d_e, 16);
  Tensor acc = at::zeros({S, rows, ld}, f32);
  Tensor run_m = at::full({S, rows}, -kInf, f32), run_s = at::zeros({S, rows}, f32);
  // The hidden rows as the logits GEMM's right operand, once per call.
  const Tensor h32 = bf16 ? Tensor() : hidden.to(at::kFloat);
  Tensor hT = bf16 ? at::empty({rows * d}, hidden.options()) : Tensor();
  if (bf16) {
    for (int64_t r0 = 0; r0 < rows; r0 += rb) {
      const int64_t m = std::min(rb, rows - r0);
      pack_rows_transposed(hidden.narrow(0, r0, m), Tensor(), hT.data_ptr<at::BFloat16>() + r0 * d);
    }
  }
  const auto f16 = hidden.options();
  const ThreadBuffer z_buf(t, tv * rb, f32), work_buf(t, 4 * rb, f32), bias_buf(t, tv, f32);
  const ThreadBuffer w32_buf(t, upcast ? tv * d : 0, f32), e32_buf(t, upcast && !tied ? tv * d_e : 0, f32);
  const ThreadBuffer epack_buf(t, bf16 ? tv_pad * d_e : 0, f16), p16_buf(t, bf16 ? rb * tv_pad : 0, f16);
  const ThreadBuffer wrow_buf(t, bf16 && weight.stride(1) != 1 ? tv * d : 0, f16);

  parallel_items(S * G, [&](int64_t item) {
    const int64_t s = item / G, g = item % G, tid = at::get_thread_num();
    const auto [first, last] = split_tiles(c, s);
    const auto [g0, g1] = group_rows(c, rows, g);
    float* z = z_buf.get<float>(tid);
    for (int64_t tile = first; tile < last; ++tile) {
      const int64_t v0 = tile * tv, n = std::min(tv, vocab - v0), n_pad = round_up(n, 2);
      const float* b_tile = bias_tile(bias, v0, n, bias_buf.get<float>(tid));
      Tensor w32, e32;
      const at::BFloat16* w_rows = nullptr;
      int64_t ldw = 0;
      at::BFloat16* epack = nullptr;
      if (bf16) {
        w_rows = unit_rows(weight, v0, n, wrow_buf.get<at::BFloat16>(tid), &ldw);
        epack = epack_buf.get<at::BFloat16>(tid);
        pack_tile(k, embed, v0, n, epack);
      } else {
        w32 = fp32_rows(weight, v0, n, w32_buf.get<float>(tid));
        e32 = tied ? w32 : fp32_rows(embed, v0, n, e32_buf.get<float>(tid));
      }
      for (int64_t r0 = g0; r0 < g1; r0 += rb) {
        const int64_t m = std::min(rb, g1 - r0);
        float* acc_rows = acc.data_ptr<float>() + (s * rows + r0) * ld;
        Tensor zt = at::from_blob(z, {n, m}, f32);
        if (bf16) {
          brgemm(n, m, d, w_rows, ldw, hT.data_ptr<at::BFloat16>() + r0 * d, m, z, m, false);
        } else {
          at::mm_out(zt, w32, h32.narrow(0, r0, m).t());
        }
        at::BFloat16* p16 = bf16 ? p16_buf.get<at::BFloat16>(tid) : nullptr;
        TileSoftmaxJob job{z, n, m, m, b_tile, static_cast<float>(prm.temperature),
                           prm.softcap ? static_cast<float>(*prm.softcap) : 0.f,
                           run_m.data_ptr<float>() + s * rows + r0, run_s.data_ptr<float>() + s * rows + r0,
                           acc_rows, ld, d_e, p16, n_pad, work_buf.get<float>(tid)};
        k.tile_forward_softmax(job);
        if (bf16) {
          brgemm(m, d_e, n_pad, p16, n_pad, epack, d_e, acc_rows, ld, true);
        } else {
          Tensor acc_view = at::from_blob(acc_rows, {m, d_e}, {ld, 1}, f32);
          acc_view.addmm_(zt.t(), e32);
        }
      }
    }
    if (bf16) at::native::cpublas::brgemm_release(true);
  });
  return merge_splits(acc, run_m, run_s, d_e);
}

void tile_backward(const Tensor& grad_out, const Tensor& hidden, const Tensor& weight, const Tensor& embed,
                   const std::optional<Tensor>& bias, const Tensor& lse, const Tensor& delta, const Params& prm,
                   bool tied, bool merge_tied, double grad_filter_eps, int64_t engine, const TileConfig& c,
                   const Kernels& k, std::optional<Tensor>& d_hidden, std::optional<Tensor>& d_weight,
                   std::optional<Tensor>& d_embed, std::optional<Tensor>& d_bias) {
  const int64_t rows = hidden.size(0), vocab = weight.size(0), d = weight.size(1), d_e = embed.size(1);
  const bool bf16 = engine == kGemmBf16, upcast = !bf16 && hidden.scalar_type() != at::kFloat;
  const int64_t S = c.splits, G = c.groups, t = threads(), tv = c.tile_v, rb = c.row_block;
  const int64_t tv_pad = round_up(tv, 2), rb_pad = round_up(rb, 2);
  const auto f32 = hidden.options().dtype(at::kFloat);
  const bool need_hidden = d_hidden.has_value(), need_weight = d_weight.has_value(),
             need_embed = d_embed.has_value() || merge_tied, need_bias = d_bias.has_value();
  const bool need_dz = need_hidden || need_weight || need_bias;
  // Tied weights: hidden rows and dO rows stacked, so one GEMM over a W tile gives logits and dp.
  const bool stacked = tied && need_dz;
  const int64_t ld_dh = S == 1 ? d : round_up(d, 16);
  Tensor dh = need_hidden ? at::zeros({S, rows, ld_dh}, f32) : Tensor();

  // Per-call operands of the row blocks (small: O(B x d)).
  const int64_t blocks = ceil_div(rows, rb);
  std::vector<Tensor> logits_rhs(blocks), dp_rhs(blocks), dw_rhs(blocks), de_rhs(blocks);
  for (int64_t bi = 0; bi < blocks; ++bi) {
    const int64_t r0 = bi * rb, m = std::min(rb, rows - r0), m_pad = round_up(m, 2);
    const Tensor h = hidden.narrow(0, r0, m), g = grad_out.narrow(0, r0, m);
    if (bf16) {
      logits_rhs[bi] = at::empty({(stacked ? 2 : 1) * m * d}, hidden.options());
      pack_rows_transposed(h, stacked ? g : Tensor(), logits_rhs[bi].data_ptr<at::BFloat16>());
      if (need_dz && !stacked) {
        dp_rhs[bi] = at::empty({m * d_e}, hidden.options());
        pack_rows_transposed(g, Tensor(), dp_rhs[bi].data_ptr<at::BFloat16>());
      }
      if (need_weight) {  // K = the block's rows ([h; dO] for the merged tied gradient)
        Tensor src = merge_tied ? at::zeros({2 * m_pad, d}, hidden.options()) : h;
        if (merge_tied) {
          src.narrow(0, 0, m).copy_(h);
          src.narrow(0, m_pad, m).copy_(g);
        }
        dw_rhs[bi] = at::empty({src.size(0) + 1, d}, hidden.options());
        k.pack_pairs(src.data_ptr<at::BFloat16>(), src.stride(0), 1, src.size(0), d,
                     dw_rhs[bi].data_ptr<at::BFloat16>());
      }
      if (need_embed && !merge_tied) {
        de_rhs[bi] = at::empty({m + 1, d_e}, hidden.options());
        k.pack_pairs(g.data_ptr<at::BFloat16>(), g.stride(0), 1, m, d_e, de_rhs[bi].data_ptr<at::BFloat16>());
      }
    } else {
      const Tensor h32 = h.to(at::kFloat), g32 = g.to(at::kFloat);
      logits_rhs[bi] = stacked || merge_tied ? at::cat({h32, g32}, 0) : h32;  // [m or 2m, d]
      dp_rhs[bi] = g32;
    }
  }

  const auto f16 = hidden.options();
  const int64_t zcols = need_dz ? 2 * rb : rb;
  const ThreadBuffer zd_buf(t, tv * zcols, f32), bias_buf(t, tv, f32), db_buf(t, tv, f32);
  // [dz | p] per vocabulary row, for the weight gradients (and, fp32 engine, dz for dh); the bf16
  // engine's dh GEMM reads dz16 instead, so a d_hidden-only call writes no pd16.
  const bool weight_grads = need_weight || need_embed || need_bias;
  const ThreadBuffer pd32_buf(t, bf16 ? 0 : tv * 2 * rb, f32),
      pd16_buf(t, bf16 && weight_grads ? tv * 2 * rb_pad : 0, f16);
  const ThreadBuffer dz16_buf(t, bf16 && need_hidden ? rb * tv_pad : 0, f16);
  const ThreadBuffer wpack_buf(t, bf16 && need_hidden ? tv_pad * d : 0, f16);
  const ThreadBuffer wrow_buf(t, bf16 && weight.stride(1) != 1 ? tv * d : 0, f16);
  const ThreadBuffer erow_buf(t, bf16 && !tied && embed.stride(1) != 1 ? tv * d_e : 0, f16);
  const ThreadBuffer w32_buf(t, upcast ? tv * d : 0, f32), e32_buf(t, upcast && !tied ? tv * d_e : 0, f32);
  // fp32 weight-gradient accumulators of the tiles items work on: one tile per thread when each tile
  // belongs to one item (G == 1); with row groups (G > 1) every item keeps `per_step` tiles, which
  // the groups of a split then sum in group order (a barrier per step, so steps are made long).
  const int64_t acc_width = (need_weight ? d : 0) + (need_embed && !merge_tied ? d_e : 0) + (need_bias ? 1 : 0);
  const int64_t per_step =
      G > 1 && weight_grads
          ? std::clamp<int64_t>(kPartialBudget / (S * G * tv * acc_width * 4), 1, ceil_div(c.tiles, S))
          : 1;
  const int64_t acc_slots = (G > 1 ? S * G : t) * per_step;
  Tensor dw_acc = need_weight ? at::empty({acc_slots, tv, d}, f32) : Tensor();
  Tensor de_acc = need_embed && !merge_tied ? at::empty({acc_slots, tv, d_e}, f32) : Tensor();
  Tensor db_acc = need_bias ? at::empty({acc_slots, tv}, f32) : Tensor();
  const float temperature = static_cast<float>(prm.temperature);
  const float softcap = prm.softcap ? static_cast<float>(*prm.softcap) : 0.f;

  // One (split, group) item's contribution from one tile: d hidden rows into the split's partial, and
  // the tile's weight gradients into accumulator slot `slot` (fp32).
  auto process_tile = [&](int64_t s, int64_t g, int64_t tile, int64_t slot) {
    const int64_t tid = at::get_thread_num();
    const auto [g0, g1] = group_rows(c, rows, g);
    const int64_t v0 = tile * tv, n = std::min(tv, vocab - v0), n_pad = round_up(n, 2);
    const float* b_tile = bias_tile(bias, v0, n, bias_buf.get<float>(tid));
    Tensor w32, e32;
    const at::BFloat16 *w_rows = nullptr, *e_rows = nullptr;
    int64_t ldw = 0, lde = 0;
    at::BFloat16* wpack = nullptr;
    if (bf16) {
      w_rows = unit_rows(weight, v0, n, wrow_buf.get<at::BFloat16>(tid), &ldw);
      if (need_dz && !stacked) e_rows = unit_rows(embed, v0, n, erow_buf.get<at::BFloat16>(tid), &lde);
      if (need_hidden) {
        wpack = wpack_buf.get<at::BFloat16>(tid);
        pack_tile(k, weight, v0, n, wpack);
      }
    } else {
      w32 = fp32_rows(weight, v0, n, w32_buf.get<float>(tid));
      e32 = tied ? w32 : fp32_rows(embed, v0, n, e32_buf.get<float>(tid));
    }
    float* zd = zd_buf.get<float>(tid);
    float* dw_slot = need_weight ? dw_acc[slot].data_ptr<float>() : nullptr;
    float* de_slot = de_acc.defined() ? de_acc[slot].data_ptr<float>() : nullptr;
    float* db_slot = need_bias ? db_acc[slot].data_ptr<float>() : nullptr;
    bool first_block = true;  // the accumulators are overwritten by the first contributing block
    for (int64_t r0 = g0; r0 < g1; r0 += rb) {
      const int64_t bi = r0 / rb, m = std::min(rb, g1 - r0), m_pad = round_up(m, 2);
      const int64_t ldz = need_dz ? 2 * m : m;
      if (bf16) {
        brgemm(n, stacked ? 2 * m : m, d, w_rows, ldw, logits_rhs[bi].data_ptr<at::BFloat16>(), stacked ? 2 * m : m,
               zd, ldz, false);
        if (need_dz && !stacked) {
          brgemm(n, m, d_e, e_rows, lde, dp_rhs[bi].data_ptr<at::BFloat16>(), m, zd + m, ldz, false);
        }
      } else {
        Tensor zt = at::from_blob(zd, {n, ldz}, f32);
        if (stacked) {
          at::mm_out(zt, w32, logits_rhs[bi].t());
        } else {
          Tensor z_cols = zt.narrow(1, 0, m);
          at::mm_out(z_cols, w32, logits_rhs[bi].narrow(0, 0, m).t());
          if (need_dz) {
            Tensor dp_cols = zt.narrow(1, m, m);
            at::mm_out(dp_cols, e32, dp_rhs[bi].t());
          }
        }
      }
      float p_max = 0.f;
      const int64_t p_col = bf16 ? m_pad : m;
      TileGradJob job{zd, n, m, ldz, b_tile, temperature, softcap, lse.data_ptr<float>() + r0,
                      delta.data_ptr<float>() + r0, need_dz,
                      bf16 ? nullptr : pd32_buf.get<float>(tid),
                      bf16 ? pd16_buf.get<at::BFloat16>(tid) : nullptr, 2 * p_col, p_col,
                      bf16 && need_hidden ? dz16_buf.get<at::BFloat16>(tid) : nullptr, n_pad,
                      need_bias ? db_buf.get<float>(tid) : nullptr, &p_max};
      k.tile_backward_elementwise(job);
      // Gradient filter (grad_filter.py): skip a (row block, tile) whose probabilities are all below eps.
      if (grad_filter_eps > 0.0 && p_max < grad_filter_eps) continue;
      const bool add = !first_block;
      first_block = false;
      if (bf16) {
        const at::BFloat16* pd16 = pd16_buf.get<at::BFloat16>(tid);
        if (need_hidden) {
          brgemm(m, d, n_pad, dz16_buf.get<at::BFloat16>(tid), n_pad, wpack, d,
                 dh.data_ptr<float>() + (s * rows + r0) * ld_dh, ld_dh, true);
        }
        if (need_weight) {  // dW (+ dE merged) = [dz | p] [h; dO], K = the block's (padded) rows
          brgemm(n, d, merge_tied ? 2 * m_pad : m_pad, pd16, 2 * m_pad, dw_rhs[bi].data_ptr<at::BFloat16>(), d,
                 dw_slot, d, add);
        }
        if (de_slot) {
          brgemm(n, d_e, m_pad, pd16 + m_pad, 2 * m_pad, de_rhs[bi].data_ptr<at::BFloat16>(), d_e, de_slot, d_e, add);
        }
      } else {
        Tensor pd = at::from_blob(pd32_buf.get<float>(tid), {n, 2 * m}, f32);
        const Tensor dzt = pd.narrow(1, 0, m), pt = pd.narrow(1, m, m);
        if (need_hidden) {
          at::from_blob(dh.data_ptr<float>() + (s * rows + r0) * ld_dh, {m, d}, {ld_dh, 1}, f32).addmm_(dzt.t(), w32);
        }
        if (need_weight) {
          Tensor dw_view = at::from_blob(dw_slot, {n, d}, f32);
          const Tensor lhs = merge_tied ? pd : dzt, rhs = merge_tied ? logits_rhs[bi] : logits_rhs[bi].narrow(0, 0, m);
          if (add) {
            dw_view.addmm_(lhs, rhs);
          } else {
            at::mm_out(dw_view, lhs, rhs);
          }
        }
        if (de_slot) {
          Tensor de_view = at::from_blob(de_slot, {n, d_e}, f32);
          if (add) {
            de_view.addmm_(pt, dp_rhs[bi]);
          } else {
            at::mm_out(de_view, pt, dp_rhs[bi]);
          }
        }
      }
      if (db_slot) {
        const float* db_block = db_buf.get<float>(tid);
        for (int64_t r = 0; r < n; ++r) db_slot[r] = (add ? db_slot[r] : 0.f) + db_block[r];
      }
    }
    if (first_block) {  // every block filtered out: the tile's weight gradients are zero
      if (dw_slot) std::fill(dw_slot, dw_slot + n * d, 0.f);
      if (de_slot) std::fill(de_slot, de_slot + n * d_e, 0.f);
      if (db_slot) std::fill(db_slot, db_slot + n, 0.f);
    }
  };

  // Writes rows [r0, r1) of tile `tile`'s weight gradients: the sum, in order, of accumulator slots
  // slot0, slot0 + stride, ... (count of them).
  auto write_rows = [&](int64_t tile, int64_t r0, int64_t r1, int64_t slot0, int64_t stride, int64_t count) {
    const int64_t v0 = tile * tv;
    auto reduce = [&](const Tensor& accs, int64_t width, Tensor& out) {
      dispatch_dtype(out.scalar_type(), [&](auto tag) {
        using T = decltype(tag);
        T* dst = out.data_ptr<T>() + (v0 + r0) * width;
        const float* first = accs.data_ptr<float>() + (slot0 * tv + r0) * width;
        const int64_t step = stride * tv * width;
        for (int64_t e = 0; e < (r1 - r0) * width; ++e) {
          float sum = first[e];
          for (int64_t i = 1; i < count; ++i) sum += first[i * step + e];
          dst[e] = narrow_to<T>(sum);
        }
      });
    };
    if (need_weight) reduce(dw_acc, d, *d_weight);
    if (d_embed) reduce(de_acc, d_e, *d_embed);
    if (need_bias) reduce(db_acc, 1, *d_bias);
  };

  if (G == 1 || !weight_grads) {  // each item owns its tiles' weight gradients (if any): one pass
    parallel_items(S * G, [&](int64_t item) {
      const int64_t s = item / G, g = item % G, slot = at::get_thread_num();
      const auto [first, last] = split_tiles(c, s);
      for (int64_t tile = first; tile < last; ++tile) {
        process_tile(s, g, tile, slot);
        if (weight_grads) write_rows(tile, 0, std::min(tv, vocab - tile * tv), slot, 1, 1);
      }
      if (bf16) at::native::cpublas::brgemm_release(true);
    });
  } else {
    // Groups share each tile's weight gradients: items run `per_step` tiles each, then the groups'
    // accumulators are summed in group order, in parallel over (split, tile, chunk of rows).
    const int64_t steps = ceil_div(ceil_div(c.tiles, S), per_step);
    const int64_t chunks = std::max<int64_t>(1, ceil_div(t, S * per_step)), chunk_rows = ceil_div(tv, chunks);
    for (int64_t step = 0; step < steps; ++step) {
      parallel_items(S * G, [&](int64_t item) {
        const int64_t s = item / G, g = item % G;
        const auto [first, last] = split_tiles(c, s);
        for (int64_t j = 0; j < per_step; ++j) {
          const int64_t tile = first + step * per_step + j;
          if (tile < last) process_tile(s, g, tile, item * per_step + j);
        }
        if (bf16) at::native::cpublas::brgemm_release(true);
      });
      parallel_items(S * per_step * chunks, [&](int64_t item) {
        const int64_t s = item / (per_step * chunks), j = item / chunks % per_step, part = item % chunks;
        const auto [first, last] = split_tiles(c, s);
        const int64_t tile = first + step * per_step + j;
        if (tile >= last) return;
        const int64_t n = std::min(tv, vocab - tile * tv);
        const int64_t r0 = std::min(n, part * chunk_rows), r1 = std::min(n, r0 + chunk_rows);
        if (r0 < r1) write_rows(tile, r0, r1, s * G * per_step + j, per_step, G);
      });
    }
  }
  if (need_hidden) d_hidden = sum_partials(dh, d, hidden.scalar_type());
}

// =============================================================================================
// 7. Checks and entry points.

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
  TORCH_CHECK(hidden.stride(1) == 1, "gircse_kernels._C: hidden needs a unit last stride");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0) && bias->scalar_type() == dt &&
                    bias->device().is_cpu() && bias->stride(0) == 1,
                "gircse_kernels._C: lm_head_bias must be a contiguous CPU [V] tensor of the inputs' dtype");
  }
}

void check_params(double temperature, const std::optional<double>& softcap) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, "gircse_kernels._C: temperature must be > 0");
  TORCH_CHECK(!softcap || (std::isfinite(*softcap) && *softcap > 0), "gircse_kernels._C: softcap must be > 0");
}

// Which path and configuration a call takes (also reported by plan()).
struct Choice {
  bool stream;
  int64_t isa, engine;
  int64_t budget;  // bytes the per-split partials may take: `partial_budget`, or kPartialBudget for 0
  TileConfig tiles;
};

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

// Returns (out32 [B, d_e] fp32, lse [B] fp32).
std::tuple<Tensor, Tensor> forward(const Tensor& hidden, const Tensor& weight, const Tensor& embed,
                                   const std::optional<Tensor>& bias, double temperature,
                                   std::optional<double> softcap, bool tied, bool batch_invariant, int64_t tile_v,
                                   int64_t row_block, int64_t partial_budget, int64_t stream_rows,
                                   const std::string& isa, const std::string& gemm) {
  check_inputs(hidden, weight, embed, bias);
  check_params(temperature, softcap);
  at::NoGradGuard no_grad;
  const Choice ch = choose(hidden.size(0), weight.size(0), weight.size(1), embed.size(1), hidden.scalar_type(),
                           false, batch_invariant, tile_v, row_block, partial_budget, stream_rows, isa, gemm);
  const Params prm{temperature, softcap};
  const Kernels& k = kernels_for(ch.isa);
  if (ch.stream) {
    return stream_forward(hidden, weight, embed, bias, prm, tied, batch_invariant, ch.isa, ch.budget);
  }
  return tile_forward(hidden, weight, embed, bias, prm, tied, ch.engine, ch.tiles, k);
}

// Returns (d_hidden, d_weight, d_embed, d_bias) in the inputs' dtype, None where not needed.
std::tuple<std::optional<Tensor>, std::optional<Tensor>, std::optional<Tensor>, std::optional<Tensor>>
backward(const Tensor& grad_out, const Tensor& hidden, const Tensor& weight, const Tensor& embed,
         const std::optional<Tensor>& bias, const Tensor& lse, const Tensor& delta, double temperature,
         std::optional<double> softcap, bool tied, bool need_hidden, bool need_weight, bool need_embed,
         bool need_bias, bool merge_tied_grads, double grad_filter_eps, bool batch_invariant, int64_t tile_v,
         int64_t row_block, int64_t partial_budget, int64_t stream_rows, const std::string& isa,
         const std::string& gemm) {
  check_inputs(hidden, weight, embed, bias);
  check_params(temperature, softcap);
  const int64_t rows = hidden.size(0), vocab = weight.size(0), d = hidden.size(1), d_e = embed.size(1);
  TORCH_CHECK(grad_out.dim() == 2 && grad_out.size(0) == rows && grad_out.size(1) == d_e &&
                  grad_out.scalar_type() == hidden.scalar_type() && grad_out.stride(1) == 1,
              "gircse_kernels._C: grad_out must be [B, d_e] in the inputs' dtype with a unit last stride");
  TORCH_CHECK(lse.dim() == 1 && lse.size(0) == rows && lse.scalar_type() == at::kFloat && lse.is_contiguous() &&
                  delta.dim() == 1 && delta.size(0) == rows && delta.scalar_type() == at::kFloat &&
                  delta.is_contiguous(),
              "gircse_kernels._C: lse and delta must be contiguous fp32 [B]");
  TORCH_CHECK(!need_bias || bias, "gircse_kernels._C: need_bias without a bias");
  TORCH_CHECK(!merge_tied_grads || (need_weight && need_embed && tied),
              "gircse_kernels._C: merge_tied_grads needs tied weights and both weight gradients");
  TORCH_CHECK(grad_filter_eps >= 0.0, "gircse_kernels._C: grad_filter_eps must be >= 0");
  at::NoGradGuard no_grad;
  const Choice ch = choose(rows, vocab, d, d_e, hidden.scalar_type(), true, batch_invariant, tile_v, row_block,
                           partial_budget, stream_rows, isa, gemm);
  const Params prm{temperature, softcap};
  const Kernels& k = kernels_for(ch.isa);
  std::optional<Tensor> d_hidden, d_weight, d_embed, d_bias;
  if (need_hidden) d_hidden = Tensor();  // set below
  if (need_weight) d_weight = at::empty({vocab, d}, weight.options());  // contiguous
  if (need_embed && !merge_tied_grads) d_embed = at::empty({vocab, d_e}, embed.options());
  if (need_bias) d_bias = at::empty({vocab}, bias->options());
  if (ch.stream) {
    stream_backward(grad_out, hidden, weight, embed, bias, lse, delta, prm, tied, merge_tied_grads, grad_filter_eps,
                    batch_invariant, ch.isa, ch.budget, d_hidden, d_weight, d_embed, d_bias);
  } else {
    tile_backward(grad_out, hidden, weight, embed, bias, lse, delta, prm, tied, merge_tied_grads, grad_filter_eps,
                  ch.engine, ch.tiles, k, d_hidden, d_weight, d_embed, d_bias);
  }
  return {d_hidden, d_weight, d_embed, d_bias};
}

at::ScalarType dtype_from_name(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float16") return at::kHalf;
  TORCH_CHECK(false, "gircse_kernels._C: dtype must be 'float32', 'bfloat16' or 'float16', got '", name, "'");
}

py::dict plan(int64_t rows, int64_t vocab, int64_t d, int64_t d_e, const std::string& dtype, bool backward,
              bool batch_invariant, int64_t tile_v, int64_t row_block, int64_t partial_budget, int64_t stream_rows,
              const std::string& isa, const std::string& gemm) {
  TORCH_CHECK(rows >= 1 && vocab >= 1 && d >= 1 && d_e >= 1, "gircse_kernels._C: plan needs positive sizes");
  const Choice ch = choose(rows, vocab, d, d_e, dtype_from_name(dtype), backward, batch_invariant, tile_v,
                           row_block, partial_budget, stream_rows, isa, gemm);
  py::dict out;
  out["path"] = ch.stream ? "stream" : "tiles";
  out["isa"] = kIsaNames[ch.isa];
  out["threads"] = threads();
  if (ch.stream) {
    const int64_t splits = stream_split_count(vocab, batch_invariant);
    out["splits"] = splits;
    // Row passes (backward: when d_hidden is the only gradient; with weight gradients, one pass).
    out["groups"] = ceil_div(rows, stream_pass_rows(rows, splits, backward ? d : d_e, ch.budget));
  } else {
    out["gemm"] = kGemmNames[ch.engine];
    out["tile_v"] = ch.tiles.tile_v;
    out["row_block"] = ch.tiles.row_block;
    out["tiles"] = ch.tiles.tiles;
    out["splits"] = ch.tiles.splits;
    out["groups"] = ch.tiles.groups;
  }
  return out;
}

py::dict capabilities() {
  py::dict out;
  py::list isas;
  for (int64_t i = 2; i >= 0; --i)
    if (isa_supported(i)) isas.append(kIsaNames[i]);
  out["isa"] = kIsaNames[best_isa()];
  out["isas"] = isas;
  out["avx512_bf16"] = cpu_avx512_bf16();
  out["amx_bf16"] = cpu_amx_bf16();
  out["bf16_gemm"] = bf16_gemm_available();
  out["gemm_for_bf16"] = kGemmNames[bf16_gemm_available() ? kGemmBf16 : kGemmFp32];
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "C++ CPU backend of gircse_kernels.soft_token_embedding (see csrc/soft_token_embedding.cpp)";
  m.def("forward", &forward, "softmax(z) @ E without a [B, V] buffer: (out32, lse)", py::arg("hidden"),
        py::arg("lm_head_weight"), py::arg("embed_weight"), py::arg("lm_head_bias"), py::arg("temperature"),
        py::arg("softcap"), py::arg("tied"), py::arg("batch_invariant") = false, py::arg("tile_v") = 0,
        py::arg("row_block") = 0, py::arg("partial_budget") = 0, py::arg("stream_rows") = -1,
        py::arg("isa") = "auto", py::arg("gemm") = "auto", py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward, "gradients of the op (d_hidden, d_weight, d_embed, d_bias)",
        py::arg("grad_out"), py::arg("hidden"), py::arg("lm_head_weight"), py::arg("embed_weight"),
        py::arg("lm_head_bias"), py::arg("lse"), py::arg("delta"), py::arg("temperature"),
        py::arg("softcap"), py::arg("tied"), py::arg("need_hidden"), py::arg("need_weight"),
        py::arg("need_embed"), py::arg("need_bias"), py::arg("merge_tied_grads"),
        py::arg("grad_filter_eps"), py::arg("batch_invariant") = false, py::arg("tile_v") = 0,
        py::arg("row_block") = 0, py::arg("partial_budget") = 0, py::arg("stream_rows") = -1,
        py::arg("isa") = "auto", py::arg("gemm") = "auto", py::call_guard<py::gil_scoped_release>());
  m.def("plan", &plan, "the path and configuration a call with these sizes takes", py::arg("rows"),
        py::arg("vocab"), py::arg("d"), py::arg("d_e"), py::arg("dtype"), py::arg("backward") = false,
        py::arg("batch_invariant") = false, py::arg("tile_v") = 0, py::arg("row_block") = 0,
        py::arg("partial_budget") = 0, py::arg("stream_rows") = -1, py::arg("isa") = "auto",
        py::arg("gemm") = "auto");
  m.def("capabilities", &capabilities, "what this CPU offers the backend (ISA clones, native bf16 GEMM)");
  m.def("num_threads", []() { return at::get_num_threads(); });
}
