// The sparse flash attention CPU algorithm, written once over a vector policy V (included inside
// each kernel translation unit's target region, after its policy; see
// sparse_attention_cpu_prelude.h). V provides: float vector F of W lanes; zero, set1, load, store
// (unaligned), fma, add, sub, mul, max, exp2 (exactly 0 at and below 2^-126); keep_range /
// keep_range_or (lanes whose column is outside the allowed set become -inf); convert_f16; sum_lanes
// (W vectors -> one vector of their lane sums, for the decode path); and the
// register blocking KQ_MR x KQ_NV (score tiles) and GM_MR x GM_NV (accumulating products).
//
// Orientation: a score tile is S^T[j][c] = k_j . q_c * scale * log2(e), key rows j (< nk) times
// query columns c (nv vectors, the columns at and beyond nq are padding: their queries are zero,
// their statistics are never read). Per (b, h, query tile) the forward walks the tile's CSR row:
//   S^T = K Q^T                       (kq: broadcast k_j[d], FMA with the Q^T row d)
//   mask (partial / causal-diagonal / padded tiles only)
//   m' = max(m, max_j S^T), alpha = exp2(m - m'), P^T = exp2(S^T - m'), l = alpha l + sum_j P^T
//   O = alpha O + P V                 (gemm: broadcast P^T[j][c], FMA with the V row j)
// Query tiles of at most kDecodeRows rows (decoding) take decode_tile instead: rows as vectors over
// head_dim, scores W keys at a time (see there).
// Running maxima start at -1e30, not -inf, so exp2 never sees inf - inf: a column without any
// allowed key keeps l = 0 and gets out = 0, lse = -inf.
// Backward (probabilities recomputed from lse2 = lse * log2(e)):
//   dQ item (b, h, query tile), row CSR: P^T = exp2(S^T - lse2), dP^T = V dO^T,
//     dS^T = P^T (dP^T - delta), dQ += dS K; dq = scale dQ.
//   dK/dV item (b, kv head, key tile), column CSR over the group's query heads:
//     dV += P^T dO, dK += dS^T Q; dk = scale dK.
#pragma once
#include "common/cpu_with_count.h"

