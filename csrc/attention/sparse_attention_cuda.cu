// CUDA kernels of the sparse flash attention ops: launch geometry, shared-memory staging, barriers,
// shuffles and the mma instruction around the math of sparse_attention_cuda_math.h (which the CPU
// tests replay through the _test_sparse_cuda_* hooks). Torch-free. Geometry: see the comment at the
// top of sparse_attention_cuda_math.h.
//
// Bounds: q is read only at valid query positions (cta_rows lo..hi), k / v only at keys < kv_len of
// key tiles c < num_k_blocks (CSR entries outside that range are skipped rather than trusted), the
// global mask only at positions < kv_len, key_mask only at keys < kv_len; every store is to a valid
// row. Staged rows past the end of a chunk are zero (never garbage: 0 * NaN would poison O).
// No cp.async / no double buffering: plain loads through registers keep this blind-written code
// simple; the staging is the obvious place to speed up once it has been measured on a GPU.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string.h>

#include "attention/sparse_attention_cuda.h"
#include "common/cuda_types.cuh"
#include "common/int_tag.h"

namespace slimformer {
namespace attention {
namespace cuda {
namespace {

using cuda_types::from_float;
using cuda_types::to_float;
using cuda_types::TypeTag;
using cuda_types::with_type;

template <class F>
bool with_head_dim(int64_t d, F&& f) {
  switch (d) {
    case 32: f(IntTag<32>{}); return true;
    case 64: f(IntTag<64>{}); return true;
    case 80: f(IntTag<80>{}); return true;
    case 96: f(IntTag<96>{}); return true;
    case 128: f(IntTag<128>{}); return true;
    default: return false;
  }
}


// Two floats as one 32-bit register of two 16-bit values, `lo` in the low half (the lower column of
// an mma fragment pair).
template <class T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, 4);
  return r;
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t r;
  memcpy(&r, &h, 4);
  return r;
}
__device__ __forceinline__ uint32_t pack_raw(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

// D (fp32) += A (16x16) B (16x8); A/B in f16 or bf16 fragments (sparse_attention_cuda_math.h maps).
template <class T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Whether 16-byte vector loads are safe for a [.., S, D] operand: base aligned and every outer stride a
// multiple of 16 bytes (D is always a multiple of 8 elements, so row starts stay aligned).
bool vec_ok(const void* ptr, int64_t elem, int64_t sb, int64_t sh, int64_t ss) {
  const int64_t per = 16 / elem;
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && sb % per == 0 && sh % per == 0 && ss % per == 0;
}

struct FwdK {
  FwdArgs a;
  bool q_vec, k_vec, v_vec;
};
struct BwdK {
  BwdArgs a;
  bool q_vec, k_vec, v_vec, do_vec;
};

// ---- staging ----
// Rows [0, width) of a 16-bit [rows, D] matrix with row stride `stride` into kKeyChunk smem rows
// (kv_smem_index layout); rows >= width are zero.
template <int D>
__device__ __forceinline__ void stage_half_chunk(uint16_t* sm, const uint16_t* src, int64_t stride, int width,
                                                 bool vec) {
  constexpr int kPerRow = D / 8;
  for (int idx = threadIdx.x; idx < kKeyChunk * kPerRow; idx += blockDim.x) {
    const int r = idx / kPerRow, c = (idx % kPerRow) * 8;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < width) {
      const uint16_t* g = src + r * stride + c;
      if (vec) {
        val = *reinterpret_cast<const uint4*>(g);
      } else {
        val.x = pack_raw(g[0], g[1]);
        val.y = pack_raw(g[2], g[3]);
        val.z = pack_raw(g[4], g[5]);
        val.w = pack_raw(g[6], g[7]);
      }
    }
    *reinterpret_cast<uint4*>(sm + kv_smem_index(r, c, D)) = val;
  }
}

template <class T>
__device__ __forceinline__ float4 load4(const T* g, bool vec) {
  return make_float4(to_float(g[0]), to_float(g[1]), to_float(g[2]), to_float(g[3]));
}
template <>
__device__ __forceinline__ float4 load4<float>(const float* g, bool vec) {
  if (vec) return *reinterpret_cast<const float4*>(g);
  return make_float4(g[0], g[1], g[2], g[3]);
}

// Rows [0, width) of a [rows, D] matrix (row stride `stride`) as fp32 into kSimtChunk smem rows of D
// floats; rows >= width are zero.
template <class T, int D>
__device__ __forceinline__ void stage_float_chunk(float* sm, const T* src, int64_t stride, int width, bool vec) {
  constexpr int kPerRow = D / 4;
  for (int idx = threadIdx.x; idx < kSimtChunk * kPerRow; idx += blockDim.x) {
    const int r = idx / kPerRow, c = (idx % kPerRow) * 4;
    float4 val = make_float4(0.f, 0.f, 0.f, 0.f);
    if (r < width) val = load4<T>(src + r * stride + c, vec);
    *reinterpret_cast<float4*>(sm + r * D + c) = val;
  }
}

__device__ __forceinline__ float sum8(float v) {  // xor butterfly over the 8 lanes of an owner row
  v += __shfl_xor_sync(kFullMask, v, 1);
  v += __shfl_xor_sync(kFullMask, v, 2);
  v += __shfl_xor_sync(kFullMask, v, 4);
  return v;
}

// ---- forward, fp16 / bf16, tensor cores ----
template <class T, int D>
__global__ void __launch_bounds__(kMmaMaxWarps* kWarpSize) fwd_mma_kernel(FwdK args) {
  constexpr int kKSteps = D / 16, kNTiles = D / 8;
  __shared__ __align__(16) uint16_t ks[kKeyChunk * (D + kSmemPad)];
  __shared__ __align__(16) uint16_t vs[kKeyChunk * (D + kSmemPad)];
  const FwdArgs& a = args.a;
  const SparseAttentionParams& p = a.p;
  const int warps = blockDim.x / kWarpSize, warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const CtaRows cr = cta_rows(blockIdx.x, warps * kMmaRowsPerWarp, p);
  if (cr.lo >= cr.hi) return;  // uniform over the CTA, before any barrier
  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / (p.q_heads / p.kv_heads);
  const int lh = layout_head(h, p);
  const uint8_t* kmask = p.key_mask != nullptr ? p.key_mask + b * p.key_mask_stride_b : nullptr;
  const uint16_t* q = static_cast<const uint16_t*>(a.q) + b * p.q_stride_b + h * p.q_stride_h;
  const uint16_t* k = static_cast<const uint16_t*>(a.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const uint16_t* v = static_cast<const uint16_t*>(a.v) + b * p.v_stride_b + hk * p.v_stride_h;
  const int64_t wfirst = cr.first + warp * kMmaRowsPerWarp;  // position of the warp's row 0

  uint32_t qa[kKSteps][4];  // Q as A fragments (zeros for rows outside the queries)
#pragma unroll
  for (int kk = 0; kk < kKSteps; ++kk)
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int64_t pos = wfirst + frag_a_row(lane, 2 * r);
      uint32_t val = 0;
      if (pos >= cr.lo && pos < cr.hi) {  // 16-bit loads: q's row stride may be odd
        const uint16_t* src = q + (pos - p.q_offset) * p.q_stride_s + kk * 16 + frag_a_col(lane, 2 * r);
        val = pack_raw(src[0], src[1]);
      }
      qa[kk][r] = val;
    }

  float o[kNTiles][4];
#pragma unroll
  for (int dn = 0; dn < kNTiles; ++dn)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[dn][e] = 0.0f;
  RowState st[2] = {row_init(), row_init()};  // rows frag_c_row(lane, 0) and frag_c_row(lane, 2)
  const float sl2 = p.scale * kLog2e;

  const KeyRange ents = clamp_entries(row_entries(lh, cr.plan_row, p), a.nnz);
  for (int64_t ent = ents.lo; ent < ents.hi; ++ent) {
    const int64_t c = p.col_idx[ent];
    if (c < 0 || c >= p.num_k_blocks) continue;
    const bool full = p.col_full[ent] != 0;
    const KeyRange kt = tile_keys(c, p);
    for (int64_t k0 = kt.lo; k0 < kt.hi; k0 += kKeyChunk) {
      if (chunk_all_future(p, cr.hi - 1, k0)) break;
      const int width = static_cast<int>(kt.hi - k0 < kKeyChunk ? kt.hi - k0 : kKeyChunk);
      const bool need = chunk_needs_mask(p, kmask, full, cr.lo, k0 + width - 1) || (width % 8) != 0;
      __syncthreads();  // the previous chunk's readers are done
      stage_half_chunk<D>(ks, k + k0 * p.k_stride_s, p.k_stride_s, width, args.k_vec);
      stage_half_chunk<D>(vs, v + k0 * p.v_stride_s, p.v_stride_s, width, args.v_vec);
      __syncthreads();

      float s[kKeyNTiles][4];
#pragma unroll
      for (int nt = 0; nt < kKeyNTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) s[nt][e] = 0.0f;
        if (nt * 8 < width) {
#pragma unroll
          for (int kk = 0; kk < kKSteps; ++kk) {
            const int n = nt * 8 + frag_b_n(lane, 0);
            const uint32_t b0 = *reinterpret_cast<const uint32_t*>(ks + kv_smem_index(n, kk * 16 + frag_b_k(lane, 0), D));
            const uint32_t b1 = *reinterpret_cast<const uint32_t*>(ks + kv_smem_index(n, kk * 16 + frag_b_k(lane, 2), D));
            mma16816<T>(s[nt], qa[kk], b0, b1);
          }
        }
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[nt][e] * sl2;
          const int col = nt * 8 + frag_c_col(lane, e);
          if (col >= width) {
            x = -INFINITY;
          } else if (need) {
            const int64_t pos = wfirst + frag_c_row(lane, e);
            if (pos < cr.lo || pos >= cr.hi || !element_allowed(p, kmask, full, pos, k0 + col)) x = -INFINITY;
          }
          s[nt][e] = x;
        }
      }

#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < kKeyNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));  // the quad shares the row
        mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
        const float alpha = row_rescale(st[r], mx);
#pragma unroll
        for (int dn = 0; dn < kNTiles; ++dn) {
          o[dn][2 * r] *= alpha;
          o[dn][2 * r + 1] *= alpha;
        }
#pragma unroll
        for (int nt = 0; nt < kKeyNTiles; ++nt)
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const float pr = row_prob(st[r], s[nt][2 * r + j]);
            s[nt][2 * r + j] = pr;
            st[r].l += pr;
          }
      }

#pragma unroll
      for (int j = 0; j < kKeyKSteps; ++j) {
        if (j * 16 < width) {
          uint32_t pa[4];
#pragma unroll
          for (int r = 0; r < 4; ++r)
            pa[r] = pack2<T>(s[2 * j + p_tile_of_a(2 * r)][p_elem_of_a(2 * r)],
                             s[2 * j + p_tile_of_a(2 * r + 1)][p_elem_of_a(2 * r + 1)]);
#pragma unroll
          for (int dn = 0; dn < kNTiles; ++dn) {
            const int n = dn * 8 + frag_b_n(lane, 0);
            const uint32_t b0 = pack_raw(vs[kv_smem_index(j * 16 + frag_b_k(lane, 0), n, D)],
                                         vs[kv_smem_index(j * 16 + frag_b_k(lane, 1), n, D)]);
            const uint32_t b1 = pack_raw(vs[kv_smem_index(j * 16 + frag_b_k(lane, 2), n, D)],
                                         vs[kv_smem_index(j * 16 + frag_b_k(lane, 3), n, D)]);
            mma16816<T>(o[dn], pa, b0, b1);
          }
        }
      }
    }
  }

  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = st[r].l;
    l += __shfl_xor_sync(kFullMask, l, 1);
    l += __shfl_xor_sync(kFullMask, l, 2);
    const float inv = row_inv_sum(l);
    const int64_t pos = wfirst + frag_c_row(lane, 2 * r);
    if (pos >= cr.lo && pos < cr.hi) {
      const int64_t row = (b * p.q_heads + h) * p.q_len + (pos - p.q_offset);
      T* orow = out + row * D;
#pragma unroll
      for (int dn = 0; dn < kNTiles; ++dn)
        *reinterpret_cast<uint32_t*>(orow + dn * 8 + frag_c_col(lane, 2 * r)) =
            pack2<T>(o[dn][2 * r] * inv, o[dn][2 * r + 1] * inv);
      if ((lane & 3) == 0) a.lse[row] = row_lse(st[r].m, l);
    }
  }
}

