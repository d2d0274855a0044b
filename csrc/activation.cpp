// SwiGLU's activation: out = silu(gate) * up (CPU).
//
// Rounding follows Hugging Face's MLP, act_fn(gate) * up in the model dtype:
// silu is computed in float32 and rounded to the dtype before the multiply.
#include "common.h"
#include "kernels.h"

namespace pymesh {
namespace {

template <typename T>
PYMESH_INLINE void silu_and_mul_rows(T* out, int64_t out_stride, const T* gate,
                                     int64_t gate_stride, const T* up, int64_t up_stride,
                                     int64_t width, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const T* g = gate + r * gate_stride;
    const T* u = up + r * up_stride;
    T* o = out + r * out_stride;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      float gv = to_float(g[i]);
      float act = round_to<T>(gv / (1.0f + exp_approx(-gv)));
      o[i] = from_float<T>(act * to_float(u[i]));
    }
  }
}

#define PYMESH_SILU_CLONES(T, SUFFIX)                                                    \
  PYMESH_CLONES void silu_and_mul_##SUFFIX(T* out, int64_t os, const T* g, int64_t gs,   \
                                           const T* u, int64_t us, int64_t width,        \
                                           int64_t b, int64_t e) {                       \
    silu_and_mul_rows<T>(out, os, g, gs, u, us, width, b, e);                            \
  }

PYMESH_SILU_CLONES(float, f32)
PYMESH_SILU_CLONES(f16, f16)
PYMESH_SILU_CLONES(bf16, bf16)

}  // namespace

void silu_and_mul_cpu(uintptr_t out, int64_t out_stride, uintptr_t gate, int64_t gate_stride,
                      uintptr_t up, int64_t up_stride, int64_t rows, int64_t width, int dtype,
                      int threads) {
  if (rows < 0 || width <= 0)
    bad_argument("silu_and_mul: need rows >= 0 and width > 0, got rows=" +
                 std::to_string(rows) + " width=" + std::to_string(width));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto run = pick<T>(silu_and_mul_f32, silu_and_mul_f16, silu_and_mul_bf16);
    int64_t bytes = rows * width * static_cast<int64_t>(sizeof(T)) * 3;
    // silu costs more than a copy: count each byte twice.
    int t = threads_for(bytes * 2, threads);
    T* o = reinterpret_cast<T*>(out);
    const T* g = reinterpret_cast<const T*>(gate);
    const T* u = reinterpret_cast<const T*>(up);
    if (rows >= t) {
      parallel_for(rows, t, [&](int64_t b, int64_t e) {
        run(o, out_stride, g, gate_stride, u, up_stride, width, b, e);
      });
    } else {
      // Few tokens (decode): split the columns instead, in whole cache lines.
      int64_t lines = (width + 15) / 16;
      parallel_for(lines, t, [&](int64_t b, int64_t e) {
        int64_t c0 = b * 16, c1 = e * 16 < width ? e * 16 : width;
        run(o + c0, out_stride, g + c0, gate_stride, u + c0, up_stride, c1 - c0, 0,
                         rows);
      });
    }
  });
}

}  // namespace pymesh
