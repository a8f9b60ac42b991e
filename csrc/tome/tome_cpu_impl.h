// The token merging CPU kernels, written once over a vector policy V (included inside each kernel
// translation unit's target region, after its policy; see tome_cpu.h). V provides:
//   F (float vector of W lanes) and I (int32 vector of W lanes); zero, set1, load, store (unaligned),
//   fma, mul; transpose(src, lds, dst, ldd) (a W x W block); iota(base) (lanes base, base + 1, ...); store_i;
//   argmax_update(v, cols, best, idx): lanes where v > best (strictly; NaN never) take v and cols;
//   reduce_argmax(best, idx, v, j): the largest lane of best and the lowest idx among its equals
//   (tome::better_match across lanes; best holds no NaN);
//   load_f16 / load_bf16 / store_f16 / store_bf16 (W elements; stores round to nearest even);
//   MR x NV: register blocking of the match (sources x destination vectors);
//   MV: vectors of one merge block.
// The algorithm and its invariants (tome_cpu.h): every cosine is one FMA chain over the channels in
// order in one lane, whatever the tile shape, so equal vectors give bit-equal cosines and ties are
// decided by index exactly as tome_math.h says.
#pragma once
#include "common/cpu_with_count.h"

namespace slimformer::tome {
namespace {  // internal linkage: one copy per ISA

template <TomeDtype T>
inline float load1(const void* base, int64_t i) {
  if constexpr (T == TomeDtype::kFloat32) return static_cast<const float*>(base)[i];
  if constexpr (T == TomeDtype::kFloat16) return half_bits_to_float(static_cast<const uint16_t*>(base)[i]);
  if constexpr (T == TomeDtype::kBFloat16) return bf16_bits_to_float(static_cast<const uint16_t*>(base)[i]);
  return 0.0f;
}

template <TomeDtype T>
inline void store1(void* base, int64_t i, float v) {
  if constexpr (T == TomeDtype::kFloat32) static_cast<float*>(base)[i] = v;
  if constexpr (T == TomeDtype::kFloat16) static_cast<uint16_t*>(base)[i] = float_to_half_bits(v);
  if constexpr (T == TomeDtype::kBFloat16) static_cast<uint16_t*>(base)[i] = float_to_bf16_bits(v);
}

// W elements at base + i as a float vector.
template <class V, TomeDtype T>
inline typename V::F loadv(const void* base, int64_t i) {
  if constexpr (T == TomeDtype::kFloat32) {
    return V::load(static_cast<const float*>(base) + i);
  } else if constexpr (T == TomeDtype::kFloat16) {
    return V::load_f16(static_cast<const uint16_t*>(base) + i);
  } else {
    return V::load_bf16(static_cast<const uint16_t*>(base) + i);
  }
}

template <class V, TomeDtype T>
inline void storev(void* base, int64_t i, typename V::F v) {
  if constexpr (T == TomeDtype::kFloat32) {
    V::store(static_cast<float*>(base) + i, v);
  } else if constexpr (T == TomeDtype::kFloat16) {
    V::store_f16(static_cast<uint16_t*>(base) + i, v);
  } else {
    V::store_bf16(static_cast<uint16_t*>(base) + i, v);
  }
}

// ---- match ----------------------------------------------------------------------------------------

// buf[c * ld + j] = metric row rows[j] (element offsets) for j < n, as float, L2-normalised
// (tome::inverse_norm); columns n .. round_up(n, W) - 1 are set to `pad`. buf has round_up(C, W)
// rows (the ones past C are zero). W tokens at a time: their rows are converted into tmp
// [W][round_up(C, W)] and transposed into buf W x W at a time (V::transpose). Sums of squares run
// down the columns (one lane per token, channels in order), so equal rows normalise to equal
// columns. A sum that overflows float (|values| beyond ~1e19, possible for fp32 / bf16 input) is
// recomputed on the column scaled by its largest magnitude, so such rows normalise as in fp64; a
// row with an inf keeps inv = 0 and NaN cosines, as in fp64.
template <class V, TomeDtype T>
inline void pack_normalised(const void* metric, const int64_t* rows, int64_t n, int64_t C, float* buf, int64_t ld,
                            float pad, float* tmp) {
  using F = typename V::F;
  constexpr int W = V::W;
  const int64_t Cp = (C + W - 1) / W * W;
  alignas(64) float ss[W], inv[W];
  for (int64_t j0 = 0; j0 < n; j0 += W) {
    for (int t = 0; t < W; ++t) {
      float* row = tmp + t * Cp;
      int64_t c = 0;
      if (j0 + t < n) {
        const int64_t off = rows[j0 + t];
        for (; c + W <= C; c += W) V::store(row + c, loadv<V, T>(metric, off + c));
        for (; c < C; ++c) row[c] = load1<T>(metric, off + c);
      }
      for (; c < Cp; ++c) row[c] = 0.0f;
    }
    for (int64_t c = 0; c < Cp; c += W) V::transpose(tmp + c, Cp, buf + c * ld + j0, ld);
    F acc = V::zero();
    for (int64_t c = 0; c < C; ++c) {
      const F v = V::load(buf + c * ld + j0);
      acc = V::fma(v, v, acc);
    }
    V::store(ss, acc);
    for (int l = 0; l < W; ++l) {
      inv[l] = inverse_norm(ss[l]);
      if (std::isinf(ss[l])) {
        const float* col = buf + j0 + l;
        float mx = 0.0f;
        for (int64_t c = 0; c < C; ++c) mx = std::max(mx, std::fabs(col[c * ld]));
        if (std::isfinite(mx)) {
          float s2 = 0.0f;
          for (int64_t c = 0; c < C; ++c) s2 += (col[c * ld] / mx) * (col[c * ld] / mx);
          inv[l] = inverse_norm(s2) / mx;
        }
      }
    }
    const F iv = V::load(inv);
    for (int64_t c = 0; c < C; ++c) V::store(buf + c * ld + j0, V::mul(V::load(buf + c * ld + j0), iv));
    for (int64_t j = n; j < j0 + W; ++j)
      for (int64_t c = 0; c < C; ++c) buf[c * ld + j] = pad;
  }
}

// Cosines of V::MR sources qt [C][ldq] (transposed: source m in column m) with NVb vectors of
// destination columns d [C][ldd], stored to cos [MR][ldc]. The running argmax is a separate pass
// over cos, so the accumulators get the registers.
template <class V, int NVb>
inline void score_block(int64_t C, const float* qt, int64_t ldq, const float* d, int64_t ldd, float* cos,
                        int64_t ldc) {
  using F = typename V::F;
  constexpr int MR = V::MR, W = V::W;
  F acc[MR][NVb];
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NVb; ++v) acc[m][v] = V::zero();
  for (int64_t c = 0; c < C; ++c) {
    F dv[NVb];
    for (int v = 0; v < NVb; ++v) dv[v] = V::load(d + c * ldd + v * W);
    for (int m = 0; m < MR; ++m) {
      const F qv = V::set1(qt[c * ldq + m]);
      for (int v = 0; v < NVb; ++v) acc[m][v] = V::fma(qv, dv[v], acc[m][v]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int v = 0; v < NVb; ++v) V::store(cos + m * ldc + v * W, acc[m][v]);
}

// Best column of cos[0:n] (n a multiple of W): (value, column); value -inf when every entry is NaN.
template <class V>
inline std::pair<float, int64_t> row_argmax(const float* cos, int64_t n) {
  constexpr int W = V::W;
  typename V::F best = V::set1(-INFINITY);
  typename V::I idx = V::iota(0);
  for (int64_t j = 0; j < n; j += W) V::argmax_update(V::load(cos + j), V::iota(static_cast<int32_t>(j)), best, idx);
  float bv;
  int32_t bj;
  V::reduce_argmax(best, idx, bv, bj);
  if (bv == -INFINITY) return {bv, -1};
  return {bv, bj};
}

template <class V, TomeDtype T>
void match_items_typed(const TomeMatchParams& p, int64_t i0, int64_t i1) {
  constexpr int W = V::W, MR = V::MR, NV = V::NV;
  const int64_t N = p.tokens, C = p.channels;
  std::vector<int32_t> src, dsts;
  std::vector<int64_t> rows;
  const int64_t Cp = (C + W - 1) / W * W;
  std::vector<float> dt, st, cos, tmp(W * Cp);
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t b = item / p.chunks, k = item % p.chunks;
    const int8_t* roles = p.roles + b * N;
    const float* sizes = p.sizes + b * N;
    int64_t* dst_out = p.dst + b * N;
    float* score_out = p.score + b * N;
    src.clear();
    dsts.clear();
    int64_t first_dst = -1;
    for (int64_t i = 0; i < N; ++i) {
      if (roles[i] == kSource) {
        src.push_back(static_cast<int32_t>(i));
      } else if (roles[i] == kDestination) {
        if (first_dst < 0) first_dst = i;
        if (sizes[i] > 0.0f) dsts.push_back(static_cast<int32_t>(i));
      }
    }
    if (first_dst < 0) first_dst = 0;  // no destination at all (only allowed with r = 0)
    const int64_t na = static_cast<int64_t>(src.size());
    const int64_t a0 = na * k / p.chunks, a1 = na * (k + 1) / p.chunks;
    if (a0 >= a1) continue;
    const int64_t nb = static_cast<int64_t>(dsts.size());
    if (nb == 0) {
      for (int64_t a = a0; a < a1; ++a) {
        const int64_t i = src[a];
        dst_out[i] = first_dst;
        score_out[i] = source_score(sizes[i], false, 0.0f);
      }
      continue;
    }
    // Dt [C][nbp]: normalised destination j in column j; NaN columns past nb never win.
    const int64_t nbp = (nb + W - 1) / W * W;
    dt.resize(Cp * nbp);
    rows.resize(std::max(nb, a1 - a0));
    for (int64_t j = 0; j < nb; ++j) rows[j] = (b * N + dsts[j]) * C;
    pack_normalised<V, T>(p.metric, rows.data(), nb, C, dt.data(), nbp, std::numeric_limits<float>::quiet_NaN(),
                          tmp.data());
    // St [C][nsp]: the item's sources, normalised, zero columns up to a whole last tile.
    const int64_t ns = a1 - a0, nsp = (ns + MR + W - 1) / W * W;
    st.resize(Cp * nsp);
    for (int64_t a = 0; a < ns; ++a) rows[a] = (b * N + src[a0 + a]) * C;
    pack_normalised<V, T>(p.metric, rows.data(), ns, C, st.data(), nsp, 0.0f, tmp.data());
    for (int64_t c = 0; c < C; ++c)
      for (int64_t a = (ns + W - 1) / W * W; a < nsp; ++a) st[c * nsp + a] = 0.0f;
    cos.resize(MR * nbp);
    for (int64_t a = 0; a < ns; a += MR) {
      const float* qt = st.data() + a;
      int64_t jb = 0;
      for (; jb + NV * W <= nbp; jb += NV * W)
        score_block<V, NV>(C, qt, nsp, dt.data() + jb, nbp, cos.data() + jb, nbp);
      if (jb < nbp) {
        with_count<NV - 1>(static_cast<int>((nbp - jb) / W), [&](auto nv) {
          score_block<V, decltype(nv)::value>(C, qt, nsp, dt.data() + jb, nbp, cos.data() + jb, nbp);
        });
      }
      const int mr = static_cast<int>(std::min<int64_t>(MR, ns - a));
      for (int m = 0; m < mr; ++m) {
        const auto [bv, bj] = row_argmax<V>(cos.data() + m * nbp, nbp);
        const bool found = bj >= 0;
        const int64_t i = src[a0 + a + m];
        dst_out[i] = found ? dsts[bj] : first_dst;
        score_out[i] = source_score(sizes[i], found, bv);
      }
    }
  }
}

template <class V>
void match_items(const TomeMatchParams& p, int64_t i0, int64_t i1) {
  switch (p.dtype) {
    case TomeDtype::kFloat16: return match_items_typed<V, TomeDtype::kFloat16>(p, i0, i1);
    case TomeDtype::kBFloat16: return match_items_typed<V, TomeDtype::kBFloat16>(p, i0, i1);
    default: return match_items_typed<V, TomeDtype::kFloat32>(p, i0, i1);
  }
}

// ---- merge ----------------------------------------------------------------------------------------

// out[d : d + NVb*W] = sum_k w[k] x[rows[k] * D + d : ...], rows as element offsets of x.
template <class V, TomeDtype T, int NVb>
inline void merge_block(const void* x, const int64_t* rows, const float* w, int64_t cnt, int64_t d, void* out,
                        int64_t out_off) {
  using F = typename V::F;
  constexpr int W = V::W;
  F acc[NVb];
  for (int v = 0; v < NVb; ++v) acc[v] = V::zero();
  for (int64_t k = 0; k < cnt; ++k) {
    const F wv = V::set1(w[k]);
    const int64_t off = rows[k] + d;
    for (int v = 0; v < NVb; ++v) acc[v] = V::fma(wv, loadv<V, T>(x, off + v * W), acc[v]);
  }
  for (int v = 0; v < NVb; ++v) storev<V, T>(out, out_off + d + v * W, acc[v]);
}

template <class V, TomeDtype T>
void merge_items_typed(const TomeMergeParams& p, int64_t i0, int64_t i1) {
  constexpr int W = V::W, MV = V::MV;
  const int64_t N = p.tokens, D = p.dim, n_out = p.n_out, chunks = merge_chunks(p);
  std::vector<double> S;
  std::vector<int32_t> count;
  std::vector<int64_t> start, rows;
  std::vector<float> slot_size, w;
  for (int64_t item = i0; item < i1; ++item) {
    const int64_t b = item / chunks, k = item % chunks;
    const int64_t* slot = p.slot + b * N;
    const float* sizes = p.sizes + b * N;
    S.assign(n_out, 0.0);
    count.assign(n_out, 0);
    for (int64_t i = 0; i < N; ++i) S[slot[i]] += sizes[i], ++count[slot[i]];
    slot_size.resize(n_out);
    for (int64_t o = 0; o < n_out; ++o) slot_size[o] = static_cast<float>(S[o]);
    if (k == 0) std::copy(slot_size.begin(), slot_size.end(), p.out_sizes + b * n_out);
    if (D == 0) continue;
    // Inputs of every slot in ascending order (counting sort), with their weights.
    start.assign(n_out + 1, 0);
    for (int64_t o = 0; o < n_out; ++o) start[o + 1] = start[o] + count[o];
    rows.resize(N);
    w.resize(N);
    for (int64_t i = 0; i < N; ++i) {
      const int64_t o = slot[i], pos = start[o]++;
      rows[pos] = (b * N + i) * D;
      w[pos] = merge_weight(sizes[i], slot_size[o], count[o]);
    }
    // start[o] is now the end of slot o's inputs.
    const int64_t d0 = k * p.d_chunk, d1 = std::min(D, d0 + p.d_chunk);
    for (int64_t o = 0; o < n_out; ++o) {
      const int64_t e = start[o], s = e - count[o];
      const int64_t out_off = (b * n_out + o) * D;
      int64_t d = d0;
      for (; d + MV * W <= d1; d += MV * W) merge_block<V, T, MV>(p.x, rows.data() + s, w.data() + s, e - s, d, p.out, out_off);
      if (d + W <= d1) {
        const int nv = static_cast<int>((d1 - d) / W);
        with_count<MV - 1>(nv, [&](auto n) {
          merge_block<V, T, decltype(n)::value>(p.x, rows.data() + s, w.data() + s, e - s, d, p.out, out_off);
        });
        d += nv * W;
      }
      for (; d < d1; ++d) {
        float acc = 0.0f;
        for (int64_t q = s; q < e; ++q) acc += w[q] * load1<T>(p.x, rows[q] + d);
        store1<T>(p.out, out_off + d, acc);
      }
    }
  }
}

template <class V>
void merge_items(const TomeMergeParams& p, int64_t i0, int64_t i1) {
  switch (p.dtype) {
    case TomeDtype::kFloat16: return merge_items_typed<V, TomeDtype::kFloat16>(p, i0, i1);
    case TomeDtype::kBFloat16: return merge_items_typed<V, TomeDtype::kBFloat16>(p, i0, i1);
    default: return merge_items_typed<V, TomeDtype::kFloat32>(p, i0, i1);
  }
}

}  // namespace
}  // namespace slimformer::tome