namespace slimformer::attention {
namespace {  // internal linkage: one copy per ISA

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegBig = -1e30f;  // running-max floor (see above)
constexpr int kFar = 1 << 30;      // "no bound" for column intervals

inline int clamp_col(int64_t c) { return static_cast<int>(std::min<int64_t>(std::max<int64_t>(c, -kFar), kFar)); }

inline int64_t elem_size(ElemType t) { return t == ElemType::kFloat32 ? 4 : 2; }

// dst[0:n] = src[off : off + n] * mul as float.
template <class V>
inline void load_row(ElemType t, const void* src, int64_t off, int64_t n, float mul, float* dst) {
  if (t == ElemType::kFloat32) {
    const float* s = static_cast<const float*>(src) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = s[i] * mul;
  } else if (t == ElemType::kBFloat16) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + off;
    for (int64_t i = 0; i < n; ++i) dst[i] = bf16_bits_to_float(s[i]) * mul;
  } else {
    V::convert_f16(static_cast<const uint16_t*>(src) + off, n, mul, dst);
  }
}

// ---- micro-kernels ------------------------------------------------------------------------------

// S[m][c] = sum_{d<D} K[m*ldk + d] * X[d*ldx + c], M key rows, N vectors of columns.
template <class V, int M, int N>
inline void kq_block(int64_t D, const float* K, int64_t ldk, const float* X, int64_t ldx, float* S, int64_t lds) {
  using F = typename V::F;
  F acc[M][N];
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) acc[m][n] = V::zero();
  const float* kr[M];
  for (int m = 0; m < M; ++m) kr[m] = K + m * ldk;
  for (int64_t d = 0; d < D; ++d) {
    F x[N];
    for (int n = 0; n < N; ++n) x[n] = V::load(X + d * ldx + n * V::W);
    for (int m = 0; m < M; ++m) {
      const F k = V::set1(kr[m][d]);
      for (int n = 0; n < N; ++n) acc[m][n] = V::fma(k, x[n], acc[m][n]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) V::store(S + m * lds + n * V::W, acc[m][n]);
}

// S [rows][nv * W] = K [rows][D] (row stride ldk) times X [D][nv * W] (row stride ldx).
template <class V>
void kq(int64_t rows, int64_t D, const float* K, int64_t ldk, const float* X, int64_t ldx, int nv, float* S,
        int64_t lds) {
  for (int c0 = 0; c0 < nv; c0 += V::KQ_NV) {
    const float* Xc = X + c0 * V::W;
    float* Sc = S + c0 * V::W;
    with_count<V::KQ_NV>(std::min(V::KQ_NV, nv - c0), [&](auto n) {
      constexpr int N = decltype(n)::value;
      int64_t r = 0;
      for (; r + V::KQ_MR <= rows; r += V::KQ_MR)
        kq_block<V, V::KQ_MR, N>(D, K + r * ldk, ldk, Xc, ldx, Sc + r * lds, lds);
      if (r < rows)
        with_count<V::KQ_MR - 1>(static_cast<int>(rows - r), [&](auto m) {
          kq_block<V, decltype(m)::value, N>(D, K + r * ldk, ldk, Xc, ldx, Sc + r * lds, lds);
        });
    });
  }
}

// C[m][0 : N*W] = (C * row_scale[m] | C | 0) + sum_{t<T} A[m*a_rs + t*a_ts] * B[t*ldb + 0 : N*W].
template <class V, int M, int N>
inline void gemm_block(int64_t T, const float* A, int64_t a_rs, int64_t a_ts, const float* B, int64_t ldb, float* C,
                       int64_t ldc, const float* row_scale, bool accumulate) {
  using F = typename V::F;
  F acc[M][N];
  const float* ar[M];
  for (int m = 0; m < M; ++m) {
    ar[m] = A + m * a_rs;
    const F s = row_scale ? V::set1(row_scale[m]) : V::zero();
    for (int n = 0; n < N; ++n) {
      if (!accumulate) {
        acc[m][n] = V::zero();
      } else {
        const F c = V::load(C + m * ldc + n * V::W);
        acc[m][n] = row_scale ? V::mul(c, s) : c;
      }
    }
  }
  for (int64_t t = 0; t < T; ++t) {
    F b[N];
    for (int n = 0; n < N; ++n) b[n] = V::load(B + t * ldb + n * V::W);
    for (int m = 0; m < M; ++m) {
      const F a = V::set1(ar[m][t * a_ts]);
      for (int n = 0; n < N; ++n) acc[m][n] = V::fma(a, b[n], acc[m][n]);
    }
  }
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) V::store(C + m * ldc + n * V::W, acc[m][n]);
}

// C [rows][cols] (+)= A B with A addressed as above and B [T][cols]; cols a multiple of W.
template <class V>
void gemm(int64_t rows, int64_t cols, int64_t T, const float* A, int64_t a_rs, int64_t a_ts, const float* B,
          int64_t ldb, float* C, int64_t ldc, const float* row_scale, bool accumulate) {
  const int nv = static_cast<int>(cols / V::W);
  int64_t r = 0;
  auto rows_of = [&](auto m) {
    constexpr int M = decltype(m)::value;
    for (int c0 = 0; c0 < nv; c0 += V::GM_NV) {
      with_count<V::GM_NV>(std::min(V::GM_NV, nv - c0), [&](auto n) {
        gemm_block<V, M, decltype(n)::value>(T, A + r * a_rs, a_rs, a_ts, B + c0 * V::W, ldb, C + r * ldc + c0 * V::W,
                                            ldc, row_scale ? row_scale + r : nullptr, accumulate);
      });
    }
  };
  for (; r + V::GM_MR <= rows; r += V::GM_MR) rows_of(IntTag<V::GM_MR>{});
  if (r < rows) with_count<V::GM_MR - 1>(static_cast<int>(rows - r), rows_of);
}

// ---- masks ----------------------------------------------------------------------------------------

// Row of nv column vectors: keep columns in [lo, hi] (or, with gq, global query columns >= clo).
template <class V>
inline void mask_row(float* s, int nv, int lo, int hi, const float* gq, int clo) {
  for (int v = 0; v < nv; ++v) {
    const int c0 = v * V::W;
    if (c0 >= lo && c0 + V::W - 1 <= hi) continue;
    float* p = s + c0;
    V::store(p, gq ? V::keep_range_or(V::load(p), c0, lo, hi, gq + c0, clo) : V::keep_range(V::load(p), c0, lo, hi));
  }
}

template <class V>
inline void fill_row(float* s, int nv, float value) {
  const typename V::F x = V::set1(value);
  for (int v = 0; v < nv; ++v) V::store(s + v * V::W, x);
}

// The element rule on S^T [nk][nv*W] of key tile (j0, nk) against queries at positions p_lo + c.
// gq: 1.0f / 0.0f per column for global query positions, or null when the tile has none.
template <class V>
void mask_tile(const SparseAttentionParams& p, int64_t b, float* S, int64_t lds, int64_t p_lo, int nv, int64_t j0,
               int64_t nk, bool full, const float* gq) {
  const bool diag = p.causal && j0 + nk - 1 > p_lo;  // some key of the tile lies after some query
  const uint8_t* km = p.key_mask ? p.key_mask + b * p.key_mask_stride_b + j0 : nullptr;
  if (full && !diag && !km) return;
  const uint8_t* g = p.global_mask;
  const float ninf = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < nk; ++j) {
    float* row = S + j * lds;
    if (km && !km[j]) {
      fill_row<V>(row, nv, ninf);
      continue;
    }
    const int64_t jj = j0 + j;
    const int clo = p.causal ? clamp_col(jj - p_lo) : -kFar;  // causal: query position >= key position
    if (full || (g && g[jj])) {
      if (clo > 0) mask_row<V>(row, nv, clo, kFar, nullptr, 0);
      continue;
    }
    int lo = 1, hi = 0;  // empty unless a window
    if (p.window_left >= 0) {
      // -left <= j - pos <= right  <=>  j - right <= pos <= j + left
      lo = clamp_col(jj - p.window_right - p_lo);
      hi = clamp_col(jj + p.window_left - p_lo);
    }
    mask_row<V>(row, nv, std::max(lo, clo), hi, gq, clo);
  }
}