// ---- forward, fp32, SIMT ----
template <int D>
__global__ void __launch_bounds__(kSimtThreads) fwd_simt_kernel(FwdK args) {
  constexpr int kN = D / kSimtLanes;
  __shared__ __align__(16) float ks[kSimtChunk * D];
  __shared__ __align__(16) float vs[kSimtChunk * D];
  const FwdArgs& a = args.a;
  const SparseAttentionParams& p = a.p;
  const CtaRows cr = cta_rows(blockIdx.x, kSimtRows, p);
  if (cr.lo >= cr.hi) return;
  const int t = threadIdx.x;
  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / (p.q_heads / p.kv_heads);
  const int lh = layout_head(h, p);
  const uint8_t* kmask = p.key_mask != nullptr ? p.key_mask + b * p.key_mask_stride_b : nullptr;
  const float* q = static_cast<const float*>(a.q) + b * p.q_stride_b + h * p.q_stride_h;
  const float* k = static_cast<const float*>(a.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const float* v = static_cast<const float*>(a.v) + b * p.v_stride_b + hk * p.v_stride_h;
  const int64_t pos = cr.first + simt_row(t);
  const bool ok = pos >= cr.lo && pos < cr.hi;

  float qv[kN], o[kN];
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    qv[i] = ok ? q[(pos - p.q_offset) * p.q_stride_s + simt_dim(t, i)] : 0.0f;
    o[i] = 0.0f;
  }
  RowState st = row_init();
  const float sl2 = p.scale * kLog2e;

  const KeyRange ents = clamp_entries(row_entries(lh, cr.plan_row, p), a.nnz);
  for (int64_t ent = ents.lo; ent < ents.hi; ++ent) {
    const int64_t c = p.col_idx[ent];
    if (c < 0 || c >= p.num_k_blocks) continue;
    const bool full = p.col_full[ent] != 0;
    const KeyRange kt = tile_keys(c, p);
    for (int64_t k0 = kt.lo; k0 < kt.hi; k0 += kSimtChunk) {
      if (chunk_all_future(p, cr.hi - 1, k0)) break;
      const int width = static_cast<int>(kt.hi - k0 < kSimtChunk ? kt.hi - k0 : kSimtChunk);
      const bool need = chunk_needs_mask(p, kmask, full, cr.lo, k0 + width - 1);
      __syncthreads();
      stage_float_chunk<float, D>(ks, k + k0 * p.k_stride_s, p.k_stride_s, width, args.k_vec);
      stage_float_chunk<float, D>(vs, v + k0 * p.v_stride_s, p.v_stride_s, width, args.v_vec);
      __syncthreads();

      float s[kSimtChunk];
      float mx = -INFINITY;
#pragma unroll
      for (int j = 0; j < kSimtChunk; ++j) {
        float x = -INFINITY;
        if (j < width) {
          float d = 0.0f;
#pragma unroll
          for (int i = 0; i < kN; ++i) d = fmaf(qv[i], ks[j * D + simt_dim(t, i)], d);
          x = sum8(d) * sl2;
          if (need && !(ok && element_allowed(p, kmask, full, pos, k0 + j))) x = -INFINITY;
        }
        s[j] = x;
        mx = fmaxf(mx, x);
      }
      const float alpha = row_rescale(st, mx);
#pragma unroll
      for (int i = 0; i < kN; ++i) o[i] *= alpha;
#pragma unroll
      for (int j = 0; j < kSimtChunk; ++j) {
        if (j < width) {
          const float pr = row_prob(st, s[j]);
          st.l += pr;
#pragma unroll
          for (int i = 0; i < kN; ++i) o[i] = fmaf(pr, vs[j * D + simt_dim(t, i)], o[i]);
        }
      }
    }
  }
  if (ok) {
    const int64_t row = (b * p.q_heads + h) * p.q_len + (pos - p.q_offset);
    const float inv = row_inv_sum(st.l);
    float* orow = static_cast<float*>(a.out) + row * D;
#pragma unroll
    for (int i = 0; i < kN; ++i) orow[simt_dim(t, i)] = o[i] * inv;
    if (t % kSimtLanes == 0) a.lse[row] = row_lse(st.m, st.l);
  }
}

