// Shared helpers of pymesh's CPU kernels: dtype codes, scalar conversions,
// a vectorisable exp, and the thread-splitting helper.
//
// Kernels take raw pointers and element strides from Python (no libtorch).
// Every kernel accumulates in float32 and rounds once per stored element,
// the way the pure-torch reference in pymesh/model/ops_ref.py does.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>

#include <thread>

#include "pool.h"

// One implementation per ISA level, picked at load time by the dynamic loader
// (GCC function multiversioning). Never -march=native: wheels must stay portable.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PYMESH_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PYMESH_CLONES
#endif
#define PYMESH_INLINE inline __attribute__((always_inline))

namespace pymesh {

// Dtype codes shared with pymesh/model/ops.py (_DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct bf16 {
  uint16_t bits;
};
using f16 = _Float16;

PYMESH_INLINE float to_float(float v) { return v; }
PYMESH_INLINE float to_float(f16 v) { return static_cast<float>(v); }
PYMESH_INLINE float to_float(bf16 v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <typename T>
PYMESH_INLINE T from_float(float v);
template <>
PYMESH_INLINE float from_float<float>(float v) { return v; }
template <>
PYMESH_INLINE f16 from_float<f16>(float v) { return static_cast<f16>(v); }
template <>
PYMESH_INLINE bf16 from_float<bf16>(float v) {
  // Round to nearest even, as torch does; NaN stays a (quiet) NaN.
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  uint32_t nan = (u & 0x7fffffffu) > 0x7f800000u;
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  uint32_t quiet = (u >> 16) | 0x40u;
  return bf16{static_cast<uint16_t>(nan ? quiet : rounded)};
}

// Round a float32 value to T and back: the value torch holds after `.to(T)`.
template <typename T>
PYMESH_INLINE float round_to(float v) { return to_float(from_float<T>(v)); }

// exp(x) for float32, ~2 ulp on the clamped range, branch-free so that loops
// calling it vectorise (glibc's expf does not, without -ffast-math).
PYMESH_INLINE float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  float n = (x * 1.44269504088896341f + magic) - magic;
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof scale);
  return p * scale;
}

// Threads the kernels use when Python passes threads <= 0 (set_num_threads).
inline int& default_threads() {
  static int n = [] {
    unsigned hw = std::thread::hardware_concurrency();
    return hw == 0 ? 1 : static_cast<int>(hw);
  }();
  return n;
}
inline int max_threads() { return default_threads(); }

// Run fn(begin, end) over [0, n) in chunks of `grain` on the calling thread
// plus up to threads - 1 pool helpers (pool.h: a helper that is late, because
// the machine is busy, never holds the caller up).
template <typename Fn>
void parallel_for_dynamic(int64_t n, int64_t grain, int threads, Fn&& fn) {
  if (grain < 1) grain = 1;
  const int64_t chunks = (n + grain - 1) / grain;
  if (threads > chunks) threads = static_cast<int>(chunks);
  if (threads <= 1) {
    if (n > 0) fn(int64_t{0}, n);
    return;
  }
  pool_run(chunks, threads - 1, [&](int64_t c) {
    const int64_t begin = c * grain;
    fn(begin, begin + grain < n ? begin + grain : n);
  });
}

// The same with about four chunks per thread.
template <typename Fn>
void parallel_for(int64_t n, int threads, Fn&& fn) {
  const int64_t parts = static_cast<int64_t>(threads > 1 ? threads : 1) * 4;
  parallel_for_dynamic(n, (n + parts - 1) / parts, threads, fn);
}

// Threads worth using for `work_bytes` touched. Waking a sleeping helper costs
// ~10-25 us (more when the other cores are busy), so each thread must get at
// least `per_thread` bytes.
constexpr int64_t kElementwisePerThread = int64_t{2} << 20;
constexpr int64_t kGemvPerThread = int64_t{2} << 20;

PYMESH_INLINE int threads_for(int64_t work_bytes, int requested,
                              int64_t per_thread = kElementwisePerThread) {
  int t = requested > 0 ? requested : max_threads();
  int64_t by_work = work_bytes / per_thread;
  if (by_work < t) t = static_cast<int>(by_work);
  return t < 1 ? 1 : t;
}

[[noreturn]] inline void bad_argument(const std::string& what) { throw std::invalid_argument(what); }

inline void check_dtype(int dtype) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    bad_argument("pymesh._C: unknown dtype code " + std::to_string(dtype) +
                 " (expected 0=float32, 1=float16, 2=bfloat16)");
}

// The one of three per-dtype functions that matches T (float, f16, bf16).
template <typename T, typename F32, typename F16, typename BF16>
constexpr auto pick(F32 for_f32, F16 for_f16, BF16 for_bf16) {
  if constexpr (std::is_same_v<T, float>) return for_f32;
  else if constexpr (std::is_same_v<T, f16>) return for_f16;
  else return for_bf16;
}

// Call fn(T{}) with T the C++ type of a dtype code.
template <typename Fn>
void dispatch_dtype(int dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32: fn(float{}); break;
    case kFloat16: fn(f16{}); break;
    case kBFloat16: fn(bf16{}); break;
    default: check_dtype(dtype);
  }
}

}  // namespace pymesh
