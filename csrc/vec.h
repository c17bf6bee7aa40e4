// Vectors of kW fp32 lanes (GCC vector extension): one register per vector in each ISA clone
// (kW = 16 for AVX512, 8 for AVX2, 4 for baseline SSE2). Everything here is inlined into the
// clones' entry points, so it is compiled for that clone's instruction set. Included by the two
// kernel files only (stream_kernels.cpp, tile_kernels.cpp), which share all of it.
#pragma once

#include "kernels.h"

#include <cstdint>
#include <cstring>
#include <utility>

#pragma GCC diagnostic ignored "-Wpsabi"

#define GI inline __attribute__((always_inline))

GIRCSE_NAMESPACE {

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

// Even / odd lanes of a ++ b, and back: bf16 pairs in the streaming rows and the VNNI packing.
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

}  // namespace gircse
