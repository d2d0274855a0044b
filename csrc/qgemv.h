// Shared by the quantized linear kernels (qgemv.cpp: the driver and the int8-activation
// kernels of q4_0 / q4_1; qgemv_q8.cpp: the float-activation kernels of q8_0).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common.h"

namespace pymesh {
namespace qgemv {

enum QType : int { kQ8_0 = 0, kQ4_0 = 1, kQ4_1 = 2 };
constexpr int64_t kBlockBytes[3] = {34, 18, 20};
enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

#ifndef PYMESH_QGEMV_PREFETCH
#define PYMESH_QGEMV_PREFETCH 2048
#endif
// Bytes ahead of the current load, per weight row: 2048 beat 512 / 1024 by 10-20 % on
// SmolLM2's q4_1 blocks (30 layers cycling through DRAM, 2 threads), 4096 was no better.
constexpr int64_t kPrefetch = PYMESH_QGEMV_PREFETCH;

PYMESH_INLINE float half_at(const uint8_t* p) {
  f16 v;
  std::memcpy(&v, p, 2);
  return static_cast<float>(v);
}

// One call computes NB output rows (W, row_bytes apart; nb blocks of 32 inputs) for R rows
// of prepared x (X, x_row_bytes apart: quantized pairs or float32): out[j * R + r].
using KernelFn = void (*)(const uint8_t* W, int64_t row_bytes, int64_t nb, const uint8_t* X,
                          int64_t x_row_bytes, float* out);

// The kernels of one type and ISA: full[R - 1] computes `nb` weight rows, one[R - 1] a
// single one (the ragged end of a thread's range), for R = 1..tile rows of x.
// Optionally (many rows of x) the weight rows are first decoded once per block of nb rows,
// decode(W, row_bytes, rows, X, out), and pre_full / pre_one then read `out` instead of W.
struct alignas(64) WChunk {
  uint8_t bytes[256];  // a decoded 64-byte chunk: low nibbles, high nibbles, d, m (64 bytes each)
};
using DecodeFn = void (*)(const uint8_t* W, int64_t row_bytes, int rows, const uint8_t* X,
                          WChunk* out);
struct Kernels {
  int nb = 1, tile = 1;
  KernelFn full[4] = {}, one[4] = {};
  DecodeFn decode = nullptr;
  KernelFn pre_full[4] = {}, pre_one[4] = {};
};

// q8_0 with float32 activations (qgemv_q8.cpp).
const Kernels& q8_kernels(Isa isa);

// One block of activations as int8: q = round(v * (127 / amax)) (nearest even), clamped to
// +-127; returns the scale dx = amax / 127 (0 for a block of zeros).
// (Rounding by adding and subtracting 1.5 * 2^23, exact to nearest even for |v| < 2^22 and
// branch-free, so the loops vectorise: nearbyint is a libm call per value without SSE4.1.)
inline float quantize_block(const float* v, int8_t* q) {
  float amax = 0.0f;
  for (int e = 0; e < 32; ++e) amax = std::fmax(amax, std::fabs(v[e]));
  const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
  const float magic = 12582912.0f;
  for (int e = 0; e < 32; ++e) {
    const float r = (v[e] * id + magic) - magic;
    q[e] = static_cast<int8_t>(static_cast<int>(std::fmin(127.0f, std::fmax(-127.0f, r))));
  }
  return amax / 127.0f;
}

// q4_0 / q4_1 on AVX-512 VNNI (qgemv_q4.cpp): each weight row is walked as a byte stream in
// 64-byte chunks; x is laid out to match, chunk by chunk, with zeros facing the scale bytes.
struct alignas(64) XChunk {
  int8_t lo[64], hi[64];  // x facing the low / high nibble of each weight byte (0 elsewhere)
  float dx[16];           // per int32 lane: dx of the block whose nibbles the lane holds
  union {
    int32_t i[16];        // q4_0: -8 * the lane's sum of x (vpdpbusd's seed)
    float f[16];          // q4_1: dx * the lane's sum of x (for the m term)
  } aux;
  int16_t idx[32];        // words of [previous chunk | this chunk] holding each lane's d, m
};
int64_t stream_chunks(int qtype, int64_t in_features);
// x (in_features floats) as stream_chunks() chunks; scratch: in_features int8.
void prepare_stream_row(int qtype, const float* x, int64_t in_features, int8_t* scratch,
                        XChunk* out);
const Kernels& q4_stream_kernels(int qtype);

}  // namespace qgemv
}  // namespace pymesh
