// Quantized linear layer, CPU: y [rows, out] = x [rows, in] @ dequant(W)^T + b, for W in
// GGUF's block formats (pymesh/model/quant.py: q8_0, q4_0, q4_1; 32 input features per
// block, one row of blocks per output feature) and x / y / b in float32, float16 or bfloat16.
//
// q4_0 / q4_1: activations are quantized first, as llama.cpp does: each block of 32 values
// of a row of x becomes int8 q = round(x * (127 / amax)) (nearest even) with a float32 scale
// dx = amax / 127 (qgemv.h; the test's torch reference does exactly the same), then
//   q4_0: nibbles q (unsigned) . x via vpdpbusd seeded with -8 * sum(x)  -> sum (q - 8) x
//   q4_1: nibbles q . x, plus m * dx * sum(x) as a float FMA             -> sum (d q + m) x
// and each int32 lane is scaled by dw * dx of its block into a float32 accumulator. On
// AVX-512 VNNI (qgemv_q4.cpp) each weight row is read as a byte stream in 64-byte chunks
// with x laid out to face the nibbles (+12-17 % at rows = 1 over reading pairs of blocks,
// same speed at 4 and 32 rows). The AVX2 and scalar paths (this file) read pairs of blocks,
// x stored per pair (XPair) as [b0 e0-15 | b1 e0-15 | b0 e16-31 | b1 e16-31], the order the
// low and high nibbles of two blocks give for free.
// q8_0 (qgemv_q8.cpp): float32 activations, weights converted to float32 (d * q is exact in
// float32) and FMA'd; the choice per type is measured below.
//
// Paths: AVX-512 (VNNI for q4), AVX2 (+FMA; vpmaddubsw + vpmaddwd for q4) and portable
// scalar code; qlinear_limit_isa caps the path for tests. Threads split output rows (groups
// of 8, ~32-256 KiB chunks, as linear_cpu). A block of NB weight rows is walked once with
// all rows of x in register tiles of <= 4 (AVX-512) or 2 (AVX2): the first tile reads W from
// memory, the others from L1, so W crosses the bus once per call for up to 256 rows (more
// rows go in blocks of 256). With more rows than a tile, the AVX-512 q4 path decodes each
// block of weight rows once into a per-thread buffer that every tile reads.
//
// Now (AVX-512, 1 thread, 3072x576 in L2/L3, GB/s of weight at rows 1 / 4 / 32; same run):
//   q4_0 20.6 / 7.5 / 1.1   q4_1 18.2 / 6.9 / 1.1   q8_0 17.9 / 9.5 / 1.2
// 2 threads (`pymesh bench kernels --ops qlinear`, medians, load ~1.2): rows = 1 on SmolLM2's
// block shapes 24-29 GB/s (in L2/L3); on the 49152x576 head and Llama-3.2-1B's (DRAM)
// 12-24 GB/s, best samples 16-26, against a read_sum ceiling of 25.6 in that run.
// Per-call overhead at rows = 1 (preparing x): ~1 us at in = 576, 1.5 us at 1536.
//
// The choice of activations per type, measured on this machine (AMD EPYC, avx512_vnni/bf16,
// 2 cores shared with other work, load 1-2; best of 7 x 20 calls), GB/s at rows = 1:
//   q4_0, q4_1, 1 thread        3072x576 (L2/L3)   49152x576 (DRAM)
//     int8 x, pairs of blocks     15.6 / 13.7        15.5 / 13.7  (byte stream: 18.3 / 16.2 in L2)
//     float x (a prototype, dropped) 8.4 / 8.6        8.2 /  8.4
//   q8_0, 2 threads, same build pair run back to back:
//     int8 x (xor 0x80 + vpdpbusd) 57.2 (r=4: 23.3)   21.2
//     float x (qgemv_q8.cpp)       37.5 (r=4: 19.7)   20.1
// Accuracy (rel. RMS vs the float-x result, 1536x576, x with a few 20x outlier channels):
// int8 x adds 1.1e-2 for every type; the weight quantization itself is 8e-2 for q4_0 / q4_1
// but 5e-3 for q8_0. So the q4 types take int8 x (1.6-1.8x faster, error 7x below the
// weight's own), and q8_0 keeps float x: within 5 % where DRAM-bound (the LM head, whole
// models) and 2.4x lower total error (5e-3 vs 1.2e-2), at 2/3 of the int8 speed in cache.
#include <immintrin.h>

