// q8_0 weights with float32 activations (see qgemv.cpp's header for why this type keeps x in
// float): each block's 32 int8 weights become float32 d * q (exact: an 11-bit d times an 8-bit
// q) and are FMA'd with x, so the result differs from the float32 dequantize reference only by
// summation order. The same register tiling as the q4 kernels: NB weight rows x R rows of x,
// the weights of a block converted once per tile.
#include <immintrin.h>

#include "qgemv.h"

namespace pymesh {
namespace qgemv {
namespace {

constexpr int64_t BB = kBlockBytes[kQ8_0];

#define PYMESH_Q8_512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define PYMESH_Q8_256 __attribute__((target("avx2,fma,f16c")))

// 16 int8 weights at p times d, as float32.
PYMESH_Q8_512 PYMESH_INLINE __m512 weights16(const uint8_t* p, __m512 d) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), d);
}

template <int R, int NB>
PYMESH_Q8_512 void q8_512(const uint8_t* W, int64_t row_bytes, int64_t nb, const uint8_t* X,
                          int64_t ldx, float* out) {
  __m512 acc[NB][R];
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 w0[NB], w1[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      const uint8_t* p = W + j * row_bytes + b * BB;
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch), _MM_HINT_T0);
      const __m512 d = _mm512_set1_ps(half_at(p));
      w0[j] = weights16(p + 2, d);
      w1[j] = weights16(p + 18, d);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float* x = reinterpret_cast<const float*>(X + r * ldx) + b * 32;
      const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j)
        acc[j][r] = _mm512_fmadd_ps(w1[j], x1, _mm512_fmadd_ps(w0[j], x0, acc[j][r]));
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) out[j * R + r] = _mm512_reduce_add_ps(acc[j][r]);
}

template <int R, int NB>
PYMESH_Q8_256 void q8_256(const uint8_t* W, int64_t row_bytes, int64_t nb, const uint8_t* X,
                          int64_t ldx, float* out) {
  __m256 acc[NB][R];
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int j = 0; j < NB; ++j) {
      const uint8_t* p = W + j * row_bytes + b * BB;
      _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch), _MM_HINT_T0);
      const __m256 d = _mm256_set1_ps(half_at(p));
      for (int c = 0; c < 4; ++c) {
        const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 2 + 8 * c));
        const __m256 wv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), d);
        for (int r = 0; r < R; ++r) {
          const float* x = reinterpret_cast<const float*>(X + r * ldx) + b * 32 + 8 * c;
          acc[j][r] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x), acc[j][r]);
        }
      }
    }
  }
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < R; ++r) {
      __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc[j][r]), _mm256_extractf128_ps(acc[j][r], 1));
      s = _mm_add_ps(s, _mm_movehl_ps(s, s));
      out[j * R + r] = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
    }
}

void q8_generic(const uint8_t* W, int64_t, int64_t nb, const uint8_t* X, int64_t, float* out) {
  const float* x = reinterpret_cast<const float*>(X);
  float total = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = W + b * BB;
    const float d = half_at(p);
    for (int e = 0; e < 32; ++e) total += d * static_cast<float>(static_cast<int8_t>(p[2 + e])) * x[b * 32 + e];
  }
  out[0] = total;
}

Kernels make(Isa isa) {
  Kernels k;
  if (isa == Isa::kAvx512) {
    k.nb = 3, k.tile = 4;
    k.full[0] = q8_512<1, 3>, k.full[1] = q8_512<2, 3>, k.full[2] = q8_512<3, 3>, k.full[3] = q8_512<4, 3>;
    k.one[0] = q8_512<1, 1>, k.one[1] = q8_512<2, 1>, k.one[2] = q8_512<3, 1>, k.one[3] = q8_512<4, 1>;
  } else if (isa == Isa::kAvx2) {
    k.nb = 2, k.tile = 2;
    k.full[0] = q8_256<1, 2>, k.full[1] = q8_256<2, 2>;
    k.one[0] = q8_256<1, 1>, k.one[1] = q8_256<2, 1>;
  } else {
    k.full[0] = k.one[0] = q8_generic;
  }
  return k;
}

}  // namespace

const Kernels& q8_kernels(Isa isa) {
  static const Kernels table[3] = {make(Isa::kGeneric), make(Isa::kAvx2), make(Isa::kAvx512)};
  return table[static_cast<int>(isa)];
}

}  // namespace qgemv
}  // namespace pymesh