// ---- per-item helpers -----------------------------------------------------------------------------

struct QueryTile {
  int64_t p_lo = 0, i0 = 0;  // first absolute position, first query row
  int64_t nq = 0;            // rows in this tile
  int nv = 0;                // column vectors (nq rounded up to W)
};

template <class V>
inline QueryTile query_tile(const SparseAttentionParams& p, int64_t r) {
  const int64_t t = r + p.first_q_block;
  QueryTile qt;
  qt.p_lo = std::max<int64_t>(t * p.block_size, p.q_offset);
  const int64_t p_hi = std::min<int64_t>((t + 1) * p.block_size, p.q_offset + p.q_len);
  qt.nq = p_hi - qt.p_lo;
  qt.i0 = qt.p_lo - p.q_offset;
  qt.nv = static_cast<int>((qt.nq + V::W - 1) / V::W);
  return qt;
}

// Scratch of one thread, every buffer O(block_size * head_dim): staged rows, the packed Q^T of the
// forward, score tiles S^T and dP^T, the output / dQ accumulator, converted key and value rows, and
// per-column statistics (running max / lse2, sum / delta, alpha, global-query flags).
// One uninitialised allocation (every user writes what it reads); the forward needs no P2.
struct Scratch {
  struct Buf {
    float* p = nullptr;
    float* data() const { return p; }
    float& operator[](int64_t i) const { return p[i]; }
  };
  std::unique_ptr<float[]> mem;
  Buf rows, Xt, S, P2, acc, kpack, vpack, col_a, col_b, col_c, gq;
  int64_t Dp = 0, bsp = 0;
  Scratch(int64_t bs, int64_t D, int W, bool backward = true) {
    Dp = (D + W - 1) / W * W;
    bsp = (bs + W - 1) / W * W;
    const int64_t a = bsp * Dp, x = D * bsp, s = bsp * bsp, c = bsp;
    mem.reset(new float[4 * a + x + (backward ? 2 : 1) * s + 4 * c]);
    float* q = mem.get();
    for (Buf* b : {&rows, &kpack, &vpack, &acc}) b->p = q, q += a;
    Xt.p = q, q += x;
    S.p = q, q += s;
    if (backward) P2.p = q, q += s;
    for (Buf* b : {&col_a, &col_b, &col_c, &gq}) b->p = q, q += c;
  }
};

// Rows [i0, i0+n) of a [.., S, D] tensor as float [n][Dp] (zero padded) scaled by mul.
template <class V>
inline void pack_rows(ElemType t, const void* base, int64_t off, int64_t stride_s, int64_t n, int64_t D, int64_t Dp,
                      float mul, float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    load_row<V>(t, base, off + i * stride_s, D, mul, dst + i * Dp);
    for (int64_t d = D; d < Dp; ++d) dst[i * Dp + d] = 0.0f;
  }
}

// rows [n][Dp] -> Xt [D][nv*W], padding columns zero.
inline void transpose_rows(const float* rows, int64_t n, int64_t D, int64_t Dp, int64_t ld, float* Xt) {
  for (int64_t d = 0; d < D; ++d) {
    float* x = Xt + d * ld;
    for (int64_t i = 0; i < n; ++i) x[i] = rows[i * Dp + d];
    for (int64_t i = n; i < ld; ++i) x[i] = 0.0f;
  }
}

// Key or value rows [j0, j0+nk) of (b, kv head): a pointer straight into fp32 input whose rows
// need no padding, else converted into buf [nk][Dp].
template <class V>
inline const float* kv_rows(ElemType t, const void* base, int64_t off, int64_t stride_s, int64_t nk, int64_t D,
                            int64_t Dp, float* buf, int64_t& ld) {
  if (t == ElemType::kFloat32 && D == Dp) {
    ld = stride_s;
    return static_cast<const float*>(base) + off;
  }
  pack_rows<V>(t, base, off, stride_s, nk, D, Dp, 1.0f, buf);
  ld = Dp;
  return buf;
}

// Key tile c of (b, kv head hk): its key and value rows [j0, j0 + nk) as fp32 (kv_rows).
struct KeyTile {
  int64_t j0, nk, ldk, ldv;
  const float *K, *Vr;
};

