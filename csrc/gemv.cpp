// Decode-path linear layer (GEMV / skinny GEMM), CPU: y = x @ W^T + b for
// x of 1..32 rows and W [out, in] row-major, float32 / float16 / bfloat16.
//
// Decode is bound by reading the weight, so the kernel streams W exactly once:
// threads claim chunks of output rows; a block of NB output rows is walked in
// 64-byte steps with NB x R accumulators (R = rows of x), x staying in L1/L2.
// Above 8 rows (sessions batched into one step) x is cut into tiles of 4..6
// rows; each block of NB weight rows is read from memory by the first tile and
// from L1/L2 by the others, so W still crosses the memory bus once. AVX-512 FMA with software prefetch; bfloat16 uses vdpbf16ps where
// the CPU has avx512_bf16 (32 products per instruction), otherwise the
// shift-to-float32 trick. A portable fallback covers CPUs without AVX-512.
#include <immintrin.h>

#include <cstdlib>
#include <type_traits>
#include <vector>

#include "common.h"
#include "kernels.h"

namespace pymesh {
namespace {

constexpr int kMaxRows = 32;
#ifndef PYMESH_GEMV_MAX_TILE
#define PYMESH_GEMV_MAX_TILE 6  // 6 x 4 accumulators + 4 weights + x: 29 of 32 zmm
#endif
constexpr int kMaxTile = PYMESH_GEMV_MAX_TILE;  // rows of x per register tile above 8 rows
// Weight bytes per thread below which a GEMV runs on the calling thread alone, while the
// pool's helper is awake (PYMESH_GEMV_MIN_KB, default 256); else common.h's kGemvPerThread.
int64_t gemv_min_per_thread() {
  static const int64_t v = [] {
    const char* e = std::getenv("PYMESH_GEMV_MIN_KB");
    return (e && *e ? std::strtoll(e, nullptr, 10) : 256) << 10;
  }();
  return v;
}
#ifndef PYMESH_GEMV_PREFETCH
#define PYMESH_GEMV_PREFETCH 512
#endif
#ifndef PYMESH_GEMV_NB1
#define PYMESH_GEMV_NB1 4
#endif
#ifndef PYMESH_GEMV_NB_MID
#define PYMESH_GEMV_NB_MID 3
#endif
#ifndef PYMESH_GEMV_NB_HIGH
#define PYMESH_GEMV_NB_HIGH 3
#endif
#ifndef PYMESH_GEMV_NB_TILE
#define PYMESH_GEMV_NB_TILE 4  // weight rows per block above 8 rows of x
#endif
constexpr int64_t kPrefetch = PYMESH_GEMV_PREFETCH;  // bytes ahead of the current load, per weight row

#define PYMESH_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define PYMESH_AVX512BF16 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,avx512bf16")))

// 16 weights of type WT as float32 (full or masked).
template <typename WT>
PYMESH_AVX512 PYMESH_INLINE __m512 load_w(const WT* p);
template <typename WT>
PYMESH_AVX512 PYMESH_INLINE __m512 load_w_mask(const WT* p, __mmask16 m);

template <>
PYMESH_AVX512 PYMESH_INLINE __m512 load_w<float>(const float* p) { return _mm512_loadu_ps(p); }
template <>
PYMESH_AVX512 PYMESH_INLINE __m512 load_w_mask<float>(const float* p, __mmask16 m) {
  return _mm512_maskz_loadu_ps(m, p);
}
template <>
PYMESH_AVX512 PYMESH_INLINE __m512 load_w<f16>(const f16* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <>
PYMESH_AVX512 PYMESH_INLINE __m512 load_w_mask<f16>(const f16* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}
template <>
PYMESH_AVX512 PYMESH_INLINE __m512 load_w<bf16>(const bf16* p) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}
template <>
PYMESH_AVX512 PYMESH_INLINE __m512 load_w_mask<bf16>(const bf16* p, __mmask16 m) {
  __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// NB output rows starting at W, R rows of float32 x (row stride ldx):
// out[j * R + r] = dot(W[j], x[r]).
template <typename WT, int R, int NB, bool PF = true>
PYMESH_AVX512 void dot_block_avx512(const WT* W, int64_t K, const float* X, int64_t ldx,
                                    float* out) {
  __m512 acc[NB][R];
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
  constexpr int64_t ahead = PF ? kPrefetch / static_cast<int64_t>(sizeof(WT)) : 0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 w[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      if (ahead > 0) _mm_prefetch(reinterpret_cast<const char*>(W + j * K + k + ahead), _MM_HINT_T0);
      w[j] = load_w<WT>(W + j * K + k);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m512 xv = _mm512_loadu_ps(X + r * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) acc[j][r] = _mm512_fmadd_ps(w[j], xv, acc[j][r]);
    }
  }
  if (k < K) {
    __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1u);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m512 xv = _mm512_maskz_loadu_ps(m, X + r * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j)
        acc[j][r] = _mm512_fmadd_ps(load_w_mask<WT>(W + j * K + k, m), xv, acc[j][r]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) out[j * R + r] = _mm512_reduce_add_ps(acc[j][r]);
}

// bfloat16 weights and bfloat16 x with vdpbf16ps (pairs of products, exact in float32).
template <int R, int NB, bool PF = true>
PYMESH_AVX512BF16 void dot_block_bf16dp(const bf16* W, int64_t K, const bf16* X, int64_t ldx,
                                        float* out) {
  __m512 acc[NB][R];
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
  constexpr int64_t ahead = PF ? kPrefetch / 2 : 0;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i w[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      if (ahead > 0) _mm_prefetch(reinterpret_cast<const char*>(W + j * K + k + ahead), _MM_HINT_T0);
      w[j] = _mm512_loadu_si512(W + j * K + k);
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m512i xv = _mm512_loadu_si512(X + r * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j)
        acc[j][r] = _mm512_dpbf16_ps(acc[j][r], (__m512bh)w[j], (__m512bh)xv);
    }
  }
  if (k < K) {
    __mmask32 m = static_cast<__mmask32>((uint64_t{1} << (K - k)) - 1u);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m512i xv = _mm512_maskz_loadu_epi16(m, X + r * ldx + k);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) {
        __m512i wv = _mm512_maskz_loadu_epi16(m, W + j * K + k);
        acc[j][r] = _mm512_dpbf16_ps(acc[j][r], (__m512bh)wv, (__m512bh)xv);
      }
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) out[j * R + r] = _mm512_reduce_add_ps(acc[j][r]);
}