// ---- backward ----
// delta[row] = sum_d dout[row, d] * out[row, d] (fp32), one warp per row.
template <class T>
__global__ void __launch_bounds__(256) delta_kernel(const T* dout, const T* out, float* delta, int64_t rows, int D) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  if (row >= rows) return;  // uniform over the warp
  float s = 0.0f;
  for (int d = lane; d < D; d += kWarpSize) s = fmaf(to_float(dout[row * D + d]), to_float(out[row * D + d]), s);
  s = warp_sum(s);
  if (lane == 0) delta[row] = s;
}

template <class T, int D>
__global__ void __launch_bounds__(kSimtThreads) bwd_dq_kernel(BwdK args) {
  constexpr int kN = D / kSimtLanes;
  __shared__ __align__(16) float ks[kSimtChunk * D];
  __shared__ __align__(16) float vs[kSimtChunk * D];
  const BwdArgs& a = args.a;
  const SparseAttentionParams& p = a.p;
  const CtaRows cr = cta_rows(blockIdx.x, kSimtRows, p);
  if (cr.lo >= cr.hi) return;
  const int t = threadIdx.x;
  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / (p.q_heads / p.kv_heads);
  const int lh = layout_head(h, p);
  const uint8_t* kmask = p.key_mask != nullptr ? p.key_mask + b * p.key_mask_stride_b : nullptr;
  const T* q = static_cast<const T*>(a.q) + b * p.q_stride_b + h * p.q_stride_h;
  const T* k = static_cast<const T*>(a.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const T* v = static_cast<const T*>(a.v) + b * p.v_stride_b + hk * p.v_stride_h;
  const int64_t pos = cr.first + simt_row(t);
  const bool ok = pos >= cr.lo && pos < cr.hi;
  const int64_t row = (b * p.q_heads + h) * p.q_len + (pos - p.q_offset);  // used only when ok

  float qv[kN], dov[kN], dq[kN];
  const T* dout = static_cast<const T*>(a.dout) + row * D;
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    qv[i] = ok ? to_float(q[(pos - p.q_offset) * p.q_stride_s + simt_dim(t, i)]) : 0.0f;
    dov[i] = ok ? to_float(dout[simt_dim(t, i)]) : 0.0f;
    dq[i] = 0.0f;
  }
  const float lse = ok ? a.lse[row] : -INFINITY;
  const float delta = ok ? a.delta[row] : 0.0f;
  const float sl2 = p.scale * kLog2e;

  const KeyRange ents = clamp_entries(row_entries(lh, cr.plan_row, p), a.nnz);
  for (int64_t ent = ents.lo; ent < ents.hi; ++ent) {
    const int64_t c = p.col_idx[ent];
    if (c < 0 || c >= p.num_k_blocks) continue;
    const bool full = p.col_full[ent] != 0;
    const KeyRange kt = tile_keys(c, p);
    for (int64_t k0 = kt.lo; k0 < kt.hi; k0 += kSimtChunk) {
      if (chunk_all_future(p, cr.hi - 1, k0)) break;
      const int width = static_cast<int>(kt.hi - k0 < kSimtChunk ? kt.hi - k0 : kSimtChunk);
      const bool need = chunk_needs_mask(p, kmask, full, cr.lo, k0 + width - 1);
      __syncthreads();
      stage_float_chunk<T, D>(ks, k + k0 * p.k_stride_s, p.k_stride_s, width, args.k_vec);
      stage_float_chunk<T, D>(vs, v + k0 * p.v_stride_s, p.v_stride_s, width, args.v_vec);
      __syncthreads();
#pragma unroll 2
      for (int j = 0; j < width; ++j) {  // width is uniform over the CTA
        float sd = 0.0f, pd = 0.0f;
#pragma unroll
        for (int i = 0; i < kN; ++i) {
          sd = fmaf(qv[i], ks[j * D + simt_dim(t, i)], sd);
          pd = fmaf(dov[i], vs[j * D + simt_dim(t, i)], pd);
        }
        sd = sum8(sd);
        pd = sum8(pd);
        const bool allowed = !need || (ok && element_allowed(p, kmask, full, pos, k0 + j));
        const float pr = allowed ? bwd_prob(sd * sl2, lse) : 0.0f;
        const float ds = bwd_dscore(pr, pd, delta);
#pragma unroll
        for (int i = 0; i < kN; ++i) dq[i] = fmaf(ds, ks[j * D + simt_dim(t, i)], dq[i]);
      }
    }
  }
  if (ok) {
    T* dqrow = static_cast<T*>(a.dq) + row * D;
#pragma unroll
    for (int i = 0; i < kN; ++i) dqrow[simt_dim(t, i)] = from_float<T>(dq[i] * p.scale);
  }
}