template <class V>
inline KeyTile key_tile(const SparseAttentionParams& p, const SparseAttentionCpuData& io, Scratch& sc, int64_t b,
                        int64_t hk, int64_t c, int64_t D, int64_t Dp) {
  KeyTile t;
  t.j0 = c * p.block_size;
  t.nk = std::min<int64_t>(p.block_size, p.kv_len - t.j0);
  t.K = kv_rows<V>(io.dtype, io.k, b * p.k_stride_b + hk * p.k_stride_h + t.j0 * p.k_stride_s, p.k_stride_s, t.nk,
                   D, Dp, sc.kpack.data(), t.ldk);
  t.Vr = kv_rows<V>(io.dtype, io.v, b * p.v_stride_b + hk * p.v_stride_h + t.j0 * p.v_stride_s, p.v_stride_s, t.nk,
                    D, Dp, sc.vpack.data(), t.ldv);
  return t;
}

// Global-query columns of a tile into gq; returns gq or null when there is none.
inline const float* global_cols(const SparseAttentionParams& p, const QueryTile& qt, int W, float* gq) {
  if (!p.global_mask) return nullptr;
  bool any = false;
  for (int64_t c = 0; c < qt.nv * W; ++c) {
    const bool g = c < qt.nq && p.global_mask[qt.p_lo + c];
    gq[c] = g ? 1.0f : 0.0f;
    any |= g;
  }
  return any ? gq : nullptr;
}

// S^T -> exp2(S^T - lse2[c]) in place (backward: probabilities from the saved statistics).
template <class V>
inline void probs_from_lse(float* S, int64_t lds, int64_t nk, int nv, const float* lse2) {
  for (int v = 0; v < nv; ++v) {
    const typename V::F l = V::load(lse2 + v * V::W);
    for (int64_t j = 0; j < nk; ++j) {
      float* s = S + j * lds + v * V::W;
      V::store(s, V::exp2(V::sub(V::load(s), l)));
    }
  }
}

// S^T = P^T * (dP^T - delta[c]) in place.
template <class V>
inline void dscores(float* S, const float* DP, int64_t lds, int64_t nk, int nv, const float* delta) {
  for (int v = 0; v < nv; ++v) {
    const typename V::F dl = V::load(delta + v * V::W);
    for (int64_t j = 0; j < nk; ++j) {
      float* s = S + j * lds + v * V::W;
      V::store(s, V::mul(V::load(s), V::sub(V::load(DP + j * lds + v * V::W), dl)));
    }
  }
}

// out = O / l and lse = (m + log2 l) ln 2 for the tile's rows; rows with l = 0: zeros and -inf.
inline void write_rows(const SparseAttentionParams& p, const SparseAttentionCpuData& io, int64_t b, int64_t h,
                       const QueryTile& qt, const float* O, int64_t Dp, const float* m, const float* l) {
  const int64_t D = p.head_dim;
  float* out = io.out + ((b * p.q_heads + h) * p.q_len + qt.i0) * D;
  float* lse = io.lse + (b * p.q_heads + h) * p.q_len + qt.i0;
  for (int64_t i = 0; i < qt.nq; ++i) {
    if (l[i] > 0.0f) {
      const float inv = 1.0f / l[i];
      for (int64_t d = 0; d < D; ++d) out[i * D + d] = O[i * Dp + d] * inv;
      lse[i] = (m[i] + std::log2(l[i])) * kLn2;
    } else {
      for (int64_t d = 0; d < D; ++d) out[i * D + d] = 0.0f;
      lse[i] = -std::numeric_limits<float>::infinity();
    }
  }
}

// ---- decode (query tiles of at most kDecodeRows rows) ---------------------------------------------
// With a few query rows, Q^T columns would leave most lanes idle. Instead each row is a vector over
// head_dim and scores come W keys at a time: acc[kk] = sum_d q[d] k_kk[d] lane-wise, then one
// transposing add tree (V::sum_lanes) puts key kk's score in lane kk. The score rows S [nq][keys]
// are then masked and exponentiated along keys, and O += P V is the forward's gemm with P read
// row-wise. Same statistics (m, l, alpha per row) and the same exp2 as the tile path.
constexpr int64_t kDecodeRows = 4;

// Lane kk = q . kr[kk] over nvd vectors (rows zero padded to a multiple of W).
template <class V>
inline typename V::F dot_keys(const float* q, const float* const* kr, int64_t nvd) {
  using F = typename V::F;
  F acc[V::W];
  for (int kk = 0; kk < V::W; ++kk) acc[kk] = V::zero();
  for (int64_t dv = 0; dv < nvd; ++dv) {
    const F x = V::load(q + dv * V::W);
    for (int kk = 0; kk < V::W; ++kk) acc[kk] = V::fma(x, V::load(kr[kk] + dv * V::W), acc[kk]);
  }
  return V::sum_lanes(acc);
}