// Portable fallback: one output row at a time, vectorised by the compiler per ISA level.
template <typename WT>
PYMESH_INLINE void dot_rows_generic(const WT* W, int64_t K, const float* X, int64_t ldx, int R,
                                    float* out) {
  for (int r = 0; r < R; ++r) {
    const float* x = X + r * ldx;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t k = 0; k < K; ++k) s += to_float(W[k]) * x[k];
    out[r] = s;
  }
}
PYMESH_CLONES void dot_rows_generic_f32(const float* W, int64_t K, const float* X, int64_t ldx,
                                        int R, float* out) {
  dot_rows_generic<float>(W, K, X, ldx, R, out);
}
PYMESH_CLONES void dot_rows_generic_f16(const f16* W, int64_t K, const float* X, int64_t ldx,
                                        int R, float* out) {
  dot_rows_generic<f16>(W, K, X, ldx, R, out);
}
PYMESH_CLONES void dot_rows_generic_bf16(const bf16* W, int64_t K, const float* X, int64_t ldx,
                                         int R, float* out) {
  dot_rows_generic<bf16>(W, K, X, ldx, R, out);
}
PYMESH_INLINE void dot_rows_generic_any(const float* W, int64_t K, const float* X, int64_t ldx,
                                        int R, float* out) {
  dot_rows_generic_f32(W, K, X, ldx, R, out);
}
PYMESH_INLINE void dot_rows_generic_any(const f16* W, int64_t K, const float* X, int64_t ldx,
                                        int R, float* out) {
  dot_rows_generic_f16(W, K, X, ldx, R, out);
}
PYMESH_INLINE void dot_rows_generic_any(const bf16* W, int64_t K, const float* X, int64_t ldx,
                                        int R, float* out) {
  dot_rows_generic_bf16(W, K, X, ldx, R, out);
}

enum class Path { kAvx512, kBf16Dot, kGeneric };

struct Problem {
  const void* W;
  const void* X;  // float32 rows for kAvx512 / kGeneric, bfloat16 rows for kBf16Dot
  int64_t ldx;
  void* Y;
  const void* bias;
  int64_t K, N;
};

