// slimformer._C._test_sparse_cuda_* : the CUDA sparse attention kernels' index, mask and softmax math
// (sparse_attention_cuda_math.h) and host replays of the kernels, CTA by CTA, warp by warp and lane by
// lane with the same functions, for tests/test_sparse_attention_cuda_math.py. Barriers become loop
// boundaries, shuffles the same butterflies over emulated lanes, mma.sync a 16x16x8 product that
// gathers and scatters its operands through the fragment maps, the fp16/bf16 conversions a
// round-to-nearest-even to 11 / 8 significant bits. Compiled into every build (CPU-only too): nothing
// here needs CUDA or torch. Included by module.cpp only.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

#include "attention/sparse_attention_cuda_math.h"
#include "common/numpy_arrays.h"

namespace slimformer {
namespace attention {
namespace cuda {
namespace test_hooks {

namespace py = pybind11;

// What the hardware conversion to the kernel's 16-bit type does (round to nearest even); mode 0: fp32.
inline float round_to(float x, int mode) {
  if (mode == 0 || x == 0.0f || !std::isfinite(x)) return x;
  const int bits = mode == 1 ? 11 : 8, min_exp = mode == 1 ? -14 : -126;
  int e;
  std::frexp(x, &e);            // x = m * 2^e, 0.5 <= |m| < 1
  const int q = std::max(e - 1, min_exp) - (bits - 1);  // quantum exponent (subnormals share min_exp)
  return static_cast<float>(std::ldexp(std::nearbyint(std::ldexp(static_cast<double>(x), -q)), q));
}

// The problem of one replay: arrays kept alive, params pointing at them (host pointers).
struct Problem {
  F32Array q, k, v;
  I32Array row_ptr, col_idx, col_ptr, row_idx;
  U8Array col_full, row_full;
  std::optional<U8Array> global_mask, key_mask;
  SparseAttentionParams p;
};

inline Problem make_problem(const F32Array& q, const F32Array& k, const F32Array& v, const I32Array& row_ptr,
                            const I32Array& col_idx, const U8Array& col_full, const I32Array& col_ptr,
                            const I32Array& row_idx, const U8Array& row_full,
                            const std::optional<U8Array>& global_mask, const std::optional<U8Array>& key_mask,
                            int block_size, int64_t q_offset, int64_t first_q_block, int window_left,
                            int window_right, bool causal, float scale) {
  if (q.ndim() != 4 || k.ndim() != 4 || v.ndim() != 4) throw py::value_error("q, k, v must be [B, H, S, D]");
  if (row_ptr.ndim() != 2 || col_ptr.ndim() != 2 || col_ptr.shape(0) != row_ptr.shape(0))
    throw py::value_error("row_ptr / col_ptr must be [layout_heads, blocks + 1]");
  if (block_size < 16 || block_size % 16) throw py::value_error("block_size must be a multiple of 16");
  Problem pr{q, k, v, row_ptr, col_idx, col_ptr, row_idx, col_full, row_full, global_mask, key_mask, {}};
  SparseAttentionParams& p = pr.p;
  p.batch = q.shape(0);
  p.q_heads = q.shape(1);
  p.q_len = q.shape(2);
  p.head_dim = q.shape(3);
  p.kv_heads = k.shape(1);
  p.kv_len = k.shape(2);
  if (k.shape(0) != p.batch || k.shape(3) != p.head_dim || p.q_heads % p.kv_heads)
    throw py::value_error("k does not fit q");
  const int64_t D = p.head_dim;
  p.q_stride_s = D;
  p.q_stride_h = p.q_len * D;
  p.q_stride_b = p.q_heads * p.q_stride_h;
  p.k_stride_s = p.v_stride_s = D;
  p.k_stride_h = p.v_stride_h = p.kv_len * D;
  p.k_stride_b = p.v_stride_b = p.kv_heads * p.k_stride_h;
  p.block_size = block_size;
  p.q_offset = q_offset;
  p.first_q_block = first_q_block;
  p.layout_heads = static_cast<int>(row_ptr.shape(0));
  p.num_q_blocks = row_ptr.shape(1) - 1;
  p.num_k_blocks = col_ptr.shape(1) - 1;
  p.row_ptr = pr.row_ptr.data();
  p.col_idx = pr.col_idx.data();
  p.col_full = pr.col_full.data();
  p.col_ptr = pr.col_ptr.data();
  p.row_idx = pr.row_idx.data();
  p.row_full = pr.row_full.data();
  p.window_left = window_left;
  p.window_right = window_right;
  p.causal = causal;
  p.global_mask = pr.global_mask ? pr.global_mask->data() : nullptr;
  p.key_mask = pr.key_mask ? pr.key_mask->data() : nullptr;
  p.key_mask_stride_b = p.kv_len;
  p.scale = scale;
  return pr;
}

// sum8 of the kernels: xor butterfly 1, 2, 4 over the 8 lanes of an owner row (all lanes end equal).
inline float sum8(const float* v8) {
  float a[8], b[8];
  for (int u = 0; u < 8; ++u) a[u] = v8[u] + v8[u ^ 1];
  for (int u = 0; u < 8; ++u) b[u] = a[u] + a[u ^ 2];
  return b[0] + b[4];
}

// mma.sync.m16n8k16 on 32 emulated lanes: C[lane][e] += sum_k A[row][k] B[k][n].
inline void mma_host(float (*c)[4], const float (*a)[8], const float (*bf)[4]) {
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    for (int e = 0; e < 8; ++e) A[frag_a_row(l, e)][frag_a_col(l, e)] = a[l][e];
    for (int e = 0; e < 4; ++e) B[frag_b_k(l, e)][frag_b_n(l, e)] = bf[l][e];
  }
  for (int l = 0; l < 32; ++l)
    for (int e = 0; e < 4; ++e) {
      const int r = frag_c_row(l, e), n = frag_c_col(l, e);
      double s = 0;
      for (int kk = 0; kk < 16; ++kk) s += static_cast<double>(A[r][kk]) * B[kk][n];
      c[l][e] += static_cast<float>(s);
    }
}

inline const uint8_t* kmask_row(const SparseAttentionParams& p, int64_t b) {
  return p.key_mask != nullptr ? p.key_mask + b * p.key_mask_stride_b : nullptr;
}

// fwd_mma_kernel<T, D>, replayed (mode 1: fp16, 2: bf16 for the P and output conversions).
inline void replay_fwd_mma(const Problem& pr, int mode, float* out, float* lse_out) {
  const SparseAttentionParams& p = pr.p;
  const int D = static_cast<int>(p.head_dim), KS = D / 16, NT = D / 8;
  const int warps = mma_warps(p.block_size), rows = warps * kMmaRowsPerWarp;
  const float* qd = pr.q.data();
  const float* kd = pr.k.data();
  const float* vd = pr.v.data();
  const float sl2 = p.scale * kLog2e;
  std::vector<float> ks(kKeyChunk * (D + kSmemPad)), vs(kKeyChunk * (D + kSmemPad));
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.q_heads; ++h)
      for (int64_t x = 0; x < cta_count(rows, p); ++x) {
        const CtaRows cr = cta_rows(x, rows, p);
        if (cr.lo >= cr.hi) continue;
        const int64_t hk = h / (p.q_heads / p.kv_heads);
        const int lh = layout_head(h, p);
        const uint8_t* kmask = kmask_row(p, b);
        const float* q = qd + b * p.q_stride_b + h * p.q_stride_h;
        const float* k = kd + b * p.k_stride_b + hk * p.k_stride_h;
        const float* v = vd + b * p.v_stride_b + hk * p.v_stride_h;
        // Warps share nothing but the staged chunk, which depends only on the CTA: replay warp by warp.
        for (int warp = 0; warp < warps; ++warp) {
          const int64_t wfirst = cr.first + warp * kMmaRowsPerWarp;
          std::vector<float> qa(32 * KS * 8, 0.0f), o(32 * NT * 4, 0.0f);
          std::vector<RowState> st(64, row_init());
          for (int l = 0; l < 32; ++l)
            for (int kk = 0; kk < KS; ++kk)
              for (int r = 0; r < 4; ++r) {
                const int64_t pos = wfirst + frag_a_row(l, 2 * r);
                if (pos >= cr.lo && pos < cr.hi) {
                  const float* src = q + (pos - p.q_offset) * p.q_stride_s + kk * 16 + frag_a_col(l, 2 * r);
                  qa[(l * KS + kk) * 8 + 2 * r] = src[0];
                  qa[(l * KS + kk) * 8 + 2 * r + 1] = src[1];
                }
              }
          const KeyRange ents = clamp_entries(row_entries(lh, cr.plan_row, p), pr.col_idx.size());
          for (int64_t ent = ents.lo; ent < ents.hi; ++ent) {
            const int64_t c = p.col_idx[ent];
            if (c < 0 || c >= p.num_k_blocks) continue;
            const bool full = p.col_full[ent] != 0;
            const KeyRange kt = tile_keys(c, p);
            for (int64_t k0 = kt.lo; k0 < kt.hi; k0 += kKeyChunk) {
              if (chunk_all_future(p, cr.hi - 1, k0)) break;
              const int width = static_cast<int>(std::min<int64_t>(kt.hi - k0, kKeyChunk));
              const bool need = chunk_needs_mask(p, kmask, full, cr.lo, k0 + width - 1) || (width % 8) != 0;
              for (int r = 0; r < kKeyChunk; ++r)
                for (int d = 0; d < D; ++d) {
                  ks[kv_smem_index(r, d, D)] = r < width ? k[(k0 + r) * p.k_stride_s + d] : 0.0f;
                  vs[kv_smem_index(r, d, D)] = r < width ? v[(k0 + r) * p.v_stride_s + d] : 0.0f;
                }
              float s[kKeyNTiles][32][4];
              for (int nt = 0; nt < kKeyNTiles; ++nt) {
                for (int l = 0; l < 32; ++l)
                  for (int e = 0; e < 4; ++e) s[nt][l][e] = 0.0f;
                if (nt * 8 < width)
                  for (int kk = 0; kk < KS; ++kk) {
                    float a[32][8], bf[32][4];
                    for (int l = 0; l < 32; ++l) {
                      for (int e = 0; e < 8; ++e) a[l][e] = qa[(l * KS + kk) * 8 + e];
                      const int n = nt * 8 + frag_b_n(l, 0);
                      const int c0 = kk * 16 + frag_b_k(l, 0), c2 = kk * 16 + frag_b_k(l, 2);
                      bf[l][0] = ks[kv_smem_index(n, c0, D)];  // one 32-bit load: columns c0, c0 + 1
                      bf[l][1] = ks[kv_smem_index(n, c0, D) + 1];
                      bf[l][2] = ks[kv_smem_index(n, c2, D)];
                      bf[l][3] = ks[kv_smem_index(n, c2, D) + 1];
                    }
                    mma_host(s[nt], a, bf);
                  }
                for (int l = 0; l < 32; ++l)
                  for (int e = 0; e < 4; ++e) {
                    float xv = s[nt][l][e] * sl2;
                    const int col = nt * 8 + frag_c_col(l, e);
                    if (col >= width) {
                      xv = -INFINITY;
                    } else if (need) {
                      const int64_t pos = wfirst + frag_c_row(l, e);
                      if (pos < cr.lo || pos >= cr.hi || !element_allowed(p, kmask, full, pos, k0 + col)) xv = -INFINITY;
                    }
                    s[nt][l][e] = xv;
                  }
              }
              for (int r = 0; r < 2; ++r) {
                float mx[32];
                for (int l = 0; l < 32; ++l) {
                  mx[l] = -INFINITY;
                  for (int nt = 0; nt < kKeyNTiles; ++nt)
                    mx[l] = std::fmax(mx[l], std::fmax(s[nt][l][2 * r], s[nt][l][2 * r + 1]));
                }
                float m1[32];
                for (int l = 0; l < 32; ++l) m1[l] = std::fmax(mx[l], mx[l ^ 1]);
                for (int l = 0; l < 32; ++l) mx[l] = std::fmax(m1[l], m1[l ^ 2]);
                for (int l = 0; l < 32; ++l) {
                  RowState& rs = st[l * 2 + r];
                  const float alpha = row_rescale(rs, mx[l]);
                  for (int dn = 0; dn < NT; ++dn) {
                    o[(l * NT + dn) * 4 + 2 * r] *= alpha;
                    o[(l * NT + dn) * 4 + 2 * r + 1] *= alpha;
                  }
                  for (int nt = 0; nt < kKeyNTiles; ++nt)
                    for (int j = 0; j < 2; ++j) {
                      const float prb = row_prob(rs, s[nt][l][2 * r + j]);
                      s[nt][l][2 * r + j] = prb;
                      rs.l += prb;
                    }
                }
              }
              for (int j = 0; j < kKeyKSteps; ++j) {
                if (j * 16 >= width) continue;
                float pa[32][8];
                for (int l = 0; l < 32; ++l)
                  for (int e = 0; e < 8; ++e) pa[l][e] = round_to(s[2 * j + p_tile_of_a(e)][l][p_elem_of_a(e)], mode);
                for (int dn = 0; dn < NT; ++dn) {
                  float bf[32][4], c4[32][4];
                  for (int l = 0; l < 32; ++l) {
                    const int n = dn * 8 + frag_b_n(l, 0);
                    for (int e = 0; e < 4; ++e) bf[l][e] = vs[kv_smem_index(j * 16 + frag_b_k(l, e), n, D)];
                    for (int e = 0; e < 4; ++e) c4[l][e] = o[(l * NT + dn) * 4 + e];
                  }
                  mma_host(c4, pa, bf);
                  for (int l = 0; l < 32; ++l)
                    for (int e = 0; e < 4; ++e) o[(l * NT + dn) * 4 + e] = c4[l][e];
                }
              }
            }
          }
          float lsum[32][2], l1[32][2];
          for (int l = 0; l < 32; ++l)
            for (int r = 0; r < 2; ++r) lsum[l][r] = st[l * 2 + r].l;
          for (int l = 0; l < 32; ++l)
            for (int r = 0; r < 2; ++r) l1[l][r] = lsum[l][r] + lsum[l ^ 1][r];
          for (int l = 0; l < 32; ++l)
            for (int r = 0; r < 2; ++r) lsum[l][r] = l1[l][r] + l1[l ^ 2][r];
          for (int l = 0; l < 32; ++l)
            for (int r = 0; r < 2; ++r) {
              const float inv = row_inv_sum(lsum[l][r]);
              const int64_t pos = wfirst + frag_c_row(l, 2 * r);
              if (pos < cr.lo || pos >= cr.hi) continue;
              const int64_t row = (b * p.q_heads + h) * p.q_len + (pos - p.q_offset);
              for (int dn = 0; dn < NT; ++dn)
                for (int j = 0; j < 2; ++j)
                  out[row * D + dn * 8 + frag_c_col(l, 2 * r) + j] = round_to(o[(l * NT + dn) * 4 + 2 * r + j] * inv, mode);
              if ((l & 3) == 0) lse_out[row] = row_lse(st[l * 2 + r].m, lsum[l][r]);
            }
        }
      }
}

// fwd_simt_kernel<D> (fp32), replayed.
inline void replay_fwd_simt(const Problem& pr, float* out, float* lse_out) {
  const SparseAttentionParams& p = pr.p;
  const int D = static_cast<int>(p.head_dim), N = D / kSimtLanes;
  const float sl2 = p.scale * kLog2e;
  std::vector<float> ks(kSimtChunk * D), vs(kSimtChunk * D);
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.q_heads; ++h)
      for (int64_t x = 0; x < cta_count(kSimtRows, p); ++x) {
        const CtaRows cr = cta_rows(x, kSimtRows, p);
        if (cr.lo >= cr.hi) continue;
        const int64_t hk = h / (p.q_heads / p.kv_heads);
        const int lh = layout_head(h, p);
        const uint8_t* kmask = kmask_row(p, b);
        const float* q = pr.q.data() + b * p.q_stride_b + h * p.q_stride_h;
        const float* k = pr.k.data() + b * p.k_stride_b + hk * p.k_stride_h;
        const float* v = pr.v.data() + b * p.v_stride_b + hk * p.v_stride_h;
        std::vector<float> qv(kSimtThreads * N), o(kSimtThreads * N, 0.0f);
        std::vector<RowState> st(kSimtThreads, row_init());
        for (int t = 0; t < kSimtThreads; ++t) {
          const int64_t pos = cr.first + simt_row(t);
          const bool ok = pos >= cr.lo && pos < cr.hi;
          for (int i = 0; i < N; ++i) qv[t * N + i] = ok ? q[(pos - p.q_offset) * p.q_stride_s + simt_dim(t, i)] : 0.0f;
        }
        const KeyRange ents = clamp_entries(row_entries(lh, cr.plan_row, p), pr.col_idx.size());
        for (int64_t ent = ents.lo; ent < ents.hi; ++ent) {
          const int64_t c = p.col_idx[ent];
          if (c < 0 || c >= p.num_k_blocks) continue;
          const bool full = p.col_full[ent] != 0;
          const KeyRange kt = tile_keys(c, p);
          for (int64_t k0 = kt.lo; k0 < kt.hi; k0 += kSimtChunk) {
            if (chunk_all_future(p, cr.hi - 1, k0)) break;
            const int width = static_cast<int>(std::min<int64_t>(kt.hi - k0, kSimtChunk));
            const bool need = chunk_needs_mask(p, kmask, full, cr.lo, k0 + width - 1);
            for (int r = 0; r < kSimtChunk; ++r)
              for (int d = 0; d < D; ++d) {
                ks[r * D + d] = r < width ? k[(k0 + r) * p.k_stride_s + d] : 0.0f;
                vs[r * D + d] = r < width ? v[(k0 + r) * p.v_stride_s + d] : 0.0f;
              }
            for (int row = 0; row < kSimtRows; ++row) {
              const int64_t pos = cr.first + row;
              const bool ok = pos >= cr.lo && pos < cr.hi;
              float s[kSimtChunk];
              float mx = -INFINITY;
              for (int j = 0; j < kSimtChunk; ++j) {
                float xv = -INFINITY;
                if (j < width) {
                  float part[8];
                  for (int u = 0; u < 8; ++u) {
                    const int t = row * kSimtLanes + u;
                    float d = 0.0f;
                    for (int i = 0; i < N; ++i) d = std::fma(qv[t * N + i], ks[j * D + simt_dim(t, i)], d);
                    part[u] = d;
                  }
                  xv = sum8(part) * sl2;
                  if (need && !(ok && element_allowed(p, kmask, full, pos, k0 + j))) xv = -INFINITY;
                }
                s[j] = xv;
                mx = std::fmax(mx, xv);
              }
              for (int u = 0; u < 8; ++u) {  // every lane of the row runs the same update
                const int t = row * kSimtLanes + u;
                RowState rs = st[row * kSimtLanes];
                const float alpha = row_rescale(rs, mx);
                for (int i = 0; i < N; ++i) o[t * N + i] *= alpha;
                for (int j = 0; j < width; ++j) {
                  const float prb = row_prob(rs, s[j]);
                  rs.l += prb;
                  for (int i = 0; i < N; ++i) o[t * N + i] = std::fma(prb, vs[j * D + simt_dim(t, i)], o[t * N + i]);
                }
                if (u == 7) st[row * kSimtLanes] = rs;
              }
            }
          }
        }
        for (int t = 0; t < kSimtThreads; ++t) {
          const int64_t pos = cr.first + simt_row(t);
          if (pos < cr.lo || pos >= cr.hi) continue;
          const int64_t row = (b * p.q_heads + h) * p.q_len + (pos - p.q_offset);
          const RowState& rs = st[simt_row(t) * kSimtLanes];
          const float inv = row_inv_sum(rs.l);
          for (int i = 0; i < N; ++i) out[row * D + simt_dim(t, i)] = o[t * N + i] * inv;
          if (t % kSimtLanes == 0) lse_out[row] = row_lse(rs.m, rs.l);
        }
      }
}

// delta_kernel, bwd_dq_kernel and bwd_dkdv_kernel, replayed (inputs already in the kernel's dtype as
// fp32 values; `mode` rounds the stored gradients like from_float<T>).
inline void replay_bwd(const Problem& pr, const float* dout, const float* outp, const float* lse, int mode, float* dq,
                       float* dk, float* dv) {
  const SparseAttentionParams& p = pr.p;
  const int D = static_cast<int>(p.head_dim), N = D / kSimtLanes;
  const float sl2 = p.scale * kLog2e;
  const int64_t rows = p.batch * p.q_heads * p.q_len;
  std::vector<float> delta(rows);
  for (int64_t row = 0; row < rows; ++row) {  // one warp per row: strided lane sums, then xor 16..1
    float lane[32];
    for (int l = 0; l < 32; ++l) {
      lane[l] = 0.0f;
      for (int d = l; d < D; d += 32) lane[l] = std::fma(dout[row * D + d], outp[row * D + d], lane[l]);
    }
    delta[row] = warp_sum_host(lane);
  }
  std::vector<float> ks(kSimtChunk * D), vs(kSimtChunk * D);
  // dQ: owners = 16 queries, stream = key chunks.
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t h = 0; h < p.q_heads; ++h)
      for (int64_t x = 0; x < cta_count(kSimtRows, p); ++x) {
        const CtaRows cr = cta_rows(x, kSimtRows, p);
        if (cr.lo >= cr.hi) continue;
        const int64_t hk = h / (p.q_heads / p.kv_heads);
        const int lh = layout_head(h, p);
        const uint8_t* kmask = kmask_row(p, b);
        const float* q = pr.q.data() + b * p.q_stride_b + h * p.q_stride_h;
        const float* k = pr.k.data() + b * p.k_stride_b + hk * p.k_stride_h;
        const float* v = pr.v.data() + b * p.v_stride_b + hk * p.v_stride_h;
        std::vector<float> qv(kSimtThreads * N), dov(kSimtThreads * N), acc(kSimtThreads * N, 0.0f);
        for (int t = 0; t < kSimtThreads; ++t) {
          const int64_t pos = cr.first + simt_row(t);
          const bool ok = pos >= cr.lo && pos < cr.hi;
          const int64_t row = (b * p.q_heads + h) * p.q_len + (pos - p.q_offset);
          for (int i = 0; i < N; ++i) {
            qv[t * N + i] = ok ? q[(pos - p.q_offset) * p.q_stride_s + simt_dim(t, i)] : 0.0f;
            dov[t * N + i] = ok ? dout[row * D + simt_dim(t, i)] : 0.0f;
          }
        }
        const KeyRange ents = clamp_entries(row_entries(lh, cr.plan_row, p), pr.col_idx.size());
        for (int64_t ent = ents.lo; ent < ents.hi; ++ent) {
          const int64_t c = p.col_idx[ent];
          if (c < 0 || c >= p.num_k_blocks) continue;
          const bool full = p.col_full[ent] != 0;
          const KeyRange kt = tile_keys(c, p);
          for (int64_t k0 = kt.lo; k0 < kt.hi; k0 += kSimtChunk) {
            if (chunk_all_future(p, cr.hi - 1, k0)) break;
            const int width = static_cast<int>(std::min<int64_t>(kt.hi - k0, kSimtChunk));
            const bool need = chunk_needs_mask(p, kmask, full, cr.lo, k0 + width - 1);
            for (int r = 0; r < kSimtChunk; ++r)
              for (int d = 0; d < D; ++d) {
                ks[r * D + d] = r < width ? k[(k0 + r) * p.k_stride_s + d] : 0.0f;
                vs[r * D + d] = r < width ? v[(k0 + r) * p.v_stride_s + d] : 0.0f;
              }
            for (int row16 = 0; row16 < kSimtRows; ++row16) {
              const int64_t pos = cr.first + row16;
              const bool ok = pos >= cr.lo && pos < cr.hi;
              const int64_t row = (b * p.q_heads + h) * p.q_len + (pos - p.q_offset);
              const float lse_r = ok ? lse[row] : -INFINITY, delta_r = ok ? delta[row] : 0.0f;
              for (int j = 0; j < width; ++j) {
                float sp[8], pp[8];
                for (int u = 0; u < 8; ++u) {
                  const int t = row16 * kSimtLanes + u;
                  float sd = 0.0f, pd = 0.0f;
                  for (int i = 0; i < N; ++i) {
                    sd = std::fma(qv[t * N + i], ks[j * D + simt_dim(t, i)], sd);
                    pd = std::fma(dov[t * N + i], vs[j * D + simt_dim(t, i)], pd);
                  }
                  sp[u] = sd;
                  pp[u] = pd;
                }
                const float sd = sum8(sp), pd = sum8(pp);
                const bool allowed = !need || (ok && element_allowed(p, kmask, full, pos, k0 + j));
                const float prb = allowed ? bwd_prob(sd * sl2, lse_r) : 0.0f;
                const float ds = bwd_dscore(prb, pd, delta_r);
                for (int u = 0; u < 8; ++u) {
                  const int t = row16 * kSimtLanes + u;
                  for (int i = 0; i < N; ++i) acc[t * N + i] = std::fma(ds, ks[j * D + simt_dim(t, i)], acc[t * N + i]);
                }
              }
            }
          }
        }
        for (int t = 0; t < kSimtThreads; ++t) {
          const int64_t pos = cr.first + simt_row(t);
          if (pos < cr.lo || pos >= cr.hi) continue;
          const int64_t row = (b * p.q_heads + h) * p.q_len + (pos - p.q_offset);
          for (int i = 0; i < N; ++i) dq[row * D + simt_dim(t, i)] = round_to(acc[t * N + i] * p.scale, mode);
        }
      }
  // dK / dV: owners = 16 keys, stream = query chunks of every head of the GQA group (column CSR).
  std::vector<float> qs(kSimtChunk * D), dos(kSimtChunk * D), lses(kSimtChunk), deltas(kSimtChunk);
  const int64_t group = p.q_heads / p.kv_heads;
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t hk = 0; hk < p.kv_heads; ++hk)
      for (int64_t x = 0; x < key_cta_count(p); ++x) {
        const CtaRows kr = key_cta_rows(x, p);
        if (kr.lo >= kr.hi) continue;
        const uint8_t* kmask = kmask_row(p, b);
        const float* k = pr.k.data() + b * p.k_stride_b + hk * p.k_stride_h;
        const float* v = pr.v.data() + b * p.v_stride_b + hk * p.v_stride_h;
        std::vector<float> kv(kSimtThreads * N), vv(kSimtThreads * N), gk(kSimtThreads * N, 0.0f),
            gv(kSimtThreads * N, 0.0f);
        for (int t = 0; t < kSimtThreads; ++t) {
          const int64_t key = kr.first + simt_row(t);
          const bool ok = key < kr.hi;
          for (int i = 0; i < N; ++i) {
            kv[t * N + i] = ok ? k[key * p.k_stride_s + simt_dim(t, i)] : 0.0f;
            vv[t * N + i] = ok ? v[key * p.v_stride_s + simt_dim(t, i)] : 0.0f;
          }
        }
        for (int64_t g = 0; g < group; ++g) {
          const int64_t h = hk * group + g;
          const int lh = layout_head(h, p);
          const float* q = pr.q.data() + b * p.q_stride_b + h * p.q_stride_h;
          const int64_t row0 = (b * p.q_heads + h) * p.q_len;
          const KeyRange ents = clamp_entries(col_entries(lh, kr.plan_row, p), pr.row_idx.size());
          for (int64_t ent = ents.lo; ent < ents.hi; ++ent) {
            const int64_t r = p.row_idx[ent];
            if (r < 0 || r >= p.num_q_blocks) continue;
            const bool full = p.row_full[ent] != 0;
            const KeyRange qr = row_queries(r, p);
            for (int64_t p0 = qr.lo; p0 < qr.hi; p0 += kSimtChunk) {
              const int width = static_cast<int>(std::min<int64_t>(qr.hi - p0, kSimtChunk));
              if (chunk_all_future(p, p0 + width - 1, kr.lo)) continue;
              const bool need = chunk_needs_mask(p, kmask, full, p0, kr.hi - 1);
              const int64_t i0 = p0 - p.q_offset;
              for (int rr = 0; rr < kSimtChunk; ++rr) {
                for (int d = 0; d < D; ++d) {
                  qs[rr * D + d] = rr < width ? q[(i0 + rr) * p.q_stride_s + d] : 0.0f;
                  dos[rr * D + d] = rr < width ? dout[(row0 + i0 + rr) * D + d] : 0.0f;
                }
                lses[rr] = rr < width ? lse[row0 + i0 + rr] : -INFINITY;
                deltas[rr] = rr < width ? delta[row0 + i0 + rr] : 0.0f;
              }
              for (int row16 = 0; row16 < kSimtRows; ++row16) {
                const int64_t key = kr.first + row16;
                const bool ok = key < kr.hi;
                for (int j = 0; j < width; ++j) {
                  float sp[8], pp[8];
                  for (int u = 0; u < 8; ++u) {
                    const int t = row16 * kSimtLanes + u;
                    float sd = 0.0f, pd = 0.0f;
                    for (int i = 0; i < N; ++i) {
                      sd = std::fma(kv[t * N + i], qs[j * D + simt_dim(t, i)], sd);
                      pd = std::fma(vv[t * N + i], dos[j * D + simt_dim(t, i)], pd);
                    }
                    sp[u] = sd;
                    pp[u] = pd;
                  }
                  const float sd = sum8(sp), pd = sum8(pp);
                  const bool allowed = !need || (ok && element_allowed(p, kmask, full, p0 + j, key));
                  const float prb = allowed ? bwd_prob(sd * sl2, lses[j]) : 0.0f;
                  const float ds = bwd_dscore(prb, pd, deltas[j]);
                  for (int u = 0; u < 8; ++u) {
                    const int t = row16 * kSimtLanes + u;
                    for (int i = 0; i < N; ++i) {
                      gv[t * N + i] = std::fma(prb, dos[j * D + simt_dim(t, i)], gv[t * N + i]);
                      gk[t * N + i] = std::fma(ds, qs[j * D + simt_dim(t, i)], gk[t * N + i]);
                    }
                  }
                }
              }
            }
          }
        }
        for (int t = 0; t < kSimtThreads; ++t) {
          const int64_t key = kr.first + simt_row(t);
          if (key >= kr.hi) continue;
          const int64_t row = (b * p.kv_heads + hk) * p.kv_len + key;
          for (int i = 0; i < N; ++i) {
            dk[row * D + simt_dim(t, i)] = round_to(gk[t * N + i] * p.scale, mode);
            dv[row * D + simt_dim(t, i)] = round_to(gv[t * N + i], mode);
          }
        }
      }
}

