// RMSNorm and fused residual-add + RMSNorm (CUDA): one block per row.
// Rounding as in layernorm.cpp: normalise in float32, round to the dtype,
// multiply by the weight, round again.
#include "cuda_common.cuh"
#include "kernels.h"

namespace pymesh {
namespace cuda {
namespace {

// out [rows, hidden] (row stride out_stride), x [rows, hidden] (row stride x_stride)
template <typename T>
__global__ void rms_norm_kernel(T* __restrict__ out, int64_t out_stride,
                                const T* __restrict__ x, int64_t x_stride,
                                const T* __restrict__ weight, int64_t hidden, float eps) {
  const T* xr = x + blockIdx.x * x_stride;
  T* outr = out + blockIdx.x * out_stride;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float v = to_float(xr[i]);
    ss += v * v;
  }
  const float scale = rsqrtf(block_sum(ss) / static_cast<float>(hidden) + eps);
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float normed = round_to<T>(to_float(xr[i]) * scale);
    outr[i] = from_float<T>(to_float(weight[i]) * normed);
  }
}

// residual += x; x = rms_norm(residual) * weight (in place, both [rows, hidden])
template <typename T>
__global__ void fused_add_rms_norm_kernel(T* __restrict__ x, int64_t x_stride,
                                          T* __restrict__ residual, int64_t res_stride,
                                          const T* __restrict__ weight, int64_t hidden,
                                          float eps) {
  T* xr = x + blockIdx.x * x_stride;
  T* rr = residual + blockIdx.x * res_stride;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float sum = round_to<T>(to_float(rr[i]) + to_float(xr[i]));
    rr[i] = from_float<T>(sum);
    ss += sum * sum;
  }
  const float scale = rsqrtf(block_sum(ss) / static_cast<float>(hidden) + eps);
  for (int64_t i = threadIdx.x; i < hidden; i += blockDim.x) {
    float normed = round_to<T>(to_float(rr[i]) * scale);
    xr[i] = from_float<T>(to_float(weight[i]) * normed);
  }
}

}  // namespace
}  // namespace cuda

void rms_norm_cuda(uintptr_t out, int64_t out_stride, uintptr_t x, int64_t x_stride,
                   uintptr_t weight, int64_t rows, int64_t hidden, double eps, int dtype,
                   uintptr_t stream) {
  if (rows <= 0 || hidden <= 0) return;
  cuda::dispatch(dtype, "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    cuda::rms_norm_kernel<T><<<static_cast<unsigned>(rows), cuda::threads_for(hidden), 0,
                               cuda::as_stream(stream)>>>(
        reinterpret_cast<T*>(out), out_stride, reinterpret_cast<const T*>(x), x_stride,
        reinterpret_cast<const T*>(weight), hidden, static_cast<float>(eps));
  });
  cuda::check_launch("rms_norm");
}

void fused_add_rms_norm_cuda(uintptr_t x, int64_t x_stride, uintptr_t residual,
                             int64_t res_stride, uintptr_t weight, int64_t rows, int64_t hidden,
                             double eps, int dtype, uintptr_t stream) {
  if (rows <= 0 || hidden <= 0) return;
  cuda::dispatch(dtype, "fused_add_rms_norm", [&](auto tag) {
    using T = decltype(tag);
    cuda::fused_add_rms_norm_kernel<T><<<static_cast<unsigned>(rows),
                                         cuda::threads_for(hidden), 0,
                                         cuda::as_stream(stream)>>>(
        reinterpret_cast<T*>(x), x_stride, reinterpret_cast<T*>(residual), res_stride,
        reinterpret_cast<const T*>(weight), hidden, static_cast<float>(eps));
  });
  cuda::check_launch("fused_add_rms_norm");
}

}  // namespace pymesh