// Write NB x R dot products (plus bias) to y[r0 + r, n0 + j] in T.
template <typename T>
inline void store_block(const Problem& p, int64_t n0, int nb, int R, const float* dots,
                        int64_t r0 = 0) {
  T* Y = static_cast<T*>(p.Y) + r0 * p.N;
  const T* bias = static_cast<const T*>(p.bias);
  for (int j = 0; j < nb; ++j) {
    float b = bias ? to_float(bias[n0 + j]) : 0.0f;
    for (int r = 0; r < R; ++r) Y[r * p.N + n0 + j] = from_float<T>(dots[j * R + r] + b);
  }
}

template <typename T, int R>
void run_rows(const Problem& p, Path path, int64_t n_begin, int64_t n_end) {
  // Output rows per block: NB * R accumulators + NB weight registers fit in 32 zmm.
  constexpr int NB = R == 1 ? PYMESH_GEMV_NB1
                            : (R <= 2 ? 4 : (R <= 4 ? PYMESH_GEMV_NB_MID : PYMESH_GEMV_NB_HIGH));
  float dots[NB * R];
  const T* W = static_cast<const T*>(p.W);
  int64_t n = n_begin;
  if constexpr (std::is_same_v<T, bf16>) {
    if (path == Path::kBf16Dot) {
      const bf16* X = static_cast<const bf16*>(p.X);
      for (; n + NB <= n_end; n += NB) {
        dot_block_bf16dp<R, NB>(W + n * p.K, p.K, X, p.ldx, dots);
        store_block<T>(p, n, NB, R, dots);
      }
      for (; n < n_end; ++n) {
        dot_block_bf16dp<R, 1>(W + n * p.K, p.K, X, p.ldx, dots);
        store_block<T>(p, n, 1, R, dots);
      }
      return;
    }
  }
  const float* X = static_cast<const float*>(p.X);
  for (; n + NB <= n_end; n += NB) {
    dot_block_avx512<T, R, NB>(W + n * p.K, p.K, X, p.ldx, dots);
    store_block<T>(p, n, NB, R, dots);
  }
  for (; n < n_end; ++n) {
    dot_block_avx512<T, R, 1>(W + n * p.K, p.K, X, p.ldx, dots);
    store_block<T>(p, n, 1, R, dots);
  }
}

// NB output rows from n times the R rows of x from r0 (one register tile), stored.
template <typename T, int R, int NB, bool PF>
void run_tile(const Problem& p, Path path, int64_t n, int64_t r0) {
  float dots[NB * R];
  const T* W = static_cast<const T*>(p.W) + n * p.K;
  if constexpr (std::is_same_v<T, bf16>) {
    if (path == Path::kBf16Dot) {
      dot_block_bf16dp<R, NB, PF>(W, p.K, static_cast<const bf16*>(p.X) + r0 * p.ldx, p.ldx, dots);
      store_block<T>(p, n, NB, R, dots, r0);
      return;
    }
  }
  dot_block_avx512<T, R, NB, PF>(W, p.K, static_cast<const float*>(p.X) + r0 * p.ldx, p.ldx, dots);
  store_block<T>(p, n, NB, R, dots, r0);
}

using TileFn = void (*)(const Problem&, Path, int64_t, int64_t);

// The tile kernel for R in 4..kMaxTile rows: the first tile of a block prefetches
// the weight rows from memory, the others find them in L1/L2.
template <typename T, int NB, bool PF>
TileFn tile_fn(int R) {
  switch (R) {
    case 4: return run_tile<T, 4, NB, PF>;
    case 5: return run_tile<T, 5, NB, PF>;
    case 6: return run_tile<T, 6, NB, PF>;
    case 7: return run_tile<T, 7, NB, PF>;
    default: return run_tile<T, 8, NB, PF>;
  }
}