#include <cmath>
#include <cstdlib>
#include <vector>

#include "common.h"
#include "kernels.h"
#include "qgemv.h"

namespace pymesh {
namespace {

using namespace qgemv;  // NOLINT: the shared types of the quantized kernels
constexpr int64_t kQBlock = 32;

// Two consecutive 32-blocks of one row of x, quantized.
struct alignas(64) XPair {
  int8_t q[64];
  float dx[16];  // per int32 lane: dx of the block the lane's 4 bytes belong to
  // q4_0: -8 times the lane's sum of q (vpdpbusd's seed); q4_1: dx times the lane's sum
  // of q (float), for the m term.
  union {
    int32_t i[16];
    float f[16];
  } aux;
};

PYMESH_INLINE int lane_block(int lane) { return (lane / 4) & 1; }
PYMESH_INLINE int position(int b, int e) { return e < 16 ? b * 16 + e : 32 + b * 16 + (e - 16); }

// Quantize one row of x (in features, a multiple of 32) into (in / 32 + 1) / 2 pairs.
template <typename T>
void quantize_row(const T* x, int64_t in, int qtype, XPair* out) {
  const int64_t nb = in / kQBlock, pairs = (nb + 1) / 2;
  const int32_t seed = qtype == kQ4_0 ? -8 : 0;
  for (int64_t p = 0; p < pairs; ++p) {
    XPair& o = out[p];
    float dxb[2] = {0.0f, 0.0f};
    for (int b = 0; b < 2; ++b) {
      const int64_t blk = 2 * p + b;
      if (blk >= nb) {
        for (int e = 0; e < 32; ++e) o.q[position(b, e)] = 0;
        continue;
      }
      float v[32];
      int8_t q[32];
      for (int e = 0; e < 32; ++e) v[e] = to_float(x[blk * kQBlock + e]);
      dxb[b] = quantize_block(v, q);
      for (int e = 0; e < 32; ++e) o.q[position(b, e)] = q[e];
    }
    for (int l = 0; l < 16; ++l) {
      const float dx = dxb[lane_block(l)];
      const int32_t s = o.q[4 * l] + o.q[4 * l + 1] + o.q[4 * l + 2] + o.q[4 * l + 3];
      o.dx[l] = dx;
      if (qtype == kQ4_1) o.aux.f[l] = dx * static_cast<float>(s);
      else o.aux.i[l] = seed * s;
    }
  }
}

#define PYMESH_AVX2 __attribute__((target("avx2,fma,f16c")))

// The nibbles of the q4 blocks at blk and blk + BB: lo = [b0 e0-15 | b1 e0-15], hi = the
// elements 16-31 (HALF: b1's lanes read as 0).
template <int Q, bool HALF>
PYMESH_AVX2 PYMESH_INLINE void load_nibbles(const uint8_t* blk, __m256i& lo, __m256i& hi) {
  constexpr int64_t BB = kBlockBytes[Q];
  constexpr int off = Q == kQ4_1 ? 4 : 2;
  const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + off));
  const __m128i q1 = HALF ? _mm_setzero_si128()
                          : _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + BB + off));
  const __m256i t = _mm256_inserti128_si256(_mm256_castsi128_si256(q0), q1, 1);
  const __m256i low = _mm256_set1_epi8(0x0F);
  lo = _mm256_and_si256(t, low);
  hi = _mm256_and_si256(_mm256_srli_epi16(t, 4), low);
}

// ---------------------------------------------------------------- AVX2 (+FMA, F16C)