// O = a O + sum_{j<nk} P[j] V_j for one row, N vectors of columns; the keys are spread over four
// accumulator sets so that one row is not bound by the latency of a single FMA chain.
template <class V, int N>
inline void pv_block(int64_t nk, const float* P, const float* Vr, int64_t ldv, float* O, float a) {
  using F = typename V::F;
  F acc[4][N];
  for (int u = 0; u < 4; ++u)
    for (int n = 0; n < N; ++n) acc[u][n] = V::zero();
  int64_t j = 0;
  for (; j + 4 <= nk; j += 4)
    for (int u = 0; u < 4; ++u) {
      const F pj = V::set1(P[j + u]);
      const float* vr = Vr + (j + u) * ldv;
      for (int n = 0; n < N; ++n) acc[u][n] = V::fma(pj, V::load(vr + n * V::W), acc[u][n]);
    }
  for (; j < nk; ++j) {
    const F pj = V::set1(P[j]);
    for (int n = 0; n < N; ++n) acc[0][n] = V::fma(pj, V::load(Vr + j * ldv + n * V::W), acc[0][n]);
  }
  const F s = V::set1(a);
  for (int n = 0; n < N; ++n)
    V::store(O + n * V::W,
             V::fma(V::load(O + n * V::W), s, V::add(V::add(acc[0][n], acc[1][n]), V::add(acc[2][n], acc[3][n]))));
}

template <class V>
inline float lane_max(typename V::F x) {
  float t[V::W];
  V::store(t, x);
  float r = t[0];
  for (int i = 1; i < V::W; ++i) r = t[i] > r ? t[i] : r;
  return r;
}

template <class V>
inline float lane_sum(typename V::F x) {
  float t[V::W];
  V::store(t, x);
  float r = 0.0f;
  for (int i = 0; i < V::W; ++i) r += t[i];
  return r;
}

// The element rule on the score row s [nkw] of key tile (j0, nk) for the query at position pos;
// lanes at and beyond nk (duplicated keys) become -inf.
template <class V>
void mask_keys(const SparseAttentionParams& p, int64_t b, float* s, int64_t pos, int64_t j0, int64_t nk, int64_t nkw,
               bool full) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const uint8_t* g = p.global_mask;
  const bool all = full || (g && g[pos]);
  const int64_t chi = p.causal ? pos - j0 : int64_t{kFar};  // causal: key offset <= pos - j0
  if (all || !g) {
    int64_t lo = 1, hi = 0;  // empty unless a window
    if (all) {
      lo = -kFar, hi = kFar;
    } else if (p.window_left >= 0) {
      lo = pos - p.window_left - j0;
      hi = pos + p.window_right - j0;
    }
    hi = std::min<int64_t>({hi, chi, nk - 1});
    if (lo > 0 || hi < nkw - 1) mask_row<V>(s, static_cast<int>(nkw / V::W), clamp_col(lo), clamp_col(hi), nullptr, 0);
  } else {  // partial tile, non-global query, global keys: element by element
    for (int64_t j = 0; j < nkw; ++j) {
      const int64_t jj = j0 + j;
      const bool win = p.window_left >= 0 && jj >= pos - p.window_left && jj <= pos + p.window_right;
      if (j >= nk || j > chi || !(win || g[jj])) s[j] = ninf;
    }
  }
  if (p.key_mask) {
    const uint8_t* km = p.key_mask + b * p.key_mask_stride_b + j0;
    for (int64_t j = 0; j < nk; ++j)
      if (!km[j]) s[j] = ninf;
  }
}

