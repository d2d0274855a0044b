// SwiGLU's activation out = silu(gate) * up (CUDA); silu rounded to the dtype
// before the multiply, as in activation.cpp. Grid: (column blocks, rows).
#include "cuda_common.cuh"
#include "kernels.h"

namespace pymesh {
namespace cuda {
namespace {

template <typename T>
__global__ void silu_and_mul_kernel(T* __restrict__ out, int64_t out_stride,
                                    const T* __restrict__ gate, int64_t gate_stride,
                                    const T* __restrict__ up, int64_t up_stride, int64_t width) {
  const int64_t r = blockIdx.y;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= width) return;
  const float g = to_float(gate[r * gate_stride + i]);
  const float act = round_to<T>(g / (1.0f + __expf(-g)));
  out[r * out_stride + i] = from_float<T>(act * to_float(up[r * up_stride + i]));
}

}  // namespace
}  // namespace cuda

void silu_and_mul_cuda(uintptr_t out, int64_t out_stride, uintptr_t gate, int64_t gate_stride,
                       uintptr_t up, int64_t up_stride, int64_t rows, int64_t width, int dtype,
                       uintptr_t stream) {
  if (rows <= 0 || width <= 0) return;
  const int threads = 256;
  const int64_t max_rows = 65535;  // gridDim.y limit: launch in slices of rows
  cuda::dispatch(dtype, "silu_and_mul", [&](auto tag) {
    using T = decltype(tag);
    for (int64_t r0 = 0; r0 < rows; r0 += max_rows) {
      const int64_t n = rows - r0 < max_rows ? rows - r0 : max_rows;
      dim3 grid(static_cast<unsigned>((width + threads - 1) / threads), static_cast<unsigned>(n));
      cuda::silu_and_mul_kernel<T><<<grid, threads, 0, cuda::as_stream(stream)>>>(
          reinterpret_cast<T*>(out) + r0 * out_stride, out_stride,
          reinterpret_cast<const T*>(gate) + r0 * gate_stride, gate_stride,
          reinterpret_cast<const T*>(up) + r0 * up_stride, up_stride, width);
    }
  });
  cuda::check_launch("silu_and_mul");
}

}  // namespace pymesh