#define SF_PROBLEM_ARGS                                                                                      \
  const I32Array &row_ptr, const I32Array &col_idx, const U8Array &col_full, const I32Array &col_ptr,        \
      const I32Array &row_idx, const U8Array &row_full, const std::optional<U8Array> &global_mask,           \
      const std::optional<U8Array> &key_mask, int block_size, int64_t q_offset, int64_t first_q_block,       \
      int window_left, int window_right, bool causal, float scale
#define SF_PROBLEM_PASS                                                                                     \
  row_ptr, col_idx, col_full, col_ptr, row_idx, row_full, global_mask, key_mask, block_size, q_offset,       \
      first_q_block, window_left, window_right, causal, scale

inline std::tuple<F32Array, F32Array> emulate_fwd(const F32Array& q, const F32Array& k, const F32Array& v,
                                                  SF_PROBLEM_ARGS, int mode) {
  const Problem pr = make_problem(q, k, v, SF_PROBLEM_PASS);
  if (!supported_head_dim(pr.p.head_dim)) throw py::value_error("head_dim must be 32, 64, 80, 96 or 128");
  if (mode < 0 || mode > 2) throw py::value_error("mode: 0 = fp32 (SIMT kernel), 1 = fp16, 2 = bf16 (mma kernel)");
  F32Array out({pr.p.batch, pr.p.q_heads, pr.p.q_len, pr.p.head_dim});
  F32Array lse({pr.p.batch, pr.p.q_heads, pr.p.q_len});
  std::fill(out.mutable_data(), out.mutable_data() + out.size(), NAN);  // every row must be written
  std::fill(lse.mutable_data(), lse.mutable_data() + lse.size(), NAN);
  if (mode == 0)
    replay_fwd_simt(pr, out.mutable_data(), lse.mutable_data());
  else
    replay_fwd_mma(pr, mode, out.mutable_data(), lse.mutable_data());
  return {out, lse};
}

