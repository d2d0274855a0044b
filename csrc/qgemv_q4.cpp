// q4_0 / q4_1 with int8 activations on AVX-512 VNNI, walking each weight row as a byte stream.
//
// A row of blocks (18 / 20 bytes: fp16 d, [fp16 m,] 16 bytes of nibbles) is read in 64-byte
// chunks, whatever the block boundaries. x is quantized per block (qgemv.h) and laid out per
// chunk to face the weight bytes: lo[i] / hi[i] is the x element whose weight is the low /
// high nibble of byte i, 0 where byte i is a scale. So one chunk is two vpdpbusd (low and
// high nibbles) with no shuffle of the weights; every 4-byte lane holds nibbles of at most one
// block (the scale bytes between two blocks' nibbles are 2 or 4 bytes, and lanes are
// 4-aligned), and one vpermt2w of [previous chunk | this chunk] gives each lane its block's
// fp16 d (and m): 64 weight bytes (3.2-3.6 blocks) cost a load, three logic ops, a permute
// and one or two conversions, against 36-40 bytes for the same work per pair of blocks.
#include <immintrin.h>

#include <cstring>
#include <vector>

#include "qgemv.h"

namespace pymesh {
namespace qgemv {

int64_t stream_chunks(int qtype, int64_t in_features) {
  return (in_features / 32 * kBlockBytes[qtype] + 63) / 64;
}

namespace {

#define PYMESH_VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))

// What depends only on the type and in_features: each lane's block (-1: no nibbles there)
// and the permute indices of its d / m. Built once per shape and thread.
struct Layout {
  int qtype = -1;
  int64_t in = 0;
  std::vector<int32_t> lane_blk;  // chunks x 16
  std::vector<int16_t> idx;       // chunks x 32
};

const Layout& layout(int qtype, int64_t in) {
  thread_local Layout L;
  if (L.qtype == qtype && L.in == in) return L;
  const int64_t B = kBlockBytes[qtype], qs = qtype == kQ4_1 ? 4 : 2;
  const int64_t nb = in / 32, row_bytes = nb * B, chunks = stream_chunks(qtype, in);
  L.lane_blk.assign(static_cast<size_t>(chunks * 16), -1);
  L.idx.assign(static_cast<size_t>(chunks * 32), 0);
  for (int64_t c = 0; c < chunks; ++c)
    for (int l = 0; l < 16; ++l) {
      int64_t b = -1;
      for (int k = 0; k < 4; ++k) {  // every lane holds nibbles of at most one block
        const int64_t pos = 64 * c + 4 * l + k, off = pos % B;
        if (pos < row_bytes && off >= qs && off < qs + 16) b = pos / B;
      }
      L.lane_blk[c * 16 + l] = static_cast<int32_t>(b);
      // A lane without nibbles still points at a real d (finite): 0 * d, never 0 * inf.
      int64_t pb = b >= 0 ? b : (64 * c + 4 * l) / B;
      if (pb >= nb) pb = nb - 1;
      const int64_t rel = pb * B - 64 * c;  // in [-20, 62]: the previous or this chunk
      L.idx[c * 32 + l] = static_cast<int16_t>(32 + rel / 2);
      L.idx[c * 32 + 16 + l] = static_cast<int16_t>(32 + rel / 2 + 1);  // q4_1's m follows d
    }
  L.qtype = qtype, L.in = in;
  return L;
}

}  // namespace

PYMESH_VNNI void prepare_stream_row(int qtype, const float* x, int64_t in, int8_t* q,
                                    XChunk* out) {
  const Layout& L = layout(qtype, in);
  const int64_t B = kBlockBytes[qtype], qs = qtype == kQ4_1 ? 4 : 2;
  const int64_t nb = in / 32, chunks = stream_chunks(qtype, in);
  thread_local std::vector<float> dxs;
  dxs.resize(static_cast<size_t>(nb));
  // Quantize each block (as quantize_block: x * (127 / amax), nearest even, +-127).
  const __m512 sign = _mm512_set1_ps(-0.0f);
  for (int64_t b = 0; b < nb; ++b) {
    const __m512 v0 = _mm512_loadu_ps(x + 32 * b), v1 = _mm512_loadu_ps(x + 32 * b + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0),
                                                          _mm512_andnot_ps(sign, v1)));
    const __m512 id = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    const __m512i q0 = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(_mm512_mul_ps(v0, id))));
    const __m512i q1 = _mm512_min_epi32(hi, _mm512_max_epi32(lo, _mm512_cvtps_epi32(_mm512_mul_ps(v1, id))));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b), _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 32 * b + 16), _mm512_cvtepi32_epi8(q1));
    dxs[b] = amax / 127.0f;
  }
  // Place each block's elements 0-15 / 16-31 facing its nibble bytes (may cross a chunk).
  for (int64_t c = 0; c < chunks; ++c) std::memset(out[c].lo, 0, 128);
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t pos = B * b + qs, c = pos >> 6, i = pos & 63;
    const int64_t n1 = 64 - i < 16 ? 64 - i : 16;
    std::memcpy(out[c].lo + i, q + 32 * b, static_cast<size_t>(n1));
    std::memcpy(out[c].hi + i, q + 32 * b + 16, static_cast<size_t>(n1));
    if (n1 < 16) {
      std::memcpy(out[c + 1].lo, q + 32 * b + n1, static_cast<size_t>(16 - n1));
      std::memcpy(out[c + 1].hi, q + 32 * b + 16 + n1, static_cast<size_t>(16 - n1));
    }
  }
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t c = 0; c < chunks; ++c) {
    XChunk& o = out[c];
    const __m512i sums = _mm512_dpbusd_epi32(
        _mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, _mm512_load_si512(o.lo)), ones,
        _mm512_load_si512(o.hi));
    const int32_t* blk = L.lane_blk.data() + c * 16;
    for (int l = 0; l < 16; ++l) o.dx[l] = blk[l] >= 0 ? dxs[blk[l]] : 0.0f;
    if (qtype == kQ4_1)
      _mm512_store_ps(o.aux.f, _mm512_mul_ps(_mm512_load_ps(o.dx), _mm512_cvtepi32_ps(sums)));
    else
      _mm512_store_si512(o.aux.i, _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sums, 3)));
    std::memcpy(o.idx, L.idx.data() + c * 32, sizeof o.idx);
  }
}

