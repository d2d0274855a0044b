// Decode attention for a ragged batch: one new token per row, each row a different
// sequence with its own KV cache and its own length.
//
// A worker batches the decode steps of many sessions: the projections run as one
// GEMM over every row, but each row attends over its own cache. Calling torch's
// attention once per row and block costs ~20 us of dispatch each; this kernel does
// every (row, kv head) pair in one call, and stores the row's new key and value in
// its cache first (so no copy per row in Python either).
//
// Layouts (elements of the dtype):
//   qkv   [rows, qkv_stride]: q (heads * d), then k (kv_heads * d), then v (kv_heads * d);
//         q and k already rotated
//   cache of a row's sequence, one block: position-major [max_tokens, 2, kv_heads, d]
//         (pymesh/model/kv_cache.py with batch 1): keys of position t at
//         t * 2 * kv_heads * d, values right after them
//   out   [rows, out_stride]: heads * d per row
//   caches, positions, limits: int64 [rows]: each row's cache address (this block's),
//         the position of its new token, and its cache's max_tokens
// Each row's query heads attend to positions [max(0, pos + 1 - window), pos] of its
// cache (window 0: no window). Accumulation in float32; one rounding per output.
//
// Paths (attention_vec.h): AVX-512F and AVX2+FMA vector kernels for head_dim a multiple of
// 16 / 8, picked at run time; otherwise the portable loops below. attention_limit_isa caps
// the path for tests.
#include <cmath>
#include <string>
#include <vector>

#include "attention_isa.h"
#include "common.h"
#include "kernels.h"

namespace pymesh {
namespace {

// Store head h's new key and value (from qkv) at position pos of the cache.
template <typename T>
PYMESH_INLINE void store_new_kv(const T* qkv, T* cache, int64_t pos, int64_t heads, int64_t kv_heads,
                                int64_t d, int64_t h, int64_t tok) {
  std::memcpy(cache + pos * tok + h * d, qkv + heads * d + h * d, sizeof(T) * d);
  std::memcpy(cache + pos * tok + kv_heads * d + h * d, qkv + heads * d + kv_heads * d + h * d,
              sizeof(T) * d);
}

#ifdef PYMESH_ATT_X86
#define ATT_NS att_avx512
#define ATT_ISA Avx512
#define ATT_TARGET PYMESH_ATT_AVX512
#include "attention_vec.h"
#undef ATT_NS
#undef ATT_ISA
#undef ATT_TARGET
#define ATT_NS att_avx2
#define ATT_ISA Avx2
#define ATT_TARGET PYMESH_ATT_AVX2
#include "attention_vec.h"
#undef ATT_NS
#undef ATT_ISA
#undef ATT_TARGET
#endif

enum class AttIsa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
int g_att_limit = 2;  // highest path allowed (tests lower it)

AttIsa att_isa() {
#ifdef PYMESH_ATT_X86
  static const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                             __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                           __builtin_cpu_supports("f16c");
  if (g_att_limit >= 2 && avx512) return AttIsa::kAvx512;
  if (g_att_limit >= 1 && avx2) return AttIsa::kAvx2;
#endif
  return AttIsa::kGeneric;
}

template <typename T>
PYMESH_INLINE float dot(const T* a, const float* b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += to_float(a[i]) * b[i];
  return s;
}

template <typename T>
PYMESH_INLINE void axpy(float* acc, float w, const T* v, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) acc[i] += w * to_float(v[i]);
}

// One (row, kv head): store the head's new k and v, then attend with its `group` query heads.
template <typename T>
void attend_one(T* out, const T* qkv, T* cache, int64_t pos, int64_t heads, int64_t kv_heads,
                int64_t d, int64_t window, float scale, int64_t h, std::vector<float>& scores,
                std::vector<float>& qf, std::vector<float>& acc) {
  const int64_t group = heads / kv_heads;
  const int64_t tok = 2 * kv_heads * d;  // elements per position in the cache
  store_new_kv(qkv, cache, pos, heads, kv_heads, d, h, tok);
  const int64_t lo = window > 0 && pos + 1 > window ? pos + 1 - window : 0;
  const int64_t n = pos + 1 - lo;
  scores.resize(static_cast<size_t>(group * n));
  qf.resize(static_cast<size_t>(group * d));
  acc.resize(static_cast<size_t>(d));
  for (int64_t g = 0; g < group; ++g) {
    const T* q = qkv + (h * group + g) * d;
    for (int64_t i = 0; i < d; ++i) qf[g * d + i] = to_float(q[i]) * scale;
  }
  for (int64_t t = 0; t < n; ++t) {
    const T* k = cache + (lo + t) * tok + h * d;
    for (int64_t g = 0; g < group; ++g) scores[g * n + t] = dot(k, &qf[g * d], d);
  }
  for (int64_t g = 0; g < group; ++g) {
    float* s = &scores[g * n];
    float m = s[0];
    for (int64_t t = 1; t < n; ++t) m = s[t] > m ? s[t] : m;
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < n; ++t) {
      s[t] = exp_approx(s[t] - m);
      sum += s[t];
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < d; ++i) acc[i] = 0.0f;
    for (int64_t t = 0; t < n; ++t) {
      const T* v = cache + (lo + t) * tok + kv_heads * d + h * d;
      axpy(acc.data(), s[t], v, d);
    }
    T* o = out + (h * group + g) * d;
    for (int64_t i = 0; i < d; ++i) o[i] = from_float<T>(acc[i] * inv);
  }
}