template <class T, int D>
__global__ void __launch_bounds__(kSimtThreads) bwd_dkdv_kernel(BwdK args) {
  constexpr int kN = D / kSimtLanes;
  __shared__ __align__(16) float qs[kSimtChunk * D];
  __shared__ __align__(16) float dos[kSimtChunk * D];
  __shared__ float lses[kSimtChunk], deltas[kSimtChunk];
  const BwdArgs& a = args.a;
  const SparseAttentionParams& p = a.p;
  const CtaRows kr = key_cta_rows(blockIdx.x, p);  // kr.plan_row: the key tile
  if (kr.lo >= kr.hi) return;
  const int t = threadIdx.x;
  const int64_t b = blockIdx.z, hk = blockIdx.y, group = p.q_heads / p.kv_heads;
  const uint8_t* kmask = p.key_mask != nullptr ? p.key_mask + b * p.key_mask_stride_b : nullptr;
  const int64_t key = kr.first + simt_row(t);
  const bool ok = key < kr.hi;
  const T* k = static_cast<const T*>(a.k) + b * p.k_stride_b + hk * p.k_stride_h;
  const T* v = static_cast<const T*>(a.v) + b * p.v_stride_b + hk * p.v_stride_h;

  float kv[kN], vv[kN], dk[kN], dv[kN];
#pragma unroll
  for (int i = 0; i < kN; ++i) {
    kv[i] = ok ? to_float(k[key * p.k_stride_s + simt_dim(t, i)]) : 0.0f;
    vv[i] = ok ? to_float(v[key * p.v_stride_s + simt_dim(t, i)]) : 0.0f;
    dk[i] = 0.0f;
    dv[i] = 0.0f;
  }
  const float sl2 = p.scale * kLog2e;

  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = hk * group + g;
    const int lh = layout_head(h, p);
    const T* q = static_cast<const T*>(a.q) + b * p.q_stride_b + h * p.q_stride_h;
    const int64_t row0 = (b * p.q_heads + h) * p.q_len;  // row of query index 0 in dout / lse / delta
    const T* dout = static_cast<const T*>(a.dout) + row0 * D;
    const KeyRange ents = clamp_entries(col_entries(lh, kr.plan_row, p), a.nnz);
    for (int64_t ent = ents.lo; ent < ents.hi; ++ent) {
      const int64_t r = p.row_idx[ent];
      if (r < 0 || r >= p.num_q_blocks) continue;
      const bool full = p.row_full[ent] != 0;
      const KeyRange qr = row_queries(r, p);
      for (int64_t p0 = qr.lo; p0 < qr.hi; p0 += kSimtChunk) {
        const int width = static_cast<int>(qr.hi - p0 < kSimtChunk ? qr.hi - p0 : kSimtChunk);
        if (chunk_all_future(p, p0 + width - 1, kr.lo)) continue;
        const bool need = chunk_needs_mask(p, kmask, full, p0, kr.hi - 1);
        const int64_t i0 = p0 - p.q_offset;
        __syncthreads();
        stage_float_chunk<T, D>(qs, q + i0 * p.q_stride_s, p.q_stride_s, width, args.q_vec);
        stage_float_chunk<T, D>(dos, dout + i0 * D, D, width, args.do_vec);
        if (t < kSimtChunk) {
          lses[t] = t < width ? a.lse[row0 + i0 + t] : -INFINITY;
          deltas[t] = t < width ? a.delta[row0 + i0 + t] : 0.0f;
        }
        __syncthreads();
#pragma unroll 2
        for (int j = 0; j < width; ++j) {  // width is uniform over the CTA
          float sd = 0.0f, pd = 0.0f;
#pragma unroll
          for (int i = 0; i < kN; ++i) {
            sd = fmaf(kv[i], qs[j * D + simt_dim(t, i)], sd);
            pd = fmaf(vv[i], dos[j * D + simt_dim(t, i)], pd);
          }
          sd = sum8(sd);
          pd = sum8(pd);
          const bool allowed = !need || (ok && element_allowed(p, kmask, full, p0 + j, key));
          const float pr = allowed ? bwd_prob(sd * sl2, lses[j]) : 0.0f;
          const float ds = bwd_dscore(pr, pd, deltas[j]);
#pragma unroll
          for (int i = 0; i < kN; ++i) {
            dv[i] = fmaf(pr, dos[j * D + simt_dim(t, i)], dv[i]);
            dk[i] = fmaf(ds, qs[j * D + simt_dim(t, i)], dk[i]);
          }
        }
      }
    }
  }
  if (ok) {
    const int64_t row = (b * p.kv_heads + hk) * p.kv_len + key;
    T* dkrow = static_cast<T*>(a.dk) + row * D;
    T* dvrow = static_cast<T*>(a.dv) + row * D;
#pragma unroll
    for (int i = 0; i < kN; ++i) {
      dkrow[simt_dim(t, i)] = from_float<T>(dk[i] * p.scale);
      dvrow[simt_dim(t, i)] = from_float<T>(dv[i]);
    }
  }
}