namespace {

// One 64-byte chunk of a weight row: its nibbles and each lane's d (and m). prev: the chunk
// before (for the d of a block that starts there).
template <int Q>
PYMESH_VNNI PYMESH_INLINE void chunk512(const uint8_t* p, __mmask64 mask, __m512i idx,
                                        __m512i& prev, __m512i& lo, __m512i& hi, __m512& wd,
                                        __m512& wm) {
  const __m512i low = _mm512_set1_epi8(0x0F);
  _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetch), _MM_HINT_T0);
  const __m512i z = _mm512_maskz_loadu_epi8(mask, p);
  const __m512i sc = _mm512_permutex2var_epi16(prev, idx, z);
  prev = z;
  wd = _mm512_cvtph_ps(_mm512_castsi512_si256(sc));
  if constexpr (Q == kQ4_1) wm = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(sc, 1));
  lo = _mm512_and_si512(z, low);
  hi = _mm512_and_si512(_mm512_srli_epi16(z, 4), low);
}

PYMESH_INLINE __mmask64 chunk_mask(int64_t row_bytes, int64_t c) {
  const int64_t left = row_bytes - 64 * c;
  return left >= 64 ? ~__mmask64{0} : (__mmask64{1} << left) - 1;
}

// NB weight rows x R rows of x. PRE: W holds decode512's chunks (NB rows of them) instead.
template <int Q, int R, int NB, bool PRE>
PYMESH_VNNI void stream512(const uint8_t* W, int64_t row_bytes, int64_t, const uint8_t* X,
                           int64_t ldx, float* out) {
  const int64_t chunks = (row_bytes + 63) / 64;
  const WChunk* Wd = reinterpret_cast<const WChunk*>(W);
  __m512 acc[NB][R];
  __m512i prev[NB];
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j) {
    prev[j] = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[j][r] = _mm512_setzero_ps();
  }
  for (int64_t c = 0; c < chunks; ++c) {
    const __mmask64 mask = chunk_mask(row_bytes, c);
    const __m512i idx = _mm512_load_si512(reinterpret_cast<const XChunk*>(X)[c].idx);
    __m512i lo[NB], hi[NB];
    __m512 wd[NB], wm[NB];
#pragma GCC unroll 8
    for (int j = 0; j < NB; ++j) {
      if constexpr (PRE) {
        const uint8_t* d = Wd[j * chunks + c].bytes;
        lo[j] = _mm512_load_si512(d);
        hi[j] = _mm512_load_si512(d + 64);
        wd[j] = _mm512_load_ps(d + 128);
        if constexpr (Q == kQ4_1) wm[j] = _mm512_load_ps(d + 192);
      } else {
        chunk512<Q>(W + j * row_bytes + 64 * c, mask, idx, prev[j], lo[j], hi[j], wd[j], wm[j]);
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const XChunk& xc = reinterpret_cast<const XChunk*>(X + r * ldx)[c];
      const __m512i xl = _mm512_load_si512(xc.lo), xh = _mm512_load_si512(xc.hi);
      const __m512 dx = _mm512_load_ps(xc.dx);
      const __m512i seed = Q == kQ4_1 ? _mm512_setzero_si512() : _mm512_load_si512(xc.aux.i);
#pragma GCC unroll 8
      for (int j = 0; j < NB; ++j) {
        const __m512i dot = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(seed, lo[j], xl), hi[j], xh);
        acc[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(wd[j], dx), acc[j][r]);
        if constexpr (Q == kQ4_1) acc[j][r] = _mm512_fmadd_ps(wm[j], _mm512_load_ps(xc.aux.f), acc[j][r]);
      }
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NB; ++j)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) out[j * R + r] = _mm512_reduce_add_ps(acc[j][r]);
}

