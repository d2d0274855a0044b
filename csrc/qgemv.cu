// Quantized linear layer (CUDA): y [rows, out] = x [rows, in] @ dequant(W)^T + bias, W in
// GGUF's block formats (q8_0, q4_0, q4_1; layouts in pymesh/model/quant.py, the same as the
// CPU kernel in qgemv.cpp). Kept simple: one warp per output feature and tile of kRowTile
// rows of x; lane l walks blocks l, l + 32, ..., dequantizes each weight to float32 and
// multiplies it with x in float32 (x is not quantized here), then the warp reduces.
#include "cuda_common.cuh"
#include "kernels.h"

namespace pymesh {
namespace cuda {
namespace {

constexpr int kWarps = 4;     // warps (output features) per thread block
constexpr int kRowTile = 4;   // rows of x per warp

__device__ __forceinline__ float half_at(const uint8_t* p) {
  const unsigned short bits = static_cast<unsigned short>(p[0] | (p[1] << 8));
  return __half2float(__ushort_as_half(bits));
}

// Weight e (0..31) of the block at p.
template <int Q>
__device__ __forceinline__ float dequant(const uint8_t* p, int e, float d, float m) {
  if (Q == 0) return d * static_cast<float>(static_cast<int8_t>(p[2 + e]));
  const uint8_t byte = p[(Q == 2 ? 4 : 2) + (e & 15)];
  const int q = e < 16 ? (byte & 0x0F) : (byte >> 4);
  return Q == 1 ? d * static_cast<float>(q - 8) : d * static_cast<float>(q) + m;
}

template <int Q, typename T>
__global__ void qlinear_kernel(T* __restrict__ y, const T* __restrict__ x, int64_t x_stride,
                               const uint8_t* __restrict__ w, const T* __restrict__ bias,
                               int64_t rows, int64_t in_features, int64_t out_features) {
  constexpr int64_t BB = Q == 0 ? 34 : (Q == 1 ? 18 : 20);
  const int lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * kRowTile;
  if (n >= out_features) return;
  const int64_t nb = in_features / 32;
  const uint8_t* row = w + n * nb * BB;
  float acc[kRowTile] = {};
  for (int64_t b = lane; b < nb; b += 32) {
    const uint8_t* p = row + b * BB;
    const float d = half_at(p);
    const float m = Q == 2 ? half_at(p + 2) : 0.0f;
    for (int e = 0; e < 32; ++e) {
      const float wv = dequant<Q>(p, e, d, m);
#pragma unroll
      for (int r = 0; r < kRowTile; ++r)
        if (r0 + r < rows) acc[r] += wv * to_float(x[(r0 + r) * x_stride + b * 32 + e]);
    }
  }
#pragma unroll
  for (int r = 0; r < kRowTile; ++r) {
    float v = acc[r];
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0 && r0 + r < rows)
      y[(r0 + r) * out_features + n] = from_float<T>(v + (bias ? to_float(bias[n]) : 0.0f));
  }
}

}  // namespace
}  // namespace cuda

void qlinear_cuda(uintptr_t y, uintptr_t x, int64_t x_stride, uintptr_t w, uintptr_t bias,
                  int64_t rows, int64_t in_features, int64_t out_features, int qtype, int dtype,
                  uintptr_t stream) {
  if (qtype < 0 || qtype > 2)
    throw std::invalid_argument("qlinear: unknown block type code " + std::to_string(qtype) +
                                " (expected 0=q8_0, 1=q4_0, 2=q4_1)");
  if (in_features <= 0 || in_features % 32 != 0 || out_features <= 0)
    throw std::invalid_argument("qlinear: in_features must be a positive multiple of 32 and "
                                "out_features positive");
  if (rows <= 0) return;
  const dim3 grid(static_cast<unsigned>((out_features + cuda::kWarps - 1) / cuda::kWarps),
                  static_cast<unsigned>((rows + cuda::kRowTile - 1) / cuda::kRowTile));
  cuda::dispatch(dtype, "qlinear", [&](auto tag) {
    using T = decltype(tag);
    auto launch = [&](auto kernel) {
      kernel<<<grid, 32 * cuda::kWarps, 0, cuda::as_stream(stream)>>>(
          reinterpret_cast<T*>(y), reinterpret_cast<const T*>(x), x_stride,
          reinterpret_cast<const uint8_t*>(w), bias ? reinterpret_cast<const T*>(bias) : nullptr,
          rows, in_features, out_features);
    };
    if (qtype == 0) launch(cuda::qlinear_kernel<0, T>);
    else if (qtype == 1) launch(cuda::qlinear_kernel<1, T>);
    else launch(cuda::qlinear_kernel<2, T>);
  });
  cuda::check_launch("qlinear");
}

}  // namespace pymesh