// More than 8 rows: ceil(R / kMaxTile) tiles of near-equal size (>= 4 rows: enough
// independent accumulators to hide the FMA latency), each walking the same block of
// NB weight rows before the next block starts.
template <typename T>
void run_tiles(const Problem& p, Path path, int R, int64_t n_begin, int64_t n_end) {
  constexpr int NB = PYMESH_GEMV_NB_TILE;
  const int tiles = (R + kMaxTile - 1) / kMaxTile;
  const int small = R / tiles, big_tiles = R % tiles;  // the first big_tiles get small + 1
  TileFn first[2] = {tile_fn<T, NB, true>(small), tile_fn<T, NB, true>(small + 1)};
  TileFn rest[2] = {tile_fn<T, NB, false>(small), tile_fn<T, NB, false>(small + 1)};
  TileFn first1[2] = {tile_fn<T, 1, true>(small), tile_fn<T, 1, true>(small + 1)};
  TileFn rest1[2] = {tile_fn<T, 1, false>(small), tile_fn<T, 1, false>(small + 1)};
  int64_t n = n_begin;
  for (; n < n_end;) {
    const bool whole = n + NB <= n_end;
    int64_t r0 = 0;
    for (int t = 0; t < tiles; ++t) {
      const int big = t < big_tiles ? 1 : 0;
      (whole ? (t == 0 ? first : rest) : (t == 0 ? first1 : rest1))[big](p, path, n, r0);
      r0 += small + big;
    }
    n += whole ? NB : 1;
  }
}

// The portable path for any R: one output row at a time.
template <typename T>
void run_generic(const Problem& p, int R, int64_t n_begin, int64_t n_end) {
  float dots[kMaxRows];
  const T* W = static_cast<const T*>(p.W);
  for (int64_t n = n_begin; n < n_end; ++n) {
    dot_rows_generic_any(W + n * p.K, p.K, static_cast<const float*>(p.X), p.ldx, R, dots);
    store_block<T>(p, n, 1, R, dots);
  }
}

template <typename T>
void run_rows_any(const Problem& p, Path path, int R, int64_t b, int64_t e) {
  if (path == Path::kGeneric) return run_generic<T>(p, R, b, e);
  switch (R) {
    case 1: run_rows<T, 1>(p, path, b, e); break;
    case 2: run_rows<T, 2>(p, path, b, e); break;
    case 3: run_rows<T, 3>(p, path, b, e); break;
    case 4: run_rows<T, 4>(p, path, b, e); break;
    case 5: run_rows<T, 5>(p, path, b, e); break;
    case 6: run_rows<T, 6>(p, path, b, e); break;
    case 7: run_rows<T, 7>(p, path, b, e); break;
    case 8: run_rows<T, 8>(p, path, b, e); break;
    default: run_tiles<T>(p, path, R, b, e); break;
  }
}

// Highest code path allowed (tests lower it to cover every path on one CPU).
int g_path_limit = 2;  // 2: avx512 + avx512_bf16, 1: avx512, 0: generic

bool cpu_has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") &&
                          __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return yes && g_path_limit >= 1;
}
bool cpu_has_avx512bf16() {
  static const bool yes = __builtin_cpu_supports("avx512bf16");
  return yes && cpu_has_avx512() && g_path_limit >= 2;
}

// Sum of n floats: the streaming-read ceiling the GEMV is measured against.
PYMESH_AVX512 float sum_avx512(const float* p, int64_t n) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    a0 = _mm512_add_ps(a0, _mm512_loadu_ps(p + i));
    a1 = _mm512_add_ps(a1, _mm512_loadu_ps(p + i + 16));
    a2 = _mm512_add_ps(a2, _mm512_loadu_ps(p + i + 32));
    a3 = _mm512_add_ps(a3, _mm512_loadu_ps(p + i + 48));
  }
  float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
  for (; i < n; ++i) s += p[i];
  return s;
}
PYMESH_CLONES float sum_generic(const float* p, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += p[i];
  return s;
}

}  // namespace

double read_sum(uintptr_t data, int64_t n, int threads) {
  const float* p = reinterpret_cast<const float*>(data);
  const bool wide = cpu_has_avx512();
  const int64_t grain = (int64_t{256} << 10) / 4;  // same 256 KiB chunks as the GEMV
  const int64_t chunks = (n + grain - 1) / grain;
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
  parallel_for_dynamic(n, grain, threads_for(n * 4, threads, kGemvPerThread),
                       [&](int64_t b, int64_t e) {
                         partial[b / grain] = wide ? sum_avx512(p + b, e - b)
                                                   : sum_generic(p + b, e - b);
                       });
  double total = 0.0;
  for (double v : partial) total += v;
  return total;
}