// One query tile of nq <= kDecodeRows rows, Q packed as rows [nq][Dp] (scale * log2(e) folded in):
// fills O [nq][Dp], m and l like the tile path.
template <class V>
void decode_tile(const SparseAttentionParams& p, const SparseAttentionCpuData& io, Scratch& sc, int64_t b, int64_t hk,
                 int64_t lh, int64_t r, const QueryTile& qt) {
  using F = typename V::F;
  const int64_t D = p.head_dim, Dp = sc.Dp, ld = sc.bsp, nvd = Dp / V::W, nq = qt.nq;
  const float* Q = sc.rows.data();
  float *S = sc.S.data(), *O = sc.acc.data();
  float *m = sc.col_a.data(), *l = sc.col_b.data(), *alpha = sc.col_c.data();
  for (int64_t i = 0; i < nq; ++i) {
    m[i] = kNegBig;
    l[i] = 0.0f;
  }
  std::fill(O, O + nq * Dp, 0.0f);
  const int32_t* rp = p.row_ptr + lh * (p.num_q_blocks + 1);
  for (int32_t e = rp[r]; e < rp[r + 1]; ++e) {
    const KeyTile kt = key_tile<V>(p, io, sc, b, hk, p.col_idx[e], D, Dp);
    const int64_t j0 = kt.j0, nk = kt.nk, ldk = kt.ldk, ldv = kt.ldv, nkw = (nk + V::W - 1) / V::W * V::W;
    const float *K = kt.K, *Vr = kt.Vr;
    const bool full = p.col_full[e] != 0;
    for (int64_t c0 = 0; c0 < nkw; c0 += V::W) {
      const float* kr[V::W];
      for (int kk = 0; kk < V::W; ++kk) kr[kk] = K + std::min<int64_t>(c0 + kk, nk - 1) * ldk;
      for (int64_t i = 0; i < nq; ++i) V::store(S + i * ld + c0, dot_keys<V>(Q + i * Dp, kr, nvd));
    }
    const bool diag = p.causal && j0 + nk - 1 > qt.p_lo;
    for (int64_t i = 0; i < nq; ++i) {
      float* s = S + i * ld;
      if (!full || diag || p.key_mask || nkw > nk) mask_keys<V>(p, b, s, qt.p_lo + i, j0, nk, nkw, full);
      F mv = V::set1(m[i]);
      for (int64_t c0 = 0; c0 < nkw; c0 += V::W) mv = V::max(mv, V::load(s + c0));
      const float mx = lane_max<V>(mv);
      const F mb = V::set1(mx);
      F sum = V::zero();
      for (int64_t c0 = 0; c0 < nkw; c0 += V::W) {
        const F e2 = V::exp2(V::sub(V::load(s + c0), mb));
        V::store(s + c0, e2);
        sum = V::add(sum, e2);
      }
      float a[V::W];
      V::store(a, V::exp2(V::set1(m[i] - mx)));
      alpha[i] = a[0];
      l[i] = l[i] * a[0] + lane_sum<V>(sum);
      m[i] = mx;
    }
    for (int64_t i = 0; i < nq; ++i)
      for (int64_t c0 = 0; c0 < nvd; c0 += V::GM_NV)
        with_count<V::GM_NV>(static_cast<int>(std::min<int64_t>(V::GM_NV, nvd - c0)), [&](auto n) {
          pv_block<V, decltype(n)::value>(nk, S + i * ld, Vr + c0 * V::W, ldv, O + i * Dp + c0 * V::W, alpha[i]);
        });
  }
}

// ---- forward --------------------------------------------------------------------------------------

template <class V>
void fwd_range(const SparseAttentionParams& p, const SparseAttentionCpuData& io, int64_t it0, int64_t it1) {
  using F = typename V::F;
  const int64_t D = p.head_dim, groups = p.q_heads / p.kv_heads;
  Scratch sc(p.block_size, D, V::W, /*backward=*/false);
  const int64_t Dp = sc.Dp, ld = sc.bsp;
  const float qmul = p.scale * kLog2e;
  float *Qt = sc.Xt.data(), *S = sc.S.data(), *O = sc.acc.data();
  float *m = sc.col_a.data(), *l = sc.col_b.data(), *alpha = sc.col_c.data();
  for (int64_t it = it0; it < it1; ++it) {
    const int64_t g = it % groups, r = (it / groups) % p.num_q_blocks;
    const int64_t hk = (it / groups / p.num_q_blocks) % p.kv_heads, b = it / groups / p.num_q_blocks / p.kv_heads;
    const int64_t h = hk * groups + g, lh = p.layout_heads == 1 ? 0 : h;
    const QueryTile qt = query_tile<V>(p, r);
    pack_rows<V>(io.dtype, io.q, b * p.q_stride_b + h * p.q_stride_h + qt.i0 * p.q_stride_s, p.q_stride_s, qt.nq, D,
                 Dp, qmul, sc.rows.data());
    if (qt.nq <= kDecodeRows) {
      decode_tile<V>(p, io, sc, b, hk, lh, r, qt);
      write_rows(p, io, b, h, qt, O, Dp, m, l);
      continue;
    }
    transpose_rows(sc.rows.data(), qt.nq, D, Dp, ld, Qt);
    const float* gq = global_cols(p, qt, V::W, sc.gq.data());
    for (int64_t c = 0; c < qt.nv * V::W; ++c) {
      m[c] = kNegBig;
      l[c] = 0.0f;
    }
    std::fill(O, O + qt.nq * Dp, 0.0f);
    const int32_t* rp = p.row_ptr + lh * (p.num_q_blocks + 1);
    for (int32_t e = rp[r]; e < rp[r + 1]; ++e) {
      const KeyTile kt = key_tile<V>(p, io, sc, b, hk, p.col_idx[e], D, Dp);
      const int64_t j0 = kt.j0, nk = kt.nk, ldk = kt.ldk, ldv = kt.ldv;
      const float *K = kt.K, *Vr = kt.Vr;
      kq<V>(nk, D, K, ldk, Qt, ld, qt.nv, S, ld);
      mask_tile<V>(p, b, S, ld, qt.p_lo, qt.nv, j0, nk, p.col_full[e] != 0, gq);
      for (int v = 0; v < qt.nv; ++v) {
        const F mo = V::load(m + v * V::W);
        F mx = mo;
        for (int64_t j = 0; j < nk; ++j) mx = V::max(mx, V::load(S + j * ld + v * V::W));
        F sum = V::zero();
        for (int64_t j = 0; j < nk; ++j) {
          float* s = S + j * ld + v * V::W;
          const F e2 = V::exp2(V::sub(V::load(s), mx));
          V::store(s, e2);
          sum = V::add(sum, e2);
        }
        const F a = V::exp2(V::sub(mo, mx));
        V::store(alpha + v * V::W, a);
        V::store(l + v * V::W, V::fma(V::load(l + v * V::W), a, sum));
        V::store(m + v * V::W, mx);
      }
      gemm<V>(qt.nq, Dp, nk, S, 1, ld, Vr, ldv, O, Dp, alpha, true);
    }
    write_rows(p, io, b, h, qt, O, Dp, m, l);
  }
}

