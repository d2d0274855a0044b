// Entry points of pymesh's kernels, called by bindings.cpp.
//
// Tensors arrive as raw addresses (Python passes tensor.data_ptr()), sizes and
// strides in elements, and a dtype code (common.h: 0 float32, 1 float16,
// 2 bfloat16). The Python front end (pymesh/model/ops.py) has already checked
// shapes, dtypes, devices and that the last dimension is contiguous.
// `threads` <= 0 means the default (set_num_threads; the CPU count at first).
#pragma once

#include <cstdint>
#include <string>

namespace pymesh {

// out [rows, hidden] (row stride out_stride) = rms_norm(x [rows, hidden]) * weight [hidden]
void rms_norm_cpu(uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride,
                  uintptr_t weight, int64_t rows, int64_t hidden, double eps, int dtype,
                  int threads);
// residual += x; x = rms_norm(residual) * weight   (both [rows, hidden], in place)
void fused_add_rms_norm_cpu(uintptr_t x, int64_t x_stride, uintptr_t residual,
                            int64_t res_stride, uintptr_t weight, int64_t rows, int64_t hidden,
                            double eps, int dtype, int threads);
// q [tokens, q_heads, head_dim], k [tokens, k_heads, head_dim] (k may be 0), in place;
// positions int64 [tokens]; cos, sin float32 [max_pos, rot_dim / 2].
void rotary_embedding_cpu(uintptr_t q, int64_t q_token_stride, int64_t q_head_stride,
                          int64_t q_heads, uintptr_t k, int64_t k_token_stride,
                          int64_t k_head_stride, int64_t k_heads, int64_t head_dim,
                          uintptr_t positions, int64_t tokens, uintptr_t cos, uintptr_t sin,
                          int64_t rot_dim, int64_t max_pos, int dtype, int threads);
// out [rows, width] = silu(gate [rows, width]) * up [rows, width]
void silu_and_mul_cpu(uintptr_t out, int64_t out_stride, uintptr_t gate, int64_t gate_stride,
                      uintptr_t up, int64_t up_stride, int64_t rows, int64_t width, int dtype,
                      int threads);
// y [rows, out] (contiguous) = x [rows, in] (row stride x_stride) @ weight [out, in]^T + bias
// [out] (bias may be 0); 1 <= rows <= linear_max_rows().
void linear_cpu(uintptr_t y, uintptr_t x, int64_t x_stride, uintptr_t weight, uintptr_t bias,
                int64_t rows, int64_t in_features, int64_t out_features, int dtype, int threads);
int linear_max_rows();
// Ragged decode attention (attention.cpp): per row, store its new k/v (from qkv) at its
// position in its own cache, then attend over the cache; see attention.cpp for layouts.
void decode_attention_cpu(uintptr_t out, int64_t out_stride, uintptr_t qkv, int64_t qkv_stride,
                          uintptr_t caches, uintptr_t positions, uintptr_t limits, int64_t rows,
                          int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t window,
                          double scale, int dtype, int threads);
std::string attention_isa();
// Caps decode_attention's code path at avx512 (default), avx2 or generic: for tests.
void attention_limit_isa(const std::string& name);
// Sum of n float32 values, read the way linear_cpu reads weights: the bandwidth ceiling.
double read_sum(uintptr_t data, int64_t n, int threads);
std::string linear_isa();
// Caps the GEMV code path (the best the CPU has is used up to the cap): for tests.
void linear_limit_isa(const std::string& name);
// y [rows, out] (contiguous) = x [rows, in] (row stride x_stride) @ dequant(w)^T + bias [out]
// (bias may be 0), w in a GGUF block format (qgemv.cpp; qtype 0 q8_0, 1 q4_0, 2 q4_1), any
// rows >= 1, in a multiple of 32.
void qlinear_cpu(uintptr_t y, uintptr_t x, int64_t x_stride, uintptr_t w, uintptr_t bias,
                 int64_t rows, int64_t in_features, int64_t out_features, int qtype, int dtype,
                 int threads);
std::string qlinear_isa();
// A whole span's single-sequence decode step (decode_span.cpp): DecodePlan's loop over blocks
// in one call; `table` is int64 [blocks, decode_span_columns()].
void decode_span_cpu(uintptr_t table, int64_t blocks, uintptr_t x, uintptr_t res, uintptr_t o,
                     uintptr_t qkv, uintptr_t attn, uintptr_t gu, uintptr_t act, uintptr_t slots,
                     uintptr_t positions, uintptr_t limits, uintptr_t cos, uintptr_t sin,
                     int64_t hidden, int64_t q, int64_t kv, int64_t inter, int64_t head_dim,
                     int64_t heads, int64_t kv_heads, int64_t rot_dim, int64_t max_pos,
                     int64_t window, double scale, double eps, int64_t elem_size, int dtype,
                     int threads);
int decode_span_columns();
// Caps qlinear's code path (avx512_vnni, avx2 or generic): for tests.
void qlinear_limit_isa(const std::string& name);

#ifdef PYMESH_WITH_CUDA
// CUDA versions: same layouts, device pointers, `stream` a cudaStream_t as an integer.
void rms_norm_cuda(uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride,
                   uintptr_t weight, int64_t rows, int64_t hidden, double eps, int dtype,
                   uintptr_t stream);
void fused_add_rms_norm_cuda(uintptr_t x, int64_t x_stride, uintptr_t residual,
                             int64_t res_stride, uintptr_t weight, int64_t rows, int64_t hidden,
                             double eps, int dtype, uintptr_t stream);
void rotary_embedding_cuda(uintptr_t q, int64_t q_token_stride, int64_t q_head_stride,
                           int64_t q_heads, uintptr_t k, int64_t k_token_stride,
                           int64_t k_head_stride, int64_t k_heads, int64_t head_dim,
                           uintptr_t positions, int64_t tokens, uintptr_t cos, uintptr_t sin,
                           int64_t rot_dim, int64_t max_pos, int dtype, uintptr_t stream);
void silu_and_mul_cuda(uintptr_t out, int64_t out_stride, uintptr_t gate, int64_t gate_stride,
                       uintptr_t up, int64_t up_stride, int64_t rows, int64_t width, int dtype,
                       uintptr_t stream);
void qlinear_cuda(uintptr_t y, uintptr_t x, int64_t x_stride, uintptr_t w, uintptr_t bias,
                  int64_t rows, int64_t in_features, int64_t out_features, int qtype, int dtype,
                  uintptr_t stream);
#endif

}  // namespace pymesh