// rows weight rows at W as chunks (for many rows of x: decoded once, read by every tile).
template <int Q>
PYMESH_VNNI void decode512(const uint8_t* W, int64_t row_bytes, int rows, const uint8_t* X,
                           WChunk* out) {
  const int64_t chunks = (row_bytes + 63) / 64;
  for (int j = 0; j < rows; ++j) {
    __m512i prev = _mm512_setzero_si512(), lo, hi;
    __m512 wd, wm = _mm512_setzero_ps();
    for (int64_t c = 0; c < chunks; ++c) {
      const __m512i idx = _mm512_load_si512(reinterpret_cast<const XChunk*>(X)[c].idx);
      chunk512<Q>(W + j * row_bytes + 64 * c, chunk_mask(row_bytes, c), idx, prev, lo, hi, wd, wm);
      uint8_t* d = out[j * chunks + c].bytes;
      _mm512_store_si512(d, lo);
      _mm512_store_si512(d + 64, hi);
      _mm512_store_ps(d + 128, wd);
      _mm512_store_ps(d + 192, wm);
    }
  }
}

template <int Q>
Kernels make() {
#ifndef PYMESH_Q4_NB
// Weight rows per block. 1 thread, 3072x576 in cache, GB/s at rows 1 / 4 / 32 (q4_0; q4_1):
// NB 4: 21.3 / 7.9 / 1.0 (18.6 / 7.3 / 0.9); NB 3: 19.8 / 7.8 / 1.0; NB 2: 18.5 / 7.8 / 0.9
// (17.5 / 7.6 / 0.9); tiles of 2 rows of x lose at 4 rows and more.
#define PYMESH_Q4_NB 4
#endif
#ifndef PYMESH_Q4_TILE
#define PYMESH_Q4_TILE 4
#endif
  constexpr int NB = PYMESH_Q4_NB;
  Kernels k;
  k.nb = NB, k.tile = PYMESH_Q4_TILE;
  k.full[0] = stream512<Q, 1, NB, false>, k.full[1] = stream512<Q, 2, NB, false>;
  k.full[2] = stream512<Q, 3, NB, false>, k.full[3] = stream512<Q, 4, NB, false>;
  k.one[0] = stream512<Q, 1, 1, false>, k.one[1] = stream512<Q, 2, 1, false>;
  k.one[2] = stream512<Q, 3, 1, false>, k.one[3] = stream512<Q, 4, 1, false>;
  k.decode = decode512<Q>;
  k.pre_full[0] = stream512<Q, 1, NB, true>, k.pre_full[1] = stream512<Q, 2, NB, true>;
  k.pre_full[2] = stream512<Q, 3, NB, true>, k.pre_full[3] = stream512<Q, 4, NB, true>;
  k.pre_one[0] = stream512<Q, 1, 1, true>, k.pre_one[1] = stream512<Q, 2, 1, true>;
  k.pre_one[2] = stream512<Q, 3, 1, true>, k.pre_one[3] = stream512<Q, 4, 1, true>;
  return k;
}

}  // namespace

const Kernels& q4_stream_kernels(int qtype) {
  static const Kernels q4_0 = make<kQ4_0>(), q4_1 = make<kQ4_1>();
  return qtype == kQ4_1 ? q4_1 : q4_0;
}

}  // namespace qgemv
}  // namespace pymesh
