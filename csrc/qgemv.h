// Shared by the quantized linear kernels (qgemv.cpp: the driver and the int8-activation
// kernels of q4_0 / q4_1; qgemv_q8.cpp: the float-activation kernels of q8_0).
#pragma once

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
struct Kernels {
  int nb = 1, tile = 1;
  KernelFn full[4] = {}, one[4] = {};
};

// q8_0 with float32 activations (qgemv_q8.cpp).
const Kernels& q8_kernels(Isa isa);

}  // namespace qgemv
}  // namespace pymesh