// ---- backward -------------------------------------------------------------------------------------

// Offset of (b, h, query tile r) in the backward's Q^T / dO^T caches.
inline int64_t cache_slot(const SparseAttentionParams& p, int64_t b, int64_t h, int64_t r) {
  return ((b * p.q_heads + h) * p.num_q_blocks + r) * p.head_dim * p.block_size;
}

// lse2 / delta of the tile's query rows into col_a / col_b (padding columns: +inf / 0, so P = 0).
inline void query_cols(const SparseAttentionParams& p, const SparseAttentionCpuData& io, Scratch& sc, int64_t b,
                       int64_t h, const QueryTile& qt) {
  const int64_t roff = (b * p.q_heads + h) * p.q_len + qt.i0;
  for (int64_t c = 0; c < sc.bsp; ++c) {
    const bool in = c < qt.nq;
    sc.col_a[c] = in ? io.lse2[roff + c] : std::numeric_limits<float>::infinity();
    sc.col_b[c] = in ? io.delta[roff + c] : 0.0f;
  }
}

template <class V>
void dq_range(const SparseAttentionParams& p, const SparseAttentionCpuData& io, int64_t it0, int64_t it1) {
  const int64_t D = p.head_dim, groups = p.q_heads / p.kv_heads;
  Scratch sc(p.block_size, D, V::W);
  const int64_t Dp = sc.Dp, ld = sc.bsp;
  float *S = sc.S.data(), *DP = sc.P2.data(), *dQ = sc.acc.data();
  for (int64_t it = it0; it < it1; ++it) {
    const int64_t g = it % groups, r = (it / groups) % p.num_q_blocks;
    const int64_t hk = (it / groups / p.num_q_blocks) % p.kv_heads, b = it / groups / p.num_q_blocks / p.kv_heads;
    const int64_t h = hk * groups + g, lh = p.layout_heads == 1 ? 0 : h;
    const QueryTile qt = query_tile<V>(p, r);
    // Q^T (scores in the forward's log2 units) and dO^T, kept for the dK / dV pass.
    float* Xt = io.qt_cache + cache_slot(p, b, h, r);
    float* Yt = io.dot_cache + cache_slot(p, b, h, r);
    pack_rows<V>(io.dtype, io.q, b * p.q_stride_b + h * p.q_stride_h + qt.i0 * p.q_stride_s, p.q_stride_s, qt.nq, D,
                 Dp, p.scale * kLog2e, sc.rows.data());
    transpose_rows(sc.rows.data(), qt.nq, D, Dp, ld, Xt);
    pack_rows<V>(io.dtype, io.dout, ((b * p.q_heads + h) * p.q_len + qt.i0) * D, D, qt.nq, D, Dp, 1.0f,
                 sc.rows.data());
    transpose_rows(sc.rows.data(), qt.nq, D, Dp, ld, Yt);
    if (io.dq_pack_only) continue;
    query_cols(p, io, sc, b, h, qt);
    const float* gq = global_cols(p, qt, V::W, sc.gq.data());
    std::fill(dQ, dQ + qt.nq * Dp, 0.0f);
    const int32_t* rp = p.row_ptr + lh * (p.num_q_blocks + 1);
    for (int32_t e = rp[r]; e < rp[r + 1]; ++e) {
      const KeyTile kt = key_tile<V>(p, io, sc, b, hk, p.col_idx[e], D, Dp);
      const int64_t j0 = kt.j0, nk = kt.nk, ldk = kt.ldk, ldv = kt.ldv;
      const float *K = kt.K, *Vr = kt.Vr;
      kq<V>(nk, D, K, ldk, Xt, ld, qt.nv, S, ld);
      mask_tile<V>(p, b, S, ld, qt.p_lo, qt.nv, j0, nk, p.col_full[e] != 0, gq);
      probs_from_lse<V>(S, ld, nk, qt.nv, sc.col_a.data());
      kq<V>(nk, D, Vr, ldv, Yt, ld, qt.nv, DP, ld);
      dscores<V>(S, DP, ld, nk, qt.nv, sc.col_b.data());
      gemm<V>(qt.nq, Dp, nk, S, 1, ld, K, ldk, dQ, Dp, nullptr, true);
    }
    float* dq = io.dq + ((b * p.q_heads + h) * p.q_len + qt.i0) * D;
    for (int64_t i = 0; i < qt.nq; ++i)
      for (int64_t d = 0; d < D; ++d) dq[i * D + d] = dQ[i * Dp + d] * p.scale;
  }
}

