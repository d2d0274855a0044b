// Rotary position embedding in place on q and k (CUDA), Hugging Face's
// rotate-half layout, float32 cos/sin tables [max_pos, rot_dim / 2]; one block
// per token. A position outside the tables leaves that token unchanged (the
// CPU kernel raises; here that would need a device-to-host sync).
#include "cuda_common.cuh"
#include "kernels.h"

namespace pymesh {
namespace cuda {
namespace {

template <typename T>
__device__ __forceinline__ void rotate(T* __restrict__ base, int64_t head_stride, int64_t heads,
                                       int64_t half, const float* __restrict__ c,
                                       const float* __restrict__ s) {
  for (int64_t idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
    const int64_t h = idx / half;
    const int64_t i = idx - h * half;
    T* x = base + h * head_stride;
    const float x1 = to_float(x[i]);
    const float x2 = to_float(x[i + half]);
    x[i] = from_float<T>(x1 * c[i] - x2 * s[i]);
    x[i + half] = from_float<T>(x2 * c[i] + x1 * s[i]);
  }
}

template <typename T>
__global__ void rotary_kernel(T* q, int64_t q_token_stride, int64_t q_head_stride,
                              int64_t q_heads, T* k, int64_t k_token_stride,
                              int64_t k_head_stride, int64_t k_heads,
                              const int64_t* __restrict__ positions,
                              const float* __restrict__ cos, const float* __restrict__ sin,
                              int64_t half, int64_t max_pos) {
  const int64_t t = blockIdx.x;
  const int64_t pos = positions[t];
  if (pos < 0 || pos >= max_pos) return;
  const float* c = cos + pos * half;
  const float* s = sin + pos * half;
  rotate(q + t * q_token_stride, q_head_stride, q_heads, half, c, s);
  if (k != nullptr) rotate(k + t * k_token_stride, k_head_stride, k_heads, half, c, s);
}

}  // namespace
}  // namespace cuda

void rotary_embedding_cuda(uintptr_t q, int64_t q_token_stride, int64_t q_head_stride,
                           int64_t q_heads, uintptr_t k, int64_t k_token_stride,
                           int64_t k_head_stride, int64_t k_heads, int64_t head_dim,
                           uintptr_t positions, int64_t tokens, uintptr_t cos, uintptr_t sin,
                           int64_t rot_dim, int64_t max_pos, int dtype, uintptr_t stream) {
  if (rot_dim <= 0 || rot_dim % 2 != 0 || rot_dim > head_dim)
    throw std::invalid_argument("rotary_embedding: rotary dim " + std::to_string(rot_dim) +
                                " must be even, positive and <= head_dim " +
                                std::to_string(head_dim));
  if (tokens <= 0) return;
  const int64_t half = rot_dim / 2;
  const int64_t most_heads = q_heads > k_heads ? q_heads : k_heads;
  cuda::dispatch(dtype, "rotary_embedding", [&](auto tag) {
    using T = decltype(tag);
    cuda::rotary_kernel<T><<<static_cast<unsigned>(tokens),
                             cuda::threads_for(most_heads * half > 512 ? 512 : most_heads * half),
                             0, cuda::as_stream(stream)>>>(
        reinterpret_cast<T*>(q), q_token_stride, q_head_stride, q_heads,
        k != 0 ? reinterpret_cast<T*>(k) : nullptr, k_token_stride, k_head_stride, k_heads,
        reinterpret_cast<const int64_t*>(positions), reinterpret_cast<const float*>(cos),
        reinterpret_cast<const float*>(sin), half, max_pos);
  });
  cuda::check_launch("rotary_embedding");
}

}  // namespace pymesh