int64_t elem_size(DType t) { return t == DType::kFloat32 ? 4 : 2; }

}  // namespace

cudaError_t launch_fwd(const FwdArgs& a, cudaStream_t stream) {
  const SparseAttentionParams& p = a.p;
  if (!supported_head_dim(p.head_dim) || p.block_size % 16 != 0 || p.block_size <= 0) return cudaErrorInvalidValue;
  FwdK k{a, false, false, false};
  const int64_t es = elem_size(a.dtype);
  k.q_vec = vec_ok(a.q, es, p.q_stride_b, p.q_stride_h, p.q_stride_s);
  k.k_vec = vec_ok(a.k, es, p.k_stride_b, p.k_stride_h, p.k_stride_s);
  k.v_vec = vec_ok(a.v, es, p.v_stride_b, p.v_stride_h, p.v_stride_s);
  with_head_dim(p.head_dim, [&](auto dtag) {
    constexpr int D = decltype(dtag)::value;
    if (a.dtype == DType::kFloat32) {
      const dim3 grid(static_cast<unsigned>(cta_count(kSimtRows, p)), static_cast<unsigned>(p.q_heads),
                      static_cast<unsigned>(p.batch));
      fwd_simt_kernel<D><<<grid, kSimtThreads, 0, stream>>>(k);
    } else {
      const int warps = mma_warps(p.block_size);
      const dim3 grid(static_cast<unsigned>(cta_count(warps * kMmaRowsPerWarp, p)), static_cast<unsigned>(p.q_heads),
                      static_cast<unsigned>(p.batch));
      if (a.dtype == DType::kFloat16)
        fwd_mma_kernel<__half, D><<<grid, warps * kWarpSize, 0, stream>>>(k);
      else
        fwd_mma_kernel<__nv_bfloat16, D><<<grid, warps * kWarpSize, 0, stream>>>(k);
    }
  });
  return cudaGetLastError();
}

