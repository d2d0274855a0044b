// The vector kernel of decode_attention (attention.cpp) for one ISA. attention.cpp includes
// this file once per ISA with ATT_NS (a namespace), ATT_ISA (Avx512 or Avx2, attention_isa.h)
// and ATT_TARGET (its target attribute) defined. No include guard, on purpose.
namespace ATT_NS {
using I = ATT_ISA;
using V = I::V;
constexpr int W = I::kW;

// exp_approx (common.h) on a vector, with FMAs.
ATT_TARGET PYMESH_INLINE V exp_v(V x) {
  x = I::min(I::max(x, I::set1(-87.0f)), I::set1(88.0f));
  const V magic = I::set1(12582912.0f);
  const V n = I::add(I::fma(x, I::set1(1.44269504088896341f), magic), I::set1(-12582912.0f));
  V r = I::fma(n, I::set1(-0.693359375f), x);
  r = I::fma(n, I::set1(2.12194440e-4f), r);
  V p = I::set1(1.9875691500e-4f);
  p = I::fma(p, r, I::set1(1.3981999507e-3f));
  p = I::fma(p, r, I::set1(8.3334519073e-3f));
  p = I::fma(p, r, I::set1(4.1665795894e-2f));
  p = I::fma(p, r, I::set1(1.6666665459e-1f));
  p = I::fma(p, r, I::set1(5.0000001201e-1f));
  p = I::fma(I::mul(p, r), r, I::add(r, I::set1(1.0f)));
  return I::mul(p, I::pow2(n));
}

// Scores of nb <= W consecutive positions (keys at k0, tok elements apart) with one
// query head q (float32, scaled): lane p is position p; lanes >= nb are 0.
template <typename T>
ATT_TARGET PYMESH_INLINE V block_scores(const T* k0, int64_t tok, const float* q, int64_t d, int nb) {
  V acc[W];
  for (int p = 0; p < W; ++p) {
    V a = I::zero();
    if (p < nb) {
      const T* k = k0 + p * tok;
      for (int64_t i = 0; i < d; i += W) a = I::fma(I::load(k + i), I::loadf(q + i), a);
    }
    acc[I::slot_of(p)] = a;
  }
  return I::reduce(acc);
}

// dst[g][c] = sum over t < n of s[g * ns + t] * v(t)[c], for H heads and C vectors of columns
// (values of position t at v0 + t * tok), accumulated in registers.
template <typename T, int C, int H>
ATT_TARGET void weighted_values(float* dst, int64_t ld, const T* v0, int64_t tok, const float* s,
                                int64_t ns, int64_t n) {
  V acc[H][C];
  for (int g = 0; g < H; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = I::zero();
  for (int64_t t = 0; t < n; ++t) {
    const T* v = v0 + t * tok;
    V x[C];
    for (int c = 0; c < C; ++c) x[c] = I::load(v + c * W);
    for (int g = 0; g < H; ++g) {
      const V w = I::set1(s[g * ns + t]);
      for (int c = 0; c < C; ++c) acc[g][c] = I::fma(w, x[c], acc[g][c]);
    }
  }
  for (int g = 0; g < H; ++g)
    for (int c = 0; c < C; ++c) I::storef(dst + g * ld + c * W, acc[g][c]);
}

template <typename T, int C>
ATT_TARGET void weighted_values_c(float* dst, int64_t ld, const T* v0, int64_t tok, const float* s,
                                  int64_t ns, int64_t n, int heads) {
  switch (heads) {
    case 1: weighted_values<T, C, 1>(dst, ld, v0, tok, s, ns, n); break;
    case 2: weighted_values<T, C, 2>(dst, ld, v0, tok, s, ns, n); break;
    default: weighted_values<T, C, 3>(dst, ld, v0, tok, s, ns, n); break;
  }
}

// attend_one (attention.cpp) with vectors; head_dim a multiple of W.
template <typename T>
ATT_TARGET void attend(T* out, const T* qkv, T* cache, int64_t pos, int64_t heads, int64_t kv_heads,
                       int64_t d, int64_t window, float scale, int64_t h, std::vector<float>& scores,
                       std::vector<float>& qf, std::vector<float>& acc) {
  const int64_t group = heads / kv_heads;
  const int64_t tok = 2 * kv_heads * d;
  store_new_kv(qkv, cache, pos, heads, kv_heads, d, h, tok);
  const int64_t lo = window > 0 && pos + 1 > window ? pos + 1 - window : 0;
  const int64_t n = pos + 1 - lo;
  const int64_t ns = (n + W - 1) / W * W;  // score row stride: whole vectors
  scores.resize(static_cast<size_t>(group * ns));
  qf.resize(static_cast<size_t>(group * d + group));
  acc.resize(static_cast<size_t>(group * d));
  for (int64_t g = 0; g < group; ++g) {
    const T* q = qkv + (h * group + g) * d;
    for (int64_t i = 0; i < d; ++i) qf[g * d + i] = to_float(q[i]) * scale;
  }
  const T* keys = cache + lo * tok + h * d;
  for (int64_t t0 = 0; t0 < n; t0 += W) {
    const int nb = static_cast<int>(n - t0 < W ? n - t0 : W);
    for (int64_t g = 0; g < group; ++g)
      I::storef(&scores[g * ns + t0], block_scores(keys + t0 * tok, tok, &qf[g * d], d, nb));
  }
  const int64_t full = n / W * W;
  float* inv = &qf[group * d];  // 1 / softmax sum per head
  for (int64_t g = 0; g < group; ++g) {
    float* s = &scores[g * ns];
    float m = s[0];
    if (full > 0) {
      V mv = I::loadf(s);
      for (int64_t t = W; t < full; t += W) mv = I::max(mv, I::loadf(s + t));
      m = I::hmax(mv);
    }
    for (int64_t t = full; t < n; ++t) m = s[t] > m ? s[t] : m;
    const V neg_m = I::set1(-m);
    V sv = I::zero();
    for (int64_t t = 0; t < full; t += W) {
      const V e = exp_v(I::add(I::loadf(s + t), neg_m));
      I::storef(s + t, e);
      sv = I::add(sv, e);
    }
    float sum = I::hsum(sv);
    for (int64_t t = full; t < n; ++t) {
      s[t] = exp_approx(s[t] - m);
      sum += s[t];
    }
    inv[g] = 1.0f / sum;
  }
  const T* values = cache + lo * tok + kv_heads * d + h * d;
  for (int64_t col = 0; col < d; col += 4 * W) {
    const int64_t c = (d - col) / W < 4 ? (d - col) / W : 4;
    for (int64_t g = 0; g < group; g += 3) {
      const int hs = static_cast<int>(group - g < 3 ? group - g : 3);
      float* dst = &acc[g * d + col];
      const float* s = &scores[g * ns];
      switch (c) {
        case 1: weighted_values_c<T, 1>(dst, d, values + col, tok, s, ns, n, hs); break;
        case 2: weighted_values_c<T, 2>(dst, d, values + col, tok, s, ns, n, hs); break;
        case 3: weighted_values_c<T, 3>(dst, d, values + col, tok, s, ns, n, hs); break;
        default: weighted_values_c<T, 4>(dst, d, values + col, tok, s, ns, n, hs); break;
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    T* o = out + (h * group + g) * d;
    const float iv = inv[g];
    for (int64_t i = 0; i < d; ++i) o[i] = from_float<T>(acc[g * d + i] * iv);
  }
}

}  // namespace ATT_NS