template <class V>
void dkdv_range(const SparseAttentionParams& p, const SparseAttentionCpuData& io, int64_t it0, int64_t it1) {
  const int64_t D = p.head_dim, groups = p.q_heads / p.kv_heads;
  Scratch sc(p.block_size, D, V::W);
  const int64_t Dp = sc.Dp, ld = sc.bsp;
  std::vector<float> qrows(sc.bsp * Dp), orows(sc.bsp * Dp), dK(sc.bsp * Dp), dV(sc.bsp * Dp);
  float *S = sc.S.data(), *DP = sc.P2.data();
  const int64_t tiles = io.fuse_dq ? p.num_k_blocks : 1;
  for (int64_t it = it0 * tiles; it < it1 * tiles; ++it) {  // fused: all key tiles of (b, kv head)
    const int64_t c = it % p.num_k_blocks, hk = (it / p.num_k_blocks) % p.kv_heads;
    const int64_t b = it / p.num_k_blocks / p.kv_heads;
    const KeyTile kt = key_tile<V>(p, io, sc, b, hk, c, D, Dp);
    const int64_t j0 = kt.j0, nk = kt.nk, ldk = kt.ldk, ldv = kt.ldv;
    const float *K = kt.K, *Vr = kt.Vr;
    std::fill(dK.begin(), dK.end(), 0.0f);
    std::fill(dV.begin(), dV.end(), 0.0f);
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t h = hk * groups + g, lh = p.layout_heads == 1 ? 0 : h;
      const int32_t* cp = p.col_ptr + lh * (p.num_k_blocks + 1);
      for (int32_t e = cp[c]; e < cp[c + 1]; ++e) {
        const int64_t r = p.row_idx[e];
        const QueryTile qt = query_tile<V>(p, r);
        const float* Xt = io.qt_cache + cache_slot(p, b, h, r);
        const float* Yt = io.dot_cache + cache_slot(p, b, h, r);
        int64_t ldq, ldo;
        const float* Qr = kv_rows<V>(io.dtype, io.q, b * p.q_stride_b + h * p.q_stride_h + qt.i0 * p.q_stride_s,
                                     p.q_stride_s, qt.nq, D, Dp, qrows.data(), ldq);
        const float* dOr = kv_rows<V>(io.dtype, io.dout, ((b * p.q_heads + h) * p.q_len + qt.i0) * D, D, qt.nq, D, Dp,
                                      orows.data(), ldo);
        query_cols(p, io, sc, b, h, qt);
        const float* gq = global_cols(p, qt, V::W, sc.gq.data());
        kq<V>(nk, D, K, ldk, Xt, ld, qt.nv, S, ld);
        mask_tile<V>(p, b, S, ld, qt.p_lo, qt.nv, j0, nk, p.row_full[e] != 0, gq);
        probs_from_lse<V>(S, ld, nk, qt.nv, sc.col_a.data());
        gemm<V>(nk, Dp, qt.nq, S, ld, 1, dOr, ldo, dV.data(), Dp, nullptr, true);
        kq<V>(nk, D, Vr, ldv, Yt, ld, qt.nv, DP, ld);
        dscores<V>(S, DP, ld, nk, qt.nv, sc.col_b.data());
        gemm<V>(nk, Dp, qt.nq, S, ld, 1, Qr, ldq, dK.data(), Dp, nullptr, true);
        if (io.fuse_dq) {  // dq rows of (b, h, tile r) += scale * dS K
          float* dQ = sc.acc.data();
          gemm<V>(qt.nq, Dp, nk, S, 1, ld, K, ldk, dQ, Dp, nullptr, false);
          float* dq = io.dq + ((b * p.q_heads + h) * p.q_len + qt.i0) * D;
          for (int64_t i = 0; i < qt.nq; ++i)
            for (int64_t d = 0; d < D; ++d) dq[i * D + d] += dQ[i * Dp + d] * p.scale;
        }
      }
    }
    float* dk = io.dk + ((b * p.kv_heads + hk) * p.kv_len + j0) * D;
    float* dv = io.dv + ((b * p.kv_heads + hk) * p.kv_len + j0) * D;
    for (int64_t j = 0; j < nk; ++j)
      for (int64_t d = 0; d < D; ++d) {
        dk[j * D + d] = dK[j * Dp + d] * p.scale;
        dv[j * D + d] = dV[j * Dp + d];
      }
  }
}

}  // namespace
}  // namespace slimformer::attention
