// Rotary position embedding, in place on q and k (CPU).
//
// Hugging Face's rotate-half layout: for i < rot/2 of each head,
//   x[i]         = x[i] * cos - x[i + rot/2] * sin
//   x[i + rot/2] = x[i + rot/2] * cos + x[i] * sin
// with cos/sin float32 tables [max_pos, rot/2] built by the Python side (so
// rope scaling lives in one place). Elements past `rot` are left alone.
#include "common.h"
#include "kernels.h"

namespace pymesh {
namespace {

template <typename T>
PYMESH_INLINE void rotate_heads(T* base, int64_t token_stride, int64_t head_stride,
                                int64_t heads, int64_t half, const int64_t* positions,
                                const float* cos, const float* sin, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    const float* c = cos + positions[t] * half;
    const float* s = sin + positions[t] * half;
    for (int64_t h = 0; h < heads; ++h) {
      T* x = base + t * token_stride + h * head_stride;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        float x1 = to_float(x[i]);
        float x2 = to_float(x[i + half]);
        x[i] = from_float<T>(x1 * c[i] - x2 * s[i]);
        x[i + half] = from_float<T>(x2 * c[i] + x1 * s[i]);
      }
    }
  }
}

#define PYMESH_ROTARY_CLONES(T, SUFFIX)                                                  \
  PYMESH_CLONES void rotary_##SUFFIX(T* x, int64_t ts, int64_t hs, int64_t heads,        \
                                     int64_t half, const int64_t* pos, const float* cos, \
                                     const float* sin, int64_t b, int64_t e) {           \
    rotate_heads<T>(x, ts, hs, heads, half, pos, cos, sin, b, e);                        \
  }

PYMESH_ROTARY_CLONES(float, f32)
PYMESH_ROTARY_CLONES(f16, f16)
PYMESH_ROTARY_CLONES(bf16, bf16)

}  // namespace

void rotary_embedding_cpu(uintptr_t q, int64_t q_token_stride, int64_t q_head_stride,
                          int64_t q_heads, uintptr_t k, int64_t k_token_stride,
                          int64_t k_head_stride, int64_t k_heads, int64_t head_dim,
                          uintptr_t positions, int64_t tokens, uintptr_t cos, uintptr_t sin,
                          int64_t rot_dim, int64_t max_pos, int dtype, int threads) {
  if (rot_dim <= 0 || rot_dim % 2 != 0 || rot_dim > head_dim)
    bad_argument("rotary_embedding: rotary dim " + std::to_string(rot_dim) +
                 " must be even, positive and <= head_dim " + std::to_string(head_dim));
  if (tokens < 0 || q_heads < 0 || k_heads < 0)
    bad_argument("rotary_embedding: negative size");
  const int64_t* pos = reinterpret_cast<const int64_t*>(positions);
  for (int64_t t = 0; t < tokens; ++t) {
    if (pos[t] < 0 || pos[t] >= max_pos)
      bad_argument("rotary_embedding: position " + std::to_string(pos[t]) + " at token " +
                   std::to_string(t) + " is outside the cos/sin tables [0, " +
                   std::to_string(max_pos) + "); build larger tables");
  }
  const int64_t half = rot_dim / 2;
  const float* c = reinterpret_cast<const float*>(cos);
  const float* s = reinterpret_cast<const float*>(sin);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto run = pick<T>(rotary_f32, rotary_f16, rotary_bf16);
    int64_t bytes = tokens * (q_heads + k_heads) * rot_dim * static_cast<int64_t>(sizeof(T)) * 2;
    parallel_for(tokens, threads_for(bytes, threads), [&](int64_t b, int64_t e) {
      if (q_heads > 0)
        run(reinterpret_cast<T*>(q), q_token_stride, q_head_stride, q_heads,
                           half, pos, c, s, b, e);
      if (k != 0 && k_heads > 0)
        run(reinterpret_cast<T*>(k), k_token_stride, k_head_stride, k_heads,
                           half, pos, c, s, b, e);
    });
  });
}

}  // namespace pymesh