inline std::tuple<F32Array, F32Array, F32Array> emulate_bwd(const F32Array& dout, const F32Array& q, const F32Array& k,
                                                            const F32Array& v, const F32Array& out,
                                                            const F32Array& lse, SF_PROBLEM_ARGS, int mode) {
  const Problem pr = make_problem(q, k, v, SF_PROBLEM_PASS);
  if (!supported_head_dim(pr.p.head_dim)) throw py::value_error("head_dim must be 32, 64, 80, 96 or 128");
  if (dout.size() != q.size() || out.size() != q.size() || lse.size() != q.size() / pr.p.head_dim)
    throw py::value_error("dout, out must be q-shaped and lse [B, Hq, Sq]");
  F32Array dq({pr.p.batch, pr.p.q_heads, pr.p.q_len, pr.p.head_dim});
  F32Array dk({pr.p.batch, pr.p.kv_heads, pr.p.kv_len, pr.p.head_dim});
  F32Array dv({pr.p.batch, pr.p.kv_heads, pr.p.kv_len, pr.p.head_dim});
  for (F32Array* a : {&dq, &dk, &dv}) std::fill(a->mutable_data(), a->mutable_data() + a->size(), NAN);
  replay_bwd(pr, dout.data(), out.data(), lse.data(), mode, dq.mutable_data(), dk.mutable_data(), dv.mutable_data());
  return {dq, dk, dv};
}