template <int Q, int R, int NB, bool HALF>
PYMESH_AVX2 PYMESH_INLINE void step256(const uint8_t* W, int64_t row_bytes, int64_t p,
                                       const uint8_t* X, int64_t ldx, __m256 (&acc)[NB][R]) {
  constexpr int64_t BB = kBlockBytes[Q];
  const __m256i ones = _mm256_set1_epi16(1);
#pragma GCC unroll 4
  for (int j = 0; j < NB; ++j) {
    const uint8_t* blk = W + j * row_bytes + p * 2 * BB;
    _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetch), _MM_HINT_T0);
    const float d0 = half_at(blk), d1 = HALF ? 0.0f : half_at(blk + BB);
    {
      __m256i lo, hi;
      load_nibbles<Q, HALF>(blk, lo, hi);
      const __m256 wd = _mm256_blend_ps(_mm256_set1_ps(d0), _mm256_set1_ps(d1), 0xF0);
      __m256 wm = _mm256_setzero_ps();
      if constexpr (Q == kQ4_1) {
        const float m0 = half_at(blk + 2), m1 = HALF ? 0.0f : half_at(blk + BB + 2);
        wm = _mm256_blend_ps(_mm256_set1_ps(m0), _mm256_set1_ps(m1), 0xF0);
      }
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const XPair& xp = reinterpret_cast<const XPair*>(X + r * ldx)[p];
        const __m256i x0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(xp.q));
        const __m256i x1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(xp.q + 32));
        __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_maddubs_epi16(hi, x1));
        __m256i s = _mm256_madd_epi16(s16, ones);
        const __m256 dx = _mm256_load_ps(xp.dx);
        if constexpr (Q == kQ4_0) {
          s = _mm256_add_epi32(s, _mm256_add_epi32(
                                      _mm256_load_si256(reinterpret_cast<const __m256i*>(xp.aux.i)),
                                      _mm256_load_si256(reinterpret_cast<const __m256i*>(xp.aux.i + 8))));
        }
        acc[j][r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(wd, dx), acc[j][r]);
        if constexpr (Q == kQ4_1) {
          __m256 sx = _mm256_add_ps(_mm256_load_ps(xp.aux.f), _mm256_load_ps(xp.aux.f + 8));
          acc[j][r] = _mm256_fmadd_ps(wm, sx, acc[j][r]);
        }
      }
    }
  }
}

PYMESH_AVX2 PYMESH_INLINE float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

template <int Q, int R, int NB>
PYMESH_AVX2 void kernel256(const uint8_t* W, int64_t row_bytes, int64_t nb, const uint8_t* X,
                           int64_t ldx, float* out) {
  const int64_t pairs = (nb + 1) / 2;
  const bool odd = (nb & 1) != 0;
  __m256 acc[NB][R];
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < R; ++r) acc[j][r] = _mm256_setzero_ps();
  const int64_t full = odd ? pairs - 1 : pairs;
  for (int64_t p = 0; p < full; ++p) step256<Q, R, NB, false>(W, row_bytes, p, X, ldx, acc);
  if (odd) step256<Q, R, NB, true>(W, row_bytes, full, X, ldx, acc);
  for (int j = 0; j < NB; ++j)
    for (int r = 0; r < R; ++r) out[j * R + r] = hsum256(acc[j][r]);
}

// ---------------------------------------------------------------- portable

template <int Q>
void kernel_generic(const uint8_t* W, int64_t, int64_t nb, const uint8_t* X, int64_t, float* out) {
  constexpr int64_t BB = kBlockBytes[Q];
  float total = 0.0f;
  for (int64_t blk = 0; blk < nb; ++blk) {
    const uint8_t* w = W + blk * BB;
    const XPair& xp = reinterpret_cast<const XPair*>(X)[blk / 2];
    const int b = static_cast<int>(blk & 1);
    int32_t dot = 0, sum = 0;
    for (int e = 0; e < 32; ++e) {
      const int32_t xq = xp.q[position(b, e)];
      const uint8_t byte = w[(Q == kQ4_1 ? 4 : 2) + (e & 15)];
      int32_t wq = e < 16 ? (byte & 0x0F) : (byte >> 4);
      if constexpr (Q == kQ4_0) wq -= 8;
      dot += wq * xq;
      sum += xq;
    }
    const float dx = xp.dx[4 * b];
    total += half_at(w) * dx * static_cast<float>(dot);
    if constexpr (Q == kQ4_1) total += half_at(w + 2) * dx * static_cast<float>(sum);
  }
  out[0] = total;
}

