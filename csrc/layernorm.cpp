// RMSNorm and fused residual-add + RMSNorm (CPU).
//
// Rounding follows Hugging Face's LlamaRMSNorm: the normalised value is
// computed in float32, cast to the input dtype, then multiplied by the weight
// in that dtype: out = weight * (x * rsqrt(mean(x^2) + eps)).to(dtype).
#include <cmath>

#include "common.h"
#include "kernels.h"

namespace pymesh {
namespace {

// out [rows, hidden] (row stride out_stride), x [rows, hidden] (row stride
// x_stride), weight [hidden]; rows [begin, end).
template <typename T>
PYMESH_INLINE void rms_norm_rows(T* out, int64_t out_stride, const T* x, int64_t x_stride,
                                 const T* weight, int64_t hidden, float eps, int64_t begin,
                                 int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * x_stride;
    T* outr = out + r * out_stride;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < hidden; ++i) {
      float v = to_float(xr[i]);
      ss += v * v;
    }
    float scale = 1.0f / std::sqrt(ss / static_cast<float>(hidden) + eps);
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i) {
      float normed = round_to<T>(to_float(xr[i]) * scale);
      outr[i] = from_float<T>(to_float(weight[i]) * normed);
    }
  }
}

// residual += x (rounded to T); x = rms_norm(residual) * weight.
template <typename T>
PYMESH_INLINE void fused_add_rms_norm_rows(T* x, int64_t x_stride, T* residual,
                                           int64_t res_stride, const T* weight, int64_t hidden,
                                           float eps, int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    T* xr = x + r * x_stride;
    T* rr = residual + r * res_stride;
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < hidden; ++i) {
      float sum = round_to<T>(to_float(rr[i]) + to_float(xr[i]));
      rr[i] = from_float<T>(sum);
      ss += sum * sum;
    }
    float scale = 1.0f / std::sqrt(ss / static_cast<float>(hidden) + eps);
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i) {
      float normed = round_to<T>(to_float(rr[i]) * scale);
      xr[i] = from_float<T>(to_float(weight[i]) * normed);
    }
  }
}

#define PYMESH_RMS_CLONES(T, SUFFIX)                                                          \
  PYMESH_CLONES void rms_norm_##SUFFIX(T* out, int64_t os, const T* x, int64_t xs,            \
                                       const T* w, int64_t h, float eps, int64_t b,           \
                                       int64_t e) {                                           \
    rms_norm_rows<T>(out, os, x, xs, w, h, eps, b, e);                                        \
  }                                                                                           \
  PYMESH_CLONES void fused_add_rms_norm_##SUFFIX(T* x, int64_t xs, T* res, int64_t rs,        \
                                                 const T* w, int64_t h, float eps, int64_t b, \
                                                 int64_t e) {                                 \
    fused_add_rms_norm_rows<T>(x, xs, res, rs, w, h, eps, b, e);                              \
  }

PYMESH_RMS_CLONES(float, f32)
PYMESH_RMS_CLONES(f16, f16)
PYMESH_RMS_CLONES(bf16, bf16)

void check_rows(int64_t rows, int64_t hidden, int64_t stride_a, int64_t stride_b,
                const char* op) {
  if (rows < 0 || hidden <= 0)
    bad_argument(std::string(op) + ": need rows >= 0 and hidden > 0, got rows=" +
                 std::to_string(rows) + " hidden=" + std::to_string(hidden));
  if (rows > 1 && (stride_a < hidden || stride_b < hidden))
    bad_argument(std::string(op) + ": row strides must be >= hidden (" + std::to_string(hidden) +
                 "), got " + std::to_string(stride_a) + " and " + std::to_string(stride_b));
}

}  // namespace

void rms_norm_cpu(uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride,
                  uintptr_t weight, int64_t rows, int64_t hidden, double eps, int dtype,
                  int threads) {
  check_rows(rows, hidden, out_stride, x_stride, "rms_norm");
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    int64_t bytes = rows * hidden * static_cast<int64_t>(sizeof(T)) * 2;
    auto norm = pick<T>(rms_norm_f32, rms_norm_f16, rms_norm_bf16);
    parallel_for(rows, threads_for(bytes, threads), [&](int64_t b, int64_t e) {
      norm(reinterpret_cast<T*>(out), out_stride, reinterpret_cast<const T*>(x),
                       x_stride, reinterpret_cast<const T*>(weight), hidden,
                       static_cast<float>(eps), b, e);
    });
  });
}

void fused_add_rms_norm_cpu(uintptr_t x, int64_t x_stride, uintptr_t residual,
                            int64_t res_stride, uintptr_t weight, int64_t rows, int64_t hidden,
                            double eps, int dtype, int threads) {
  check_rows(rows, hidden, x_stride, res_stride, "fused_add_rms_norm");
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    int64_t bytes = rows * hidden * static_cast<int64_t>(sizeof(T)) * 2;
    auto fused = pick<T>(fused_add_rms_norm_f32, fused_add_rms_norm_f16, fused_add_rms_norm_bf16);
    parallel_for(rows, threads_for(bytes, threads), [&](int64_t b, int64_t e) {
      fused(reinterpret_cast<T*>(x), x_stride, reinterpret_cast<T*>(residual),
                        res_stride, reinterpret_cast<const T*>(weight), hidden,
                        static_cast<float>(eps), b, e);
    });
  });
}

}  // namespace pymesh
