// What the CPU can do, and so which code runs: the instruction sets of the kernel clones (CPUID,
// `isa=`) and their tables (kernels_for); whether the tile path's bf16 engine can run (CPUID for
// AVX512-BF16 / AMX and a probe of oneDNN's brgemm ukernel), the wrapper that engine calls (brgemm)
// and the engine a call gets (`gemm=`). Apart because it is the one file that asks the CPU and
// oneDNN anything.
#include "host.h"

#include <ATen/Context.h>
#include <ATen/native/CPUBlas.h>

#if defined(__x86_64__)
#include <cpuid.h>
#endif

#include <cstring>
#include <exception>
#include <string>
#include <vector>

namespace gircse {

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

}  // namespace gircse
