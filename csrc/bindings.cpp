// The Python module gircse_kernels._C: the input checks, the entry points forward and backward (which
// choose a path and run it), plan() and capabilities(). The only file that includes pybind11 and
// torch's Python headers: torch/csrc/utils/pybind.h, which brings the tensor type casters, rather than
// torch/extension.h, which adds torch's whole C++ frontend and took ~3x as long to parse (~32 s of CPU
// against ~11 s when measured; the file's own code takes a few seconds).
#include <torch/csrc/utils/pybind.h>

#include "host.h"

#include <ATen/ops/empty.h>

#include <cmath>
#include <optional>
#include <string>
#include <tuple>

GIRCSE_NAMESPACE {
namespace {

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
    out["groups"] = ceil_div(rows, stream_pass_rows(rows, splits, backward ? d : d_e, ch.budget, backward));
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
}  // namespace gircse

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace gircse;
  m.doc() = "C++ CPU backend of gircse_kernels.soft_token_embedding (see csrc/README.md)";
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
