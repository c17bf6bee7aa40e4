// The tile path's host side, both GEMM engines: per (vocabulary split, row group) item, the tiles'
// GEMMs (ATen / MKL in fp32, or oneDNN's brgemm on bf16 operands), the elementwise kernels between
// them (tile_kernels.cpp), the weight-gradient accumulators and their fixed-order sums. The two
// engines share every loop, buffer and accumulation and differ only in their GEMM calls and operand
// layouts, so they stay in one file. How tiles, splits and groups are sized: plan.cpp.
#include "host.h"
#include "merge.h"

#include <ATen/native/CPUBlas.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

GIRCSE_NAMESPACE {
namespace {

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

}  // namespace

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

}  // namespace gircse