#ifndef PYMESH_GEMV_GROUP
#define PYMESH_GEMV_GROUP 8
#endif
constexpr int64_t kGroup = PYMESH_GEMV_GROUP;  // output rows per unit of work split between threads

int linear_max_rows() { return kMaxRows; }

void linear_limit_isa(const std::string& name) {
  if (name == "avx512+avx512_bf16") g_path_limit = 2;
  else if (name == "avx512") g_path_limit = 1;
  else if (name == "generic") g_path_limit = 0;
  else bad_argument("linear_limit_isa: unknown path '" + name +
                    "' (expected avx512+avx512_bf16, avx512 or generic)");
}

std::string linear_isa() {
  if (cpu_has_avx512bf16()) return "avx512+avx512_bf16";
  if (cpu_has_avx512()) return "avx512";
  return "generic";
}

void linear_cpu(uintptr_t y, uintptr_t x, int64_t x_stride, uintptr_t weight, uintptr_t bias,
                int64_t rows, int64_t in_features, int64_t out_features, int dtype, int threads) {
  if (rows < 1 || rows > kMaxRows)
    bad_argument("linear: the GEMV kernel takes 1.." + std::to_string(kMaxRows) +
                 " rows, got " + std::to_string(rows) + "; use torch for larger batches");
  if (in_features <= 0 || out_features <= 0)
    bad_argument("linear: in_features and out_features must be positive");
  if (rows > 1 && x_stride < in_features)
    bad_argument("linear: x row stride " + std::to_string(x_stride) + " < in_features " +
                 std::to_string(in_features));
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    Problem p{reinterpret_cast<const void*>(weight), nullptr, 0,
              reinterpret_cast<void*>(y), reinterpret_cast<const void*>(bias),
              in_features, out_features};
    Path path = cpu_has_avx512() ? Path::kAvx512 : Path::kGeneric;
    std::vector<float> xf;
    if (std::is_same_v<T, bf16> && cpu_has_avx512bf16()) {
      path = Path::kBf16Dot;
      p.X = reinterpret_cast<const void*>(x);
      p.ldx = x_stride;
    } else if (std::is_same_v<T, float>) {
      p.X = reinterpret_cast<const void*>(x);
      p.ldx = x_stride;
    } else {
      // x is tiny next to W: convert it to float32 once.
      const T* xs = reinterpret_cast<const T*>(x);
      xf.resize(static_cast<size_t>(rows * in_features));
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < in_features; ++k)
          xf[r * in_features + k] = to_float(xs[r * x_stride + k]);
      p.X = xf.data();
      p.ldx = in_features;
    }
    int64_t bytes = out_features * in_features * static_cast<int64_t>(sizeof(T));
    // One core streams ~25 GB/s, two ~45 (DRAM latency per core bounds it), so even a
    // 300 KiB matrix is worth splitting: the pool's helper spins between kernels. Each
    // row of x beyond the first adds about half a weight read's time (FMA-bound).
    int64_t work = bytes + bytes * (rows - 1) / 2;
    int t = threads_for(work, threads, pool_helpers_reliable() ? gemv_min_per_thread()
                                                               : kGemvPerThread);
    // Split output rows in groups of kGroup so the kernel's row blocks stay whole.
    int64_t groups = (out_features + kGroup - 1) / kGroup;
    int R = static_cast<int>(rows);
    auto run = [&](int64_t b, int64_t e) {
      int64_t n1 = e * kGroup < out_features ? e * kGroup : out_features;
      run_rows_any<T>(p, path, R, b * kGroup, n1);
    };
#ifdef PYMESH_GEMV_STATIC
    parallel_for(groups, t, run);
#else
    // About 8 chunks per thread (so a late helper costs little), each >= 32 KiB of
    // weight and <= 256 KiB: long enough contiguous runs for the hardware prefetcher.
    int64_t group_bytes = kGroup * in_features * static_cast<int64_t>(sizeof(T));
    int64_t chunk_bytes = bytes / (8 * int64_t{t});
    if (chunk_bytes < (int64_t{32} << 10)) chunk_bytes = int64_t{32} << 10;
    if (chunk_bytes > (int64_t{256} << 10)) chunk_bytes = int64_t{256} << 10;
    int64_t grain = chunk_bytes / group_bytes;
    parallel_for_dynamic(groups, grain < 1 ? 1 : grain, t, run);
#endif
  });
}

}  // namespace pymesh