cudaError_t launch_bwd(const BwdArgs& a, cudaStream_t stream) {
  const SparseAttentionParams& p = a.p;
  if (!supported_head_dim(p.head_dim) || p.block_size % 16 != 0 || p.block_size <= 0) return cudaErrorInvalidValue;
  BwdK k{a, false, false, false, false};
  const int64_t es = elem_size(a.dtype);
  k.q_vec = vec_ok(a.q, es, p.q_stride_b, p.q_stride_h, p.q_stride_s);
  k.k_vec = vec_ok(a.k, es, p.k_stride_b, p.k_stride_h, p.k_stride_s);
  k.v_vec = vec_ok(a.v, es, p.v_stride_b, p.v_stride_h, p.v_stride_s);
  k.do_vec = vec_ok(a.dout, es, 0, 0, p.head_dim);
  const int64_t rows = p.batch * p.q_heads * p.q_len;
  with_type(a.dtype, [&](auto ttag) {
    using T = typename decltype(ttag)::type;
    delta_kernel<T><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(
        static_cast<const T*>(a.dout), static_cast<const T*>(a.out), a.delta, rows, static_cast<int>(p.head_dim));
    with_head_dim(p.head_dim, [&](auto dtag) {
      constexpr int D = decltype(dtag)::value;
      const dim3 qgrid(static_cast<unsigned>(cta_count(kSimtRows, p)), static_cast<unsigned>(p.q_heads),
                       static_cast<unsigned>(p.batch));
      bwd_dq_kernel<T, D><<<qgrid, kSimtThreads, 0, stream>>>(k);
      const dim3 kgrid(static_cast<unsigned>(key_cta_count(p)), static_cast<unsigned>(p.kv_heads),
                       static_cast<unsigned>(p.batch));
      bwd_dkdv_kernel<T, D><<<kgrid, kSimtThreads, 0, stream>>>(k);
    });
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace attention
}  // namespace slimformer