// ---------------------------------------------------------------- dispatch

int g_isa_limit = 2;

bool cpu_has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return yes;
}
bool cpu_has_vnni() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                          __builtin_cpu_supports("avx512vnni") && cpu_has_avx2();
  return yes;
}
Isa best_isa() {
  if (g_isa_limit >= 2 && cpu_has_vnni()) return Isa::kAvx512;
  if (g_isa_limit >= 1 && cpu_has_avx2()) return Isa::kAvx2;
  return Isa::kGeneric;
}

template <int Q>
Kernels kernels_for(Isa isa) {
  Kernels k;
  if (isa == Isa::kAvx512) return q4_stream_kernels(Q);
  if (isa == Isa::kAvx2) {
    k.nb = 2;
    k.tile = 2;
    k.full[0] = kernel256<Q, 1, 2>, k.full[1] = kernel256<Q, 2, 2>;
    k.one[0] = kernel256<Q, 1, 1>, k.one[1] = kernel256<Q, 2, 1>;
  } else {
    k.full[0] = k.one[0] = kernel_generic<Q>;
  }
  return k;
}

template <int Q>
const Kernels& kernels(Isa isa) {
  static const Kernels table[3] = {kernels_for<Q>(Isa::kGeneric), kernels_for<Q>(Isa::kAvx2),
                                   kernels_for<Q>(Isa::kAvx512)};
  return table[static_cast<int>(isa)];
}

struct Problem {
  const uint8_t* W;
  int64_t row_bytes, nb;
  const uint8_t* X;  // prepared rows of x (quantized pairs or float32), x_row_bytes apart
  int64_t x_row_bytes, rows;
  void* Y;
  const void* bias;
  int64_t N;
};

template <typename T>
void store(const Problem& p, int64_t n0, int nb, int64_t r0, int R, const float* dots) {
  T* Y = static_cast<T*>(p.Y);
  const T* bias = static_cast<const T*>(p.bias);
  for (int j = 0; j < nb; ++j) {
    const float b = bias ? to_float(bias[n0 + j]) : 0.0f;
    for (int r = 0; r < R; ++r) Y[(r0 + r) * p.N + n0 + j] = from_float<T>(dots[j * R + r] + b);
  }
}

// Output rows [n_begin, n_end): each block of NB weight rows meets every tile of x's rows.
template <typename T>
void run_range(const Problem& p, const Kernels& k, int64_t n_begin, int64_t n_end) {
  float dots[4 * 4];
  // More rows of x than a tile: decode each block of weight rows once, not once per tile.
  const bool pre = k.decode != nullptr && p.rows > k.tile;
  static thread_local std::vector<WChunk> wbuf;  // the calling pool thread's own
  const int64_t chunks = (p.row_bytes + 63) / 64;
  if (pre && static_cast<int64_t>(wbuf.size()) < k.nb * chunks)
    wbuf.resize(static_cast<size_t>(k.nb * chunks));
  for (int64_t n = n_begin; n < n_end;) {
    const bool whole = n + k.nb <= n_end;
    const int nb = whole ? k.nb : 1;
    const uint8_t* W = p.W + n * p.row_bytes;
    if (pre) {
      k.decode(W, p.row_bytes, nb, p.X, wbuf.data());
      W = reinterpret_cast<const uint8_t*>(wbuf.data());
    }
    const KernelFn* fns = pre ? (whole ? k.pre_full : k.pre_one) : (whole ? k.full : k.one);
    for (int64_t r0 = 0; r0 < p.rows; r0 += k.tile) {
      const int R = static_cast<int>(p.rows - r0 < k.tile ? p.rows - r0 : k.tile);
      fns[R - 1](W, p.row_bytes, p.nb, p.X + r0 * p.x_row_bytes, p.x_row_bytes, dots);
      store<T>(p, n, nb, r0, R, dots);
    }
    n += nb;
  }
}