// For each CSR entry and chunk (forward chunking, CTA of `rows` rows): the rule's verdict on every
// element as bool [Hl, Sq, Sk] (what the kernel lets through, chunk_needs_mask included), plus the
// number of chunks that skipped the element rule. Padding not included.
inline std::tuple<py::array_t<bool>, int64_t> visited_mask(const F32Array& q, const F32Array& k, SF_PROBLEM_ARGS,
                                                           int rows, int chunk) {
  const Problem pr = make_problem(q, k, k, SF_PROBLEM_PASS);
  const SparseAttentionParams& p = pr.p;
  if (rows < 1 || p.block_size % rows || chunk < 1) throw py::value_error("rows must divide block_size");
  py::array_t<bool> m({static_cast<int64_t>(p.layout_heads), p.q_len, p.kv_len});
  bool* md = m.mutable_data();
  std::fill(md, md + m.size(), false);
  int64_t skipped = 0;
  for (int lh = 0; lh < p.layout_heads; ++lh)
    for (int64_t x = 0; x < cta_count(rows, p); ++x) {
      const CtaRows cr = cta_rows(x, rows, p);
      if (cr.lo >= cr.hi) continue;
      const KeyRange ents = clamp_entries(row_entries(lh, cr.plan_row, p), pr.col_idx.size());
      for (int64_t ent = ents.lo; ent < ents.hi; ++ent) {
        const int64_t c = p.col_idx[ent];
        const bool full = p.col_full[ent] != 0;
        const KeyRange kt = tile_keys(c, p);
        for (int64_t k0 = kt.lo; k0 < kt.hi; k0 += chunk) {
          if (chunk_all_future(p, cr.hi - 1, k0)) break;
          const int64_t k1 = std::min<int64_t>(kt.hi, k0 + chunk);
          const bool need = chunk_needs_mask(p, nullptr, full, cr.lo, k1 - 1);
          skipped += !need;
          for (int64_t pos = cr.lo; pos < cr.hi; ++pos)
            for (int64_t key = k0; key < k1; ++key)
              if (!need || element_allowed(p, nullptr, full, pos, key))
                md[(lh * p.q_len + (pos - p.q_offset)) * p.kv_len + key] = true;
        }
      }
    }
  return {m, skipped};
}

