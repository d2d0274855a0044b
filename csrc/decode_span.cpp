// One decode step of a whole span for one sequence, every block in one call: the same kernels,
// in the same order and with the same arguments, as the single-sequence loop of
// pymesh/model/decode_plan.py (DecodePlan._step, the decode_attention path). Called with the
// GIL released once per token instead of once per kernel (9 per block): in a worker whose event
// loop thread runs Python while the step computes, each kernel's return otherwise waits for
// the GIL (measured: a thread doing 300 us of Python every 5 ms adds ~2.8 ms to a 30 ms
// SmolLM2 step; another process doing the same adds 0.5 ms).
#include <cstdint>
#include <stdexcept>
#include <string>

#include "kernels.h"

namespace pymesh {
namespace {

// Columns of the per-block table (int64): addresses, and each matrix's block-format code
// (-1: a float matrix, computed by linear_cpu).
enum Col { kLnAttn, kWqkv, kQqkv, kBqkv, kWo, kQo, kBo, kLnMlp, kWgu, kQgu, kWdn, kQdn, kCols };

inline void lin(uintptr_t y, uintptr_t x, int64_t ldx, uintptr_t w, int64_t qtype, uintptr_t bias,
                int64_t n_in, int64_t n_out, int dtype, int threads) {
  if (qtype < 0) {
    linear_cpu(y, x, ldx, w, bias, 1, n_in, n_out, dtype, threads);
  } else {
    qlinear_cpu(y, x, ldx, w, bias, 1, n_in, n_out, static_cast<int>(qtype), dtype, threads);
  }
}

}  // namespace

int decode_span_columns() { return kCols; }

void decode_span_cpu(uintptr_t table, int64_t blocks, uintptr_t x, uintptr_t res, uintptr_t o,
                     uintptr_t qkv, uintptr_t attn, uintptr_t gu, uintptr_t act, uintptr_t slots,
                     uintptr_t positions, uintptr_t limits, uintptr_t cos, uintptr_t sin,
                     int64_t hidden, int64_t q, int64_t kv, int64_t inter, int64_t head_dim,
                     int64_t heads, int64_t kv_heads, int64_t rot_dim, int64_t max_pos,
                     int64_t window, double scale, double eps, int64_t elem_size, int dtype,
                     int threads) {
  if (table == 0 || blocks < 1 || hidden < 1 || q < 1 || kv < 1 || inter < 1 || head_dim < 1 ||
      elem_size < 1) {
    throw std::invalid_argument("decode_span: empty table or non-positive size (blocks=" +
                                std::to_string(blocks) + ")");
  }
  const auto* t = reinterpret_cast<const int64_t*>(table);
  const int64_t h = hidden, row = q + 2 * kv, d = head_dim;
  for (int64_t i = 0; i < blocks; ++i) {
    const int64_t* b = t + i * kCols;
    auto u = [&](Col c) { return static_cast<uintptr_t>(b[c]); };
    if (i) fused_add_rms_norm_cpu(x, h, res, h, u(kLnAttn), 1, h, eps, dtype, threads);
    lin(qkv, x, h, u(kWqkv), b[kQqkv], u(kBqkv), h, row, dtype, threads);
    rotary_embedding_cpu(qkv, row, d, heads, qkv + q * elem_size, row, d, kv_heads, d, positions, 1,
                         cos, sin, rot_dim, max_pos, dtype, threads);
    decode_attention_cpu(attn, q, qkv, row, slots + 8 * i, positions, limits, 1, heads, kv_heads, d,
                         window, scale, dtype, threads);
    lin(o, attn, q, u(kWo), b[kQo], u(kBo), q, h, dtype, threads);
    fused_add_rms_norm_cpu(o, h, res, h, u(kLnMlp), 1, h, eps, dtype, threads);
    lin(gu, o, h, u(kWgu), b[kQgu], 0, h, 2 * inter, dtype, threads);
    silu_and_mul_cpu(act, inter, gu, 2 * inter, gu + inter * elem_size, 2 * inter, 1, inter, dtype,
                     threads);
    lin(x, act, inter, u(kWdn), b[kQdn], 0, inter, h, dtype, threads);
  }
}

}  // namespace pymesh