// Weight bytes per thread below which a call stays on the calling thread while the pool's
// helper is awake (PYMESH_QGEMV_MIN_KB, default 64): a quantized byte costs several times the
// compute of a float32 one, so splitting pays off on smaller matrices than linear_cpu's 256.
int64_t qgemv_min_per_thread() {
  static const int64_t v = [] {
    const char* e = std::getenv("PYMESH_QGEMV_MIN_KB");
    return (e && *e ? std::strtoll(e, nullptr, 10) : 64) << 10;
  }();
  return v;
}

constexpr int64_t kGroup = 8;  // output rows per unit of work split between threads

}  // namespace

void qlinear_limit_isa(const std::string& name) {
  if (name == "avx512_vnni") g_isa_limit = 2;
  else if (name == "avx2") g_isa_limit = 1;
  else if (name == "generic") g_isa_limit = 0;
  else bad_argument("qlinear_limit_isa: unknown path '" + name +
                    "' (expected avx512_vnni, avx2 or generic)");
}

std::string qlinear_isa() {
  switch (best_isa()) {
    case Isa::kAvx512: return "avx512_vnni";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

void qlinear_cpu(uintptr_t y, uintptr_t x, int64_t x_stride, uintptr_t w, uintptr_t bias,
                 int64_t rows, int64_t in_features, int64_t out_features, int qtype, int dtype,
                 int threads) {
  if (qtype < 0 || qtype > 2)
    bad_argument("qlinear: unknown block type code " + std::to_string(qtype) +
                 " (expected 0=q8_0, 1=q4_0, 2=q4_1)");
  if (rows < 1) bad_argument("qlinear: need rows >= 1, got " + std::to_string(rows));
  if (in_features <= 0 || in_features % kQBlock != 0 || out_features <= 0)
    bad_argument("qlinear: in_features must be a positive multiple of 32 and out_features "
                 "positive; got " + std::to_string(in_features) + ", " +
                 std::to_string(out_features));
  if (rows > 1 && x_stride < in_features)
    bad_argument("qlinear: x row stride " + std::to_string(x_stride) + " < in_features " +
                 std::to_string(in_features));
  check_dtype(dtype);
  // Prefill: blocks of kRowBlock rows, each its own pass over W (compute-bound there anyway),
  // so the prepared-x buffers stay a few MiB.
  constexpr int64_t kRowBlock = 256;
  if (rows > kRowBlock) {
    const uintptr_t es = dtype == kFloat32 ? 4 : 2;
    for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock)
      qlinear_cpu(y + static_cast<uintptr_t>(r0 * out_features) * es,
                  x + static_cast<uintptr_t>(r0 * x_stride) * es, x_stride, w, bias,
                  rows - r0 < kRowBlock ? rows - r0 : kRowBlock, in_features, out_features, qtype,
                  dtype, threads);
    return;
  }
  const int64_t nb = in_features / kQBlock, pairs = (nb + 1) / 2;
  const bool float_x = qtype == kQ8_0;
  // Prepared x, reused between calls (decode calls this ~150 times per token).
  static thread_local std::vector<XPair> xbuf;
  static thread_local std::vector<float> fbuf;
  static thread_local std::vector<XChunk> cbuf;
  const Isa isa = best_isa();
  const int64_t row_bytes = nb * kBlockBytes[qtype];
  const int64_t bytes = out_features * row_bytes;
  int t = threads_for(bytes + bytes * (rows - 1) / 4, threads,
                      pool_helpers_reliable() ? qgemv_min_per_thread() : kGemvPerThread);
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const T* xs = reinterpret_cast<const T*>(x);
    Problem p{reinterpret_cast<const uint8_t*>(w), row_bytes, nb, nullptr, 0, rows,
              reinterpret_cast<void*>(y), reinterpret_cast<const void*>(bias), out_features};
    if (float_x && std::is_same_v<T, float>) {
      p.X = reinterpret_cast<const uint8_t*>(x);
      p.x_row_bytes = x_stride * 4;
    } else if (float_x) {
      if (static_cast<int64_t>(fbuf.size()) < rows * in_features)
        fbuf.resize(static_cast<size_t>(rows * in_features));
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t i = 0; i < in_features; ++i)
          fbuf[r * in_features + i] = to_float(xs[r * x_stride + i]);
      p.X = reinterpret_cast<const uint8_t*>(fbuf.data());
      p.x_row_bytes = in_features * 4;
    } else if (isa == Isa::kAvx512) {
      const int64_t chunks = stream_chunks(qtype, in_features);
      if (static_cast<int64_t>(cbuf.size()) < rows * chunks) cbuf.resize(static_cast<size_t>(rows * chunks));
      XChunk* xc = cbuf.data();  // this thread's buffer: the pool's threads have their own cbuf
      auto prepare_rows = [&](int64_t b, int64_t e) {
        static thread_local std::vector<float> v;
        static thread_local std::vector<int8_t> scratch;
        v.resize(static_cast<size_t>(in_features));
        scratch.resize(static_cast<size_t>(in_features));
        for (int64_t r = b; r < e; ++r) {
          const float* xr = reinterpret_cast<const float*>(xs + r * x_stride);
          if constexpr (!std::is_same_v<T, float>) {
            for (int64_t i = 0; i < in_features; ++i) v[i] = to_float(xs[r * x_stride + i]);
            xr = v.data();
          }
          prepare_stream_row(qtype, xr, in_features, scratch.data(), xc + r * chunks);
        }
      };
      if (rows * in_features >= (int64_t{1} << 16) && t > 1) parallel_for(rows, t, prepare_rows);
      else prepare_rows(0, rows);
      p.X = reinterpret_cast<const uint8_t*>(xc);
      p.x_row_bytes = chunks * static_cast<int64_t>(sizeof(XChunk));
    } else {
      if (static_cast<int64_t>(xbuf.size()) < rows * pairs) xbuf.resize(static_cast<size_t>(rows * pairs));
      XPair* xq = xbuf.data();
      auto quantize_rows = [&](int64_t b, int64_t e) {
        for (int64_t r = b; r < e; ++r)
          quantize_row<T>(xs + r * x_stride, in_features, qtype, xq + r * pairs);
      };
      if (rows * in_features >= (int64_t{1} << 16) && t > 1) parallel_for(rows, t, quantize_rows);
      else quantize_rows(0, rows);
      p.X = reinterpret_cast<const uint8_t*>(xq);
      p.x_row_bytes = pairs * static_cast<int64_t>(sizeof(XPair));
    }
    const Kernels& k = qtype == kQ8_0 ? q8_kernels(isa)
                                      : (qtype == kQ4_0 ? kernels<kQ4_0>(isa) : kernels<kQ4_1>(isa));
    const int64_t groups = (out_features + kGroup - 1) / kGroup;
    auto run = [&](int64_t b, int64_t e) {
      run_range<T>(p, k, b * kGroup, e * kGroup < out_features ? e * kGroup : out_features);
    };
    int64_t chunk_bytes = bytes / (8 * int64_t{t});
    if (chunk_bytes < (int64_t{32} << 10)) chunk_bytes = int64_t{32} << 10;
    if (chunk_bytes > (int64_t{256} << 10)) chunk_bytes = int64_t{256} << 10;
    const int64_t grain = chunk_bytes / (kGroup * row_bytes);
    parallel_for_dynamic(groups, grain < 1 ? 1 : grain, t, run);
  });
}

}  // namespace pymesh
