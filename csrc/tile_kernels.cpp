// Tile-path elementwise kernels: the work between the tile path's GEMMs (tile_path.cpp), on
// vocabulary-major tiles (row r = vocabulary row, column i = hidden row): the forward's online
// softmax over a logits tile, the backward's p and dz, and the VNNI pair packing of the bf16
// engine's operands. Apart from the host side because, like the streaming kernels, they are
// compiled three times, once per instruction set (kernels.h, vec.h); no ATen header here.
#include "vec.h"

#include <algorithm>
#include <cmath>
#include <cstring>

GIRCSE_NAMESPACE {
namespace {

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

}  // namespace

// The tile kernels' clones (kernels.h).
#define GIRCSE_TILE_CLONES(SUFFIX, KW)                                                                      \
  GIRCSE_TARGET_##SUFFIX void tile_forward_softmax_##SUFFIX(const TileSoftmaxJob& j) {                      \
    tile_forward_softmax_impl<KW>(j);                                                                       \
  }                                                                                                         \
  GIRCSE_TARGET_##SUFFIX void tile_backward_elementwise_##SUFFIX(const TileGradJob& j) {                    \
    tile_backward_elementwise_impl<KW>(j);                                                                  \
  }                                                                                                         \
  GIRCSE_TARGET_##SUFFIX void pack_pairs_##SUFFIX(const at::BFloat16* s, int64_t s0, int64_t s1, int64_t r, \
                                                  int64_t c, at::BFloat16* d) {                             \
    pack_pairs_impl<KW>(s, s0, s1, r, c, d);                                                                \
  }

GIRCSE_TILE_CLONES(baseline, 4)
#if GIRCSE_ISA_CLONES
GIRCSE_TILE_CLONES(avx2, 8)
GIRCSE_TILE_CLONES(avx512, 16)
#endif

}  // namespace gircse