template <typename T>
void decode_attention_impl(uintptr_t out, int64_t out_stride, uintptr_t qkv, int64_t qkv_stride,
                           const int64_t* caches, const int64_t* positions, int64_t rows,
                           int64_t heads, int64_t kv_heads, int64_t d, int64_t window,
                           float scale, int threads) {
  T* o = reinterpret_cast<T*>(out);
  const T* x = reinterpret_cast<const T*>(qkv);
  int64_t longest = 1;
  for (int64_t r = 0; r < rows; ++r) longest = positions[r] + 1 > longest ? positions[r] + 1 : longest;
  // bytes read: each pair reads its head's keys and values over the row's length
  const int64_t work = rows * longest * 2 * kv_heads * d * static_cast<int64_t>(sizeof(T));
  const int t = threads_for(work, threads, int64_t{256} << 10);
  using Attend = void (*)(T*, const T*, T*, int64_t, int64_t, int64_t, int64_t, int64_t, float,
                         int64_t, std::vector<float>&, std::vector<float>&, std::vector<float>&);
  Attend attend = &attend_one<T>;
#ifdef PYMESH_ATT_X86
  const AttIsa isa = att_isa();
  if (isa == AttIsa::kAvx512 && d % Avx512::kW == 0) attend = &att_avx512::attend<T>;
  else if (isa >= AttIsa::kAvx2 && d % Avx2::kW == 0) attend = &att_avx2::attend<T>;
#endif
  parallel_for_dynamic(rows * kv_heads, 1, t, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, qf, acc;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / kv_heads, h = i % kv_heads;
      attend(o + r * out_stride, x + r * qkv_stride, reinterpret_cast<T*>(caches[r]),
                    positions[r], heads, kv_heads, d, window, scale, h, scores, qf, acc);
    }
  });
}

}  // namespace

void attention_limit_isa(const std::string& name) {
  if (name == "avx512") g_att_limit = 2;
  else if (name == "avx2") g_att_limit = 1;
  else if (name == "generic") g_att_limit = 0;
  else bad_argument("attention_limit_isa: unknown path '" + name + "' (expected avx512, avx2 or generic)");
}

std::string attention_isa() {
  switch (att_isa()) {
    case AttIsa::kAvx512: return "avx512";
    case AttIsa::kAvx2: return "avx2";
    default: return "generic";
  }
}

void decode_attention_cpu(uintptr_t out, int64_t out_stride, uintptr_t qkv, int64_t qkv_stride,
                          uintptr_t caches, uintptr_t positions, uintptr_t limits, int64_t rows,
                          int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t window,
                          double scale, int dtype, int threads) {
  check_dtype(dtype);
  if (rows < 0 || heads < 1 || kv_heads < 1 || heads % kv_heads != 0 || head_dim < 1 || window < 0)
    bad_argument("decode_attention: need rows >= 0, kv_heads dividing heads, head_dim >= 1, window >= 0");
  if (out_stride < heads * head_dim || qkv_stride < (heads + 2 * kv_heads) * head_dim)
    bad_argument("decode_attention: row strides are shorter than a row");
  const int64_t* cache_ptrs = reinterpret_cast<const int64_t*>(caches);
  const int64_t* pos = reinterpret_cast<const int64_t*>(positions);
  const int64_t* lim = reinterpret_cast<const int64_t*>(limits);
  for (int64_t r = 0; r < rows; ++r) {
    if (pos[r] < 0 || pos[r] >= lim[r])
      bad_argument("decode_attention: row " + std::to_string(r) + " is at position " +
                   std::to_string(pos[r]) + ", outside its cache of " + std::to_string(lim[r]) +
                   " positions");
    if (cache_ptrs[r] == 0) bad_argument("decode_attention: row " + std::to_string(r) + " has no cache");
  }
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    decode_attention_impl<T>(out, out_stride, qkv, qkv_stride, cache_ptrs, pos, rows, heads, kv_heads,
                             head_dim, window, static_cast<float>(scale), threads);
  });
}

}  // namespace pymesh
