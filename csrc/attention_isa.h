// Vector types of decode_attention's kernels (attention.cpp, attention_vec.h): loads of
// float32 / float16 / bfloat16 as float32, FMAs, and the lane reductions, per ISA.
#pragma once

#include <type_traits>

#include "common.h"

namespace pymesh {
// ---------------------------------------------------------------- vector paths
// The same three passes per (row, kv head), with the group's query heads:
//   scores: a block of W positions (16 AVX-512 / 8 AVX2) at a time, one FMA chain per
//     position and head, the W chains summed in one transposing reduction (no
//     horizontal sum per position);
//   softmax: vectorised max and exp (the same polynomial as exp_approx, with FMAs);
//   values: up to 3 heads x 4 vectors of columns accumulated in registers over all positions.
// They need head_dim a multiple of the vector width (16 / 8 floats); other head sizes
// take the portable path.
#if defined(__x86_64__) && defined(__GNUC__)
#define PYMESH_ATT_X86 1
// GCC 12's own AVX-512 headers trip these (_mm512_undefined_ps in reductions); as the
// CMake file does for gemv.cpp, for the translation unit that includes this header.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#define PYMESH_ATT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define PYMESH_ATT_AVX2 __attribute__((target("avx2,fma,f16c")))

struct Avx512 {
  static constexpr int kW = 16;
  using V = __m512;
  template <typename T>
  PYMESH_ATT_AVX512 static PYMESH_INLINE V load(const T* p) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm512_loadu_ps(p);
    } else if constexpr (std::is_same_v<T, f16>) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    } else {
      const __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    }
  }
  PYMESH_ATT_AVX512 static PYMESH_INLINE V zero() { return _mm512_setzero_ps(); }
  PYMESH_ATT_AVX512 static PYMESH_INLINE V set1(float x) { return _mm512_set1_ps(x); }
  PYMESH_ATT_AVX512 static PYMESH_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  PYMESH_ATT_AVX512 static PYMESH_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
  PYMESH_ATT_AVX512 static PYMESH_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  PYMESH_ATT_AVX512 static PYMESH_INLINE V max(V a, V b) { return _mm512_max_ps(a, b); }
  PYMESH_ATT_AVX512 static PYMESH_INLINE V min(V a, V b) { return _mm512_min_ps(a, b); }
  PYMESH_ATT_AVX512 static PYMESH_INLINE V loadf(const float* p) { return _mm512_loadu_ps(p); }
  PYMESH_ATT_AVX512 static PYMESH_INLINE void storef(float* p, V v) { _mm512_storeu_ps(p, v); }
  PYMESH_ATT_AVX512 static PYMESH_INLINE float hmax(V v) { return _mm512_reduce_max_ps(v); }
  PYMESH_ATT_AVX512 static PYMESH_INLINE float hsum(V v) { return _mm512_reduce_add_ps(v); }
  PYMESH_ATT_AVX512 static PYMESH_INLINE V pow2(V n) {  // 2^n for integral n in [-127, 127]
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_castsi512_ps(e);
  }
  // v[s] summed over its lanes, for 16 vectors, as one vector. Lane 4k+j holds the sum of
  // v[4j+k] (a 4x4 transpose of the slots), so callers put position 4k+j in slot 4j+k.
  PYMESH_ATT_AVX512 static PYMESH_INLINE V reduce(V* v) {
    V s[8], u[4], w[2];
    for (int i = 0; i < 8; ++i)
      s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                           _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; ++i)
      u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                           _mm512_shuffle_f32x4(s[2 * i], s[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; ++i)
      w[i] = _mm512_add_ps(_mm512_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                           _mm512_shuffle_ps(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    return _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  }
  static constexpr int slot_of(int p) { return (p % 4) * 4 + p / 4; }
};

struct Avx2 {
  static constexpr int kW = 8;
  using V = __m256;
  template <typename T>
  PYMESH_ATT_AVX2 static PYMESH_INLINE V load(const T* p) {
    if constexpr (std::is_same_v<T, float>) {
      return _mm256_loadu_ps(p);
    } else if constexpr (std::is_same_v<T, f16>) {
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    } else {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
    }
  }
  PYMESH_ATT_AVX2 static PYMESH_INLINE V zero() { return _mm256_setzero_ps(); }
  PYMESH_ATT_AVX2 static PYMESH_INLINE V set1(float x) { return _mm256_set1_ps(x); }
  PYMESH_ATT_AVX2 static PYMESH_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  PYMESH_ATT_AVX2 static PYMESH_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
  PYMESH_ATT_AVX2 static PYMESH_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  PYMESH_ATT_AVX2 static PYMESH_INLINE V max(V a, V b) { return _mm256_max_ps(a, b); }
  PYMESH_ATT_AVX2 static PYMESH_INLINE V min(V a, V b) { return _mm256_min_ps(a, b); }
  PYMESH_ATT_AVX2 static PYMESH_INLINE V loadf(const float* p) { return _mm256_loadu_ps(p); }
  PYMESH_ATT_AVX2 static PYMESH_INLINE void storef(float* p, V v) { _mm256_storeu_ps(p, v); }
  PYMESH_ATT_AVX2 static PYMESH_INLINE float hsum(V v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
  }
  PYMESH_ATT_AVX2 static PYMESH_INLINE float hmax(V v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
  }
  PYMESH_ATT_AVX2 static PYMESH_INLINE V pow2(V n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_castsi256_ps(e);
  }
  // The 8 lane sums of v[0..7], in order.
  PYMESH_ATT_AVX2 static PYMESH_INLINE V reduce(V* v) {
    const V u0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    const V u1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
  }
  static constexpr int slot_of(int p) { return p; }
};

#endif  // x86
}  // namespace pymesh