inline void add(py::module_& m) {
  m.def("_test_sparse_cuda_frag_maps", [] {
    // [32, 8, 2] A (row, col), [32, 4, 2] B (k, n), [32, 4, 2] C (row, col)
    py::array_t<int32_t> a({32, 8, 2}), b({32, 4, 2}), c({32, 4, 2});
    for (int l = 0; l < 32; ++l) {
      for (int e = 0; e < 8; ++e) {
        a.mutable_at(l, e, 0) = frag_a_row(l, e);
        a.mutable_at(l, e, 1) = frag_a_col(l, e);
      }
      for (int e = 0; e < 4; ++e) {
        b.mutable_at(l, e, 0) = frag_b_k(l, e);
        b.mutable_at(l, e, 1) = frag_b_n(l, e);
        c.mutable_at(l, e, 0) = frag_c_row(l, e);
        c.mutable_at(l, e, 1) = frag_c_col(l, e);
      }
    }
    return std::make_tuple(a, b, c);
  });
  m.def("_test_sparse_cuda_p_to_a", [](int e) {
    if (e < 0 || e > 7) throw py::value_error("e in 0..7");
    return std::make_tuple(p_tile_of_a(e), p_elem_of_a(e));
  });
  m.def("_test_sparse_cuda_kv_smem_index", &kv_smem_index);
  m.def("_test_sparse_cuda_simt_map", [](int t, int i) { return std::make_tuple(simt_row(t), simt_dim(t, i)); });
  m.def("_test_sparse_cuda_mma_warps", &mma_warps);
  m.def("_test_sparse_cuda_round", &round_to);
  m.def("_test_sparse_cuda_supported_head_dim", &supported_head_dim);
  // Online softmax over a row's score chunks (log2-domain scores; -inf = masked): the running state
  // after each chunk and the final (sum of 2^(s - m) * value weights) for a one-hot value per key.
  m.def("_test_sparse_cuda_online_softmax", [](const std::vector<std::vector<float>>& chunks) {
    RowState st = row_init();
    std::vector<float> acc;  // acc[key] = unnormalised weight of key, rescaled like O
    for (const auto& ch : chunks) {
      float mx = -INFINITY;
      for (float s : ch) mx = std::fmax(mx, s);
      const float alpha = row_rescale(st, mx);
      for (float& a : acc) a *= alpha;
      for (float s : ch) {
        const float pr = row_prob(st, s);
        st.l += pr;
        acc.push_back(pr);
      }
    }
    const float inv = row_inv_sum(st.l);
    for (float& a : acc) a *= inv;
    return std::make_tuple(acc, row_lse(st.m, st.l), st.m, st.l);
  });
  m.def("_test_sparse_cuda_bwd_prob", &bwd_prob);
  m.def("_test_sparse_cuda_constants", [] {
    return py::dict(py::arg("key_chunk") = kKeyChunk, py::arg("smem_pad") = kSmemPad,
                    py::arg("simt_rows") = kSimtRows, py::arg("simt_lanes") = kSimtLanes,
                    py::arg("simt_chunk") = kSimtChunk, py::arg("rows_per_warp") = kMmaRowsPerWarp,
                    py::arg("max_warps") = kMmaMaxWarps);
  });
  m.def(
      "_test_sparse_cuda_cta_rows",
      [](int64_t x, int rows, int block_size, int64_t q_offset, int64_t q_len, int64_t first_q_block,
         int64_t num_q_blocks) {
        SparseAttentionParams p;
        p.block_size = block_size;
        p.q_offset = q_offset;
        p.q_len = q_len;
        p.first_q_block = first_q_block;
        p.num_q_blocks = num_q_blocks;
        const CtaRows c = cta_rows(x, rows, p);
        return std::make_tuple(c.plan_row, c.first, c.lo, c.hi, cta_count(rows, p));
      });
  m.def("_test_sparse_cuda_emulate_fwd", &emulate_fwd, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("row_ptr"),
        py::arg("col_idx"), py::arg("col_full"), py::arg("col_ptr"), py::arg("row_idx"), py::arg("row_full"),
        py::arg("global_mask"), py::arg("key_mask"), py::arg("block_size"), py::arg("q_offset"),
        py::arg("first_q_block"), py::arg("window_left"), py::arg("window_right"), py::arg("causal"),
        py::arg("scale"), py::arg("mode"),
        "(out, lse) float32 as the CUDA forward computes them, replayed on the host: mode 0 = the fp32\n"
        "SIMT kernel, 1 / 2 = the fp16 / bf16 tensor-core kernel (q, k, v already rounded to that type).");
  m.def("_test_sparse_cuda_emulate_bwd", &emulate_bwd, py::arg("dout"), py::arg("q"), py::arg("k"), py::arg("v"),
        py::arg("out"), py::arg("lse"), py::arg("row_ptr"), py::arg("col_idx"), py::arg("col_full"),
        py::arg("col_ptr"), py::arg("row_idx"), py::arg("row_full"), py::arg("global_mask"), py::arg("key_mask"),
        py::arg("block_size"), py::arg("q_offset"), py::arg("first_q_block"), py::arg("window_left"),
        py::arg("window_right"), py::arg("causal"), py::arg("scale"), py::arg("mode"),
        "(dq, dk, dv) float32 as the CUDA backward kernels compute them, replayed on the host.");
  m.def("_test_sparse_cuda_visited_mask", &visited_mask, py::arg("q"), py::arg("k"), py::arg("row_ptr"),
        py::arg("col_idx"), py::arg("col_full"), py::arg("col_ptr"), py::arg("row_idx"), py::arg("row_full"),
        py::arg("global_mask"), py::arg("key_mask"), py::arg("block_size"), py::arg("q_offset"),
        py::arg("first_q_block"), py::arg("window_left"), py::arg("window_right"), py::arg("causal"),
        py::arg("scale"), py::arg("rows"), py::arg("chunk"),
        "bool [Hl, Sq, Sk]: the pairs the forward's chunk walk lets through (chunk_needs_mask and\n"
        "element_allowed), and how many chunks skipped the element rule.");
}

#undef SF_PROBLEM_ARGS
#undef SF_PROBLEM_PASS

}  // namespace test_hooks
}  // namespace cuda
}  // namespace attention
}  // namespace slimformer
