// pybind11 entry point of pymesh._C. Every kernel releases the GIL: the worker
// runs model compute in a thread while trio keeps serving the network.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "common.h"
#include "kernels.h"

namespace py = pybind11;
using py::arg;

namespace {

void set_num_threads(int n) {
  if (n < 1) throw std::invalid_argument("set_num_threads: need n >= 1, got " + std::to_string(n));
  pymesh::default_threads() = n;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pymesh fused kernels (CPU; CUDA when built with a CUDA compiler)";
  using release = py::call_guard<py::gil_scoped_release>;

  m.def("rms_norm", &pymesh::rms_norm_cpu, release(), arg("out"), arg("out_stride"), arg("x"),
        arg("x_stride"), arg("weight"), arg("rows"), arg("hidden"), arg("eps"), arg("dtype"),
        arg("threads") = 0, "out = rms_norm(x) * weight on CPU (raw pointers, element strides)");
  m.def("fused_add_rms_norm", &pymesh::fused_add_rms_norm_cpu, release(), arg("x"),
        arg("x_stride"), arg("residual"), arg("res_stride"), arg("weight"), arg("rows"),
        arg("hidden"), arg("eps"), arg("dtype"), arg("threads") = 0,
        "residual += x; x = rms_norm(residual) * weight, in place on CPU");
  m.def("rotary_embedding", &pymesh::rotary_embedding_cpu, release(), arg("q"),
        arg("q_token_stride"), arg("q_head_stride"), arg("q_heads"), arg("k"),
        arg("k_token_stride"), arg("k_head_stride"), arg("k_heads"), arg("head_dim"),
        arg("positions"), arg("tokens"), arg("cos"), arg("sin"), arg("rot_dim"), arg("max_pos"),
        arg("dtype"), arg("threads") = 0,
        "rotate-half rotary embedding in place on q and k (k may be 0) on CPU");
  m.def("silu_and_mul", &pymesh::silu_and_mul_cpu, release(), arg("out"), arg("out_stride"),
        arg("gate"), arg("gate_stride"), arg("up"), arg("up_stride"), arg("rows"), arg("width"),
        arg("dtype"), arg("threads") = 0, "out = silu(gate) * up on CPU");
  m.def("linear", &pymesh::linear_cpu, release(), arg("y"), arg("x"), arg("x_stride"),
        arg("weight"), arg("bias"), arg("rows"), arg("in_features"), arg("out_features"),
        arg("dtype"), arg("threads") = 0,
        "y = x @ weight.T + bias for 1..linear_max_rows() rows of x on CPU (GEMV)");
  m.def("linear_max_rows", &pymesh::linear_max_rows);
  m.def("decode_attention", &pymesh::decode_attention_cpu, release(), arg("out"), arg("out_stride"),
        arg("qkv"), arg("qkv_stride"), arg("caches"), arg("positions"), arg("limits"), arg("rows"),
        arg("heads"), arg("kv_heads"), arg("head_dim"), arg("window"), arg("scale"), arg("dtype"),
        arg("threads") = 0,
        "one new token per row, each row its own sequence and KV cache: store k/v, attend (CPU)");
  m.def("attention_isa", &pymesh::attention_isa, "which decode_attention code path this CPU runs");
  m.def("attention_limit_isa", &pymesh::attention_limit_isa, arg("name"),
        "cap the decode_attention code path at avx512 (default), avx2 or generic (tests)");
  m.def("read_sum", &pymesh::read_sum, release(), arg("data"), arg("n"), arg("threads") = 0,
        "sum of n float32 values streamed like GEMV weights (bandwidth benchmark)");
  m.def("linear_isa", &pymesh::linear_isa, "which GEMV code path this CPU runs");
  m.def("linear_limit_isa", &pymesh::linear_limit_isa, arg("name"),
        "cap the GEMV code path at avx512+avx512_bf16 (default), avx512 or generic (tests)");
  m.def("qlinear", &pymesh::qlinear_cpu, release(), arg("y"), arg("x"), arg("x_stride"), arg("w"),
        arg("bias"), arg("rows"), arg("in_features"), arg("out_features"), arg("qtype"),
        arg("dtype"), arg("threads") = 0,
        "y = x @ dequant(w).T + bias for a GGUF block weight (qtype 0 q8_0, 1 q4_0, 2 q4_1) on CPU");
  m.def("qlinear_isa", &pymesh::qlinear_isa, "which quantized GEMV code path this CPU runs");
  m.def("decode_span", &pymesh::decode_span_cpu, release(), arg("table"), arg("blocks"), arg("x"),
        arg("res"), arg("o"), arg("qkv"), arg("attn"), arg("gu"), arg("act"), arg("slots"),
        arg("positions"), arg("limits"), arg("cos"), arg("sin"), arg("hidden"), arg("q"), arg("kv"),
        arg("inter"), arg("head_dim"), arg("heads"), arg("kv_heads"), arg("rot_dim"), arg("max_pos"),
        arg("window"), arg("scale"), arg("eps"), arg("elem_size"), arg("dtype"), arg("threads") = 0,
        "a span's one-sequence decode step, every block in one call (DecodePlan's loop, one GIL release)");
  m.def("decode_span_columns", &pymesh::decode_span_columns, "columns of decode_span's block table");
  m.def("qlinear_limit_isa", &pymesh::qlinear_limit_isa, arg("name"),
        "cap the quantized GEMV code path at avx512_vnni (default), avx2 or generic (tests)");
  m.def("set_num_threads", &set_num_threads, arg("n"),
        "threads for CPU kernels called with threads <= 0 (default: the CPU count)");
  m.def("max_threads", &pymesh::max_threads);
  m.def("pool_size", &pymesh::pool_size, "helper threads the kernels have started");

#ifdef PYMESH_WITH_CUDA
  m.attr("has_cuda") = true;
  py::module_ cuda = m.def_submodule("cuda", "CUDA kernels (stream passed as an integer)");
  cuda.def("rms_norm", &pymesh::rms_norm_cuda, release(), arg("out"), arg("out_stride"),
           arg("x"), arg("x_stride"), arg("weight"), arg("rows"), arg("hidden"), arg("eps"),
           arg("dtype"), arg("stream"));
  cuda.def("fused_add_rms_norm", &pymesh::fused_add_rms_norm_cuda, release(), arg("x"),
           arg("x_stride"), arg("residual"), arg("res_stride"), arg("weight"), arg("rows"),
           arg("hidden"), arg("eps"), arg("dtype"), arg("stream"));
  cuda.def("rotary_embedding", &pymesh::rotary_embedding_cuda, release(), arg("q"),
           arg("q_token_stride"), arg("q_head_stride"), arg("q_heads"), arg("k"),
           arg("k_token_stride"), arg("k_head_stride"), arg("k_heads"), arg("head_dim"),
           arg("positions"), arg("tokens"), arg("cos"), arg("sin"), arg("rot_dim"),
           arg("max_pos"), arg("dtype"), arg("stream"));
  cuda.def("silu_and_mul", &pymesh::silu_and_mul_cuda, release(), arg("out"), arg("out_stride"),
           arg("gate"), arg("gate_stride"), arg("up"), arg("up_stride"), arg("rows"),
           arg("width"), arg("dtype"), arg("stream"));
  cuda.def("qlinear", &pymesh::qlinear_cuda, release(), arg("y"), arg("x"), arg("x_stride"),
           arg("w"), arg("bias"), arg("rows"), arg("in_features"), arg("out_features"),
           arg("qtype"), arg("dtype"), arg("stream"));
#else
  m.attr("has_cuda") = false;
#endif
}
