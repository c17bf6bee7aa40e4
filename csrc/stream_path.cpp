// The streaming path's host side: cuts the vocabulary into splits and the rows into groups of
// kStreamRows, runs one streaming-kernel job (stream_kernels.cpp) per (split, group) over ATen
// threads, merges the splits (merge.h), and runs large batch-invariant batches in passes of
// rows. Apart from the kernels, which are compiled once per instruction set.
#include "host.h"
#include "merge.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>

#include <algorithm>

GIRCSE_NAMESPACE {
namespace {

template <typename T>
StreamArgs<T> stream_args(const Tensor& weight, const Tensor& embed, const std::optional<Tensor>& bias,
                          const Params& prm, bool tied) {
  return {weight.data_ptr<T>(), weight.stride(0), weight.stride(1), embed.data_ptr<T>(), embed.stride(0),
          embed.stride(1), bias ? bias->data_ptr<T>() : nullptr, weight.size(1), embed.size(1),
          static_cast<float>(prm.temperature), prm.softcap ? static_cast<float>(*prm.softcap) : 0.f, tied};
}

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
  Tensor block = at::empty({threads(), std::min(rows, kStreamRows) * ld}, f32);  // the kernels' block sums
  dispatch_dtype(hidden.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const StreamArgs<T> args = stream_args<T>(weight, embed, bias, prm, tied);
    parallel_items(S * G, [&](int64_t item) {
      const int64_t s = item / G, g = item % G, tid = at::get_thread_num();
      const int64_t r0 = g * kStreamRows, n_rows = std::min(kStreamRows, rows - r0);
      StreamForwardJob<T> job{args, h32.data_ptr<float>() + r0 * d, n_rows, vocab * s / S, vocab * (s + 1) / S,
                              run_m.data_ptr<float>() + s * rows + r0, run_s.data_ptr<float>() + s * rows + r0,
                              acc.data_ptr<float>() + (s * rows + r0) * ld, block[tid].data_ptr<float>(), ld,
                              gather ? scratch[tid].template data_ptr<T>() : nullptr};
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
  Tensor dh_block = d_hidden ? at::empty({t, rows * ld}, f32) : Tensor();  // the kernels' block sums
  dispatch_dtype(hidden.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    const StreamArgs<T> args = stream_args<T>(weight, embed, bias, prm, tied);
    parallel_items(S, [&](int64_t s) {
      const int64_t tid = at::get_thread_num();
      StreamBackwardJob<T> job{args, h32.data_ptr<float>(), g32.data_ptr<float>(), h_dot.data_ptr<float>(),
                               g_dot.data_ptr<float>(), lse.data_ptr<float>(),
                               delta.data_ptr<float>(), rows, vocab * s / S, vocab * (s + 1) / S,
                               d_hidden ? dh_part.data_ptr<float>() + s * rows * ld : nullptr,
                               d_hidden ? dh_block[tid].data_ptr<float>() : nullptr, ld,
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

}  // namespace

std::tuple<Tensor, Tensor> stream_forward(const Tensor& hidden, const Tensor& weight, const Tensor& embed,
                                          const std::optional<Tensor>& bias, const Params& prm, bool tied,
                                          bool invariant, int64_t isa, int64_t budget) {
  const int64_t rows = hidden.size(0);
  const int64_t splits = stream_split_count(weight.size(0), invariant);
  const int64_t step = stream_pass_rows(rows, splits, embed.size(1), budget, false);
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
  const int64_t splits = stream_split_count(weight.size(0), invariant);
  const int64_t step = stream_pass_rows(rows, splits, hidden.size(1), budget, true);
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

}  // namespace gircse
