// CUDA kernels of the token merging ops: launch geometry, barriers, shuffles, ballots and smem staging
// around the math of tome_cuda_math.h (which the CPU tests replay through the _test_tome_cuda_* hooks,
// bit for bit). Torch-free. Geometry: see the comment at the top of tome_cuda_math.h.
//
// Determinism: no float atomics anywhere. Every sum runs in a fixed order (dot products over features
// in order, norms by a fixed butterfly, slot sizes and merged rows over contributors in index order);
// integer atomics only count (shared-memory counters of the prepare kernel, the global flags).
// Bounds: metric / x rows are read only for indices taken from the kernels' own lists (always < N);
// dst is clamped to [0, N) before it indexes; slots outside [0, n_out) are skipped by the merge.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string.h>

#include "common/cuda_types.cuh"
#include "tome/tome_cuda.h"

namespace slimformer {
namespace tome {
namespace cuda {
namespace {

using cuda_types::from_float;
using cuda_types::to_float;
using cuda_types::TypeTag;
using cuda_types::with_type;

__device__ __forceinline__ float warp_max(float v) {  // exact in any order
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(kFullMask, v, off));
  return v;
}

struct MatchPtrs {
  MatchArgs a;
  float* inv_norm;
  int32_t* src_list;
  int32_t* dst_list;
  int32_t* row_info;
  uint8_t* selected;
  int32_t* survivor;
};

MatchPtrs match_ptrs(const MatchArgs& a) {
  const MatchWorkspace w = match_workspace(a.B, a.N);
  char* base = static_cast<char*>(a.workspace);
  return {a,
          reinterpret_cast<float*>(base + w.inv_norm),
          reinterpret_cast<int32_t*>(base + w.src_list),
          reinterpret_cast<int32_t*>(base + w.dst_list),
          reinterpret_cast<int32_t*>(base + w.row_info),
          reinterpret_cast<uint8_t*>(base + w.selected),
          reinterpret_cast<int32_t*>(base + w.survivor)};
}

// ---- 1. prepare: one CTA per batch row ----
template <class T>
__global__ void __launch_bounds__(kPrepThreads) prepare_kernel(MatchPtrs p) {
  const MatchArgs& a = p.a;
  const int64_t b = blockIdx.x, N = a.N, C = a.C, row = b * N;
  const int t = threadIdx.x, warp = t / kWarpSize, lane = t % kWarpSize;
  const T* metric = static_cast<const T*>(a.metric) + row * C;
  const float* sizes = a.sizes + row;
  const int8_t* roles = a.roles + row;

  for (int64_t i = warp; i < N; i += kPrepWarps) {  // warp-uniform loop
    const int8_t role = roles[i];
    if (role == kSource || role == kDestination) {
      float ss = 0.0f;
      for (int64_t c = lane; c < C; c += kWarpSize) ss = square_step(to_float(metric[i * C + c]), ss);
      ss = warp_sum(ss);
      float inv = inverse_norm(ss);
      if (isinf(ss)) {  // |x| beyond ~1e19: normalise by the largest magnitude first (as the CPU does)
        float mx = 0.0f;
        for (int64_t c = lane; c < C; c += kWarpSize) mx = fmaxf(mx, fabsf(to_float(metric[i * C + c])));
        mx = warp_max(mx);
        if (isfinite(mx)) {
          float s2 = 0.0f;
          for (int64_t c = lane; c < C; c += kWarpSize) s2 = square_step(to_float(metric[i * C + c]) / mx, s2);
          inv = inverse_norm(warp_sum(s2)) / mx;
        }
      }
      if (lane == 0) p.inv_norm[row + i] = inv;
    }
    if (lane == 0 && role != kSource) {
      a.dst[row + i] = -1;
      a.score[row + i] = -INFINITY;
    }
  }

  __shared__ int32_t warp_src[kPrepWarps], warp_dst[kPrepWarps];
  __shared__ int32_t first_dst, n_dst, n_bad, n_bad_size;
  if (t == 0) {
    first_dst = INT32_MAX;
    n_dst = 0;
    n_bad = 0;
    n_bad_size = 0;
  }
  __syncthreads();
  int32_t carry_src = 0, carry_dst = 0;
  for (int64_t base = 0; base < N; base += kPrepThreads) {  // uniform over the CTA
    const int64_t i = base + t;
    bool src = false, real = false;
    if (i < N) {
      const int8_t role = roles[i];
      src = role == kSource;
      const float size = sizes[i];
      real = is_real_destination(role, size);
      if (!size_valid(size)) atomicAdd(&n_bad_size, 1);
      if (role == kDestination) {
        atomicMin(&first_dst, static_cast<int32_t>(i));
        atomicAdd(&n_dst, 1);
      }
      if (!role_valid(role)) atomicAdd(&n_bad, 1);
    }
    const uint32_t bs = __ballot_sync(kFullMask, src), bd = __ballot_sync(kFullMask, real);
    if (lane == 0) {
      warp_src[warp] = popcount32(bs);
      warp_dst[warp] = popcount32(bd);
    }
    __syncthreads();
    int32_t os = carry_src, od = carry_dst, ts = 0, td = 0;
#pragma unroll
    for (int w = 0; w < kPrepWarps; ++w) {
      if (w < warp) {
        os += warp_src[w];
        od += warp_dst[w];
      }
      ts += warp_src[w];
      td += warp_dst[w];
    }
    if (src) p.src_list[row + os + lane_prefix(bs, lane)] = static_cast<int32_t>(i);
    if (real) p.dst_list[row + od + lane_prefix(bd, lane)] = static_cast<int32_t>(i);
    carry_src += ts;
    carry_dst += td;
    __syncthreads();  // warp_src / warp_dst are rewritten by the next chunk
  }
  if (t == 0) {
    int32_t* info = p.row_info + b * kRowInfo;
    info[kInfoSources] = carry_src;
    info[kInfoRealDestinations] = carry_dst;
    info[kInfoFallback] = fallback_destination(first_dst, n_dst);
    info[kInfoDestinations] = n_dst;
    if (!row_feasible(carry_src, n_dst, a.r)) atomicAdd(&a.flags[0], 1);
    if (n_bad > 0) atomicAdd(&a.flags[1], n_bad);
    if (n_bad_size > 0) atomicAdd(&a.flags[2], n_bad_size);
  }
}

// ---- 2. best match: CTA (b, tile of kTileS sources) against every real destination ----
template <class T>
__global__ void __launch_bounds__(kMatchThreads) match_kernel(MatchPtrs p) {
  const MatchArgs& a = p.a;
  const int64_t b = blockIdx.x, N = a.N, C = a.C, row = b * N;
  const int32_t* info = p.row_info + b * kRowInfo;
  const int32_t ns = info[kInfoSources], nd = info[kInfoRealDestinations], fallback = info[kInfoFallback];
  const int64_t s0 = static_cast<int64_t>(blockIdx.y) * kTileS;
  if (s0 >= ns) return;  // uniform over the CTA, before any barrier
  const T* metric = static_cast<const T*>(a.metric) + row * C;

  static_assert(kTileS == kTileD, "one staging loop fills both tiles");
  __shared__ float as[kTileS * kSmemStride], bs[kTileD * kSmemStride];
  __shared__ int32_t si[kTileS], dj[kTileD];
  __shared__ float sinv[kTileS], dinv[kTileD];
  const int t = threadIdx.x, ty = match_ty(t), tx = match_tx(t);
  if (t < kTileS) {
    const int64_t q = s0 + t;
    const int32_t i = q < ns ? p.src_list[row + q] : -1;
    si[t] = i;
    sinv[t] = i >= 0 ? p.inv_norm[row + i] : 0.0f;
  }
  __syncthreads();  // si / sinv are read by other threads (also when the row has no real destination)
  Best best[kMicro];
#pragma unroll
  for (int k = 0; k < kMicro; ++k) best[k] = best_init();

  for (int64_t d0 = 0; d0 < nd; d0 += kTileD) {
    __syncthreads();  // the previous tile's readers of dj are done
    if (t < kTileD) {
      const int64_t q = d0 + t;
      const int32_t j = q < nd ? p.dst_list[row + q] : -1;
      dj[t] = j;
      dinv[t] = j >= 0 ? p.inv_norm[row + j] : 0.0f;
    }
    float acc[kMicro][kMicro];
#pragma unroll
    for (int k1 = 0; k1 < kMicro; ++k1)
#pragma unroll
      for (int k2 = 0; k2 < kMicro; ++k2) acc[k1][k2] = 0.0f;
    __syncthreads();
    for (int64_t c0 = 0; c0 < C; c0 += kChunkC) {
      for (int e = t; e < kTileS * kChunkC; e += kMatchThreads) {
        const int r = stage_row(e), cc = stage_col(e);
        const int64_t c = c0 + cc;
        const int32_t i = si[r], j = dj[r];
        as[smem_index(r, cc)] = i >= 0 && c < C ? to_float(metric[i * C + c]) * sinv[r] : 0.0f;
        bs[smem_index(r, cc)] = j >= 0 && c < C ? to_float(metric[j * C + c]) * dinv[r] : 0.0f;
      }
      __syncthreads();
#pragma unroll 8
      for (int c = 0; c < kChunkC; ++c) {  // the whole chunk: staged zeros leave the sums unchanged
        float x[kMicro], y[kMicro];
#pragma unroll
        for (int k = 0; k < kMicro; ++k) {
          x[k] = as[smem_index(match_src_of(ty, k), c)];
          y[k] = bs[smem_index(match_dst_of(tx, k), c)];
        }
#pragma unroll
        for (int k1 = 0; k1 < kMicro; ++k1)
#pragma unroll
          for (int k2 = 0; k2 < kMicro; ++k2) acc[k1][k2] = dot_step(x[k1], y[k2], acc[k1][k2]);
      }
      __syncthreads();  // readers done before the next chunk is staged
    }
#pragma unroll
    for (int k2 = 0; k2 < kMicro; ++k2) {
      const int32_t j = dj[match_dst_of(tx, k2)];
      if (j >= 0) {
#pragma unroll
        for (int k1 = 0; k1 < kMicro; ++k1) best_update(best[k1], acc[k1][k2], j);
      }
    }
  }

  // The 16 tx lanes of a source group (one half-warp) hold argmaxes over disjoint destinations.
#pragma unroll
  for (int k = 0; k < kMicro; ++k)
#pragma unroll
    for (int off = kGroup / 2; off > 0; off >>= 1) {
      Best other;
      other.v = __shfl_xor_sync(kFullMask, best[k].v, off);
      other.j = __shfl_xor_sync(kFullMask, best[k].j, off);
      best[k] = best_combine(best[k], other);
    }
#pragma unroll
  for (int k = 0; k < kMicro; ++k) {
    if (tx == k) {
      const int32_t i = si[match_src_of(ty, k)];
      if (i >= 0) {
        const SourceResult res = finish_source(a.sizes[row + i], best[k], fallback);
        a.dst[row + i] = res.dst;
        a.score[row + i] = res.score;
      }
    }
  }
}

// ---- 3. rank: CTA (b, tile of kRankThreads sources) ----
__global__ void __launch_bounds__(kRankThreads) rank_kernel(MatchPtrs p) {
  const MatchArgs& a = p.a;
  const int64_t b = blockIdx.x, row = b * a.N;
  const int32_t ns = p.row_info[b * kRowInfo + kInfoSources];
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * kRankThreads;
  if (p0 >= ns) return;  // uniform
  __shared__ float sc[kRankChunk];
  const int t = threadIdx.x;
  const int64_t pos = p0 + t;
  const bool valid = pos < ns;
  const int32_t i = valid ? p.src_list[row + pos] : 0;
  const float mine = valid ? a.score[row + i] : 0.0f;
  int64_t rank = 0;
  for (int64_t q0 = 0; q0 < ns; q0 += kRankChunk) {
    __syncthreads();
    for (int e = t; e < kRankChunk; e += kRankThreads) {
      const int64_t q = q0 + e;
      sc[e] = q < ns ? a.score[row + p.src_list[row + q]] : 0.0f;
    }
    __syncthreads();
    const int w = static_cast<int>(ns - q0 < kRankChunk ? ns - q0 : kRankChunk);
    if (valid && merges(rank, a.r))  // a rank >= r only grows: the answer is known
      for (int e = 0; e < w; ++e) rank += ranks_before(sc[e], q0 + e, mine, pos);
  }
  if (valid) p.selected[row + i] = merges(rank, a.r) ? 1 : 0;
}

// ---- 4. slots: one CTA per batch row ----
// `selected` is read for sources only (it is written for sources only, and not at all when r = 0).
__device__ __forceinline__ bool keeps_token(const MatchArgs& a, const uint8_t* selected, int64_t idx) {
  const int8_t role = a.roles[idx];
  return keeps(role, a.r > 0 && role == kSource && selected[idx] != 0, a.r);
}

__global__ void __launch_bounds__(kSlotThreads) slot_kernel(MatchPtrs p) {
  const MatchArgs& a = p.a;
  const int64_t b = blockIdx.x, N = a.N, row = b * N;
  const int t = threadIdx.x, warp = t / kWarpSize, lane = t % kWarpSize;
  constexpr int kWarps = kSlotThreads / kWarpSize;
  __shared__ int32_t warp_keep[kWarps];
  int32_t carry = 0;
  for (int64_t base = 0; base < N; base += kSlotThreads) {  // uniform
    const int64_t i = base + t;
    const bool keep = i < N && keeps_token(a, p.selected, row + i);
    const uint32_t bal = __ballot_sync(kFullMask, keep);
    if (lane == 0) warp_keep[warp] = popcount32(bal);
    __syncthreads();
    int32_t off = carry, total = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      if (w < warp) off += warp_keep[w];
      total += warp_keep[w];
    }
    if (i < N) {
      const int32_t surv = off + lane_prefix(bal, lane) + (keep ? 1 : 0) - 1;
      p.survivor[row + i] = surv;
      if (keep) a.slot[row + i] = surv;
    }
    carry += total;
    __syncthreads();  // warp_keep reuse; the last one also publishes survivor[] to the whole CTA
  }
  for (int64_t i = t; i < N; i += kSlotThreads) {
    if (!keeps_token(a, p.selected, row + i)) {
      int64_t d = a.dst[row + i];
      d = d < 0 ? 0 : d >= N ? N - 1 : d;
      a.slot[row + i] = p.survivor[row + d];
    }
  }
}

// ---- merge ----
struct MergePtrs {
  MergeArgs a;
  int32_t* ptr;
  int32_t* cursor;
  int32_t* order;
};

MergePtrs merge_ptrs(const MergeArgs& a) {
  const MergeWorkspace w = merge_workspace(a.B, a.N, a.n_out);
  char* base = static_cast<char*>(a.workspace);
  return {a, reinterpret_cast<int32_t*>(base + w.ptr), reinterpret_cast<int32_t*>(base + w.cursor),
          reinterpret_cast<int32_t*>(base + w.order)};
}

// Slot of token i as the index kernel sees it: -1 for i >= N or an invalid slot.
__device__ __forceinline__ int32_t slot_of(const MergeArgs& a, int64_t row, int64_t i, int& bad) {
  if (i >= a.N) return -1;
  const int64_t s = a.slot[row + i];
  if (!slot_valid(s, a.n_out)) {
    ++bad;
    return -1;
  }
  return static_cast<int32_t>(s);
}

// ---- 1. index: warp per batch row, stable counting sort by slot ----
__global__ void __launch_bounds__(kMergeWarps* kWarpSize) merge_index_kernel(MergePtrs p) {
  const MergeArgs& a = p.a;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t b = static_cast<int64_t>(blockIdx.x) * kMergeWarps + warp;
  if (b >= a.B) return;  // warp-uniform; the kernel has no CTA barrier
  const int64_t N = a.N, n_out = a.n_out, row = b * N;
  int32_t* ptr = p.ptr + b * (n_out + 1);  // counts at ptr[o + 1], then the inclusive scan
  int32_t* cursor = p.cursor + b * n_out;
  int32_t* order = p.order + row;
  for (int64_t o = lane; o <= n_out; o += kWarpSize) ptr[o] = 0;
  __syncwarp();
  int bad = 0, ignored = 0, bad_size = 0;
  for (int64_t base = 0; base < N; base += kWarpSize) {
    const int32_t o = slot_of(a, row, base + lane, bad);
    if (base + lane < N && !size_valid(a.sizes[row + base + lane])) ++bad_size;
    const uint32_t peers = __match_any_sync(kFullMask, o);
    if (o >= 0 && lane == peer_leader(peers)) ptr[o + 1] += popcount32(peers);
    __syncwarp();
  }
  int32_t carry = 0;
  for (int64_t o0 = 0; o0 < n_out; o0 += kWarpSize) {
    const int64_t o = o0 + lane;
    const int32_t v = o < n_out ? ptr[o + 1] : 0;
    int32_t incl = v;
#pragma unroll
    for (int off = 1; off < kWarpSize; off <<= 1) {
      const int32_t up = __shfl_up_sync(kFullMask, incl, off);
      if (lane >= off) incl += up;
    }
    if (o < n_out) {
      ptr[o + 1] = carry + incl;
      cursor[o] = carry + incl - v;
    }
    carry += __shfl_sync(kFullMask, incl, kWarpSize - 1);
  }
  __syncwarp();
  for (int64_t base = 0; base < N; base += kWarpSize) {
    const int32_t o = slot_of(a, row, base + lane, ignored);
    const uint32_t peers = __match_any_sync(kFullMask, o);
    const int32_t pos = o >= 0 ? cursor[o] + peer_rank(peers, lane) : -1;
    __syncwarp();
    if (o >= 0) {
      order[pos] = static_cast<int32_t>(base + lane);
      if (lane == peer_leader(peers)) cursor[o] += popcount32(peers);
    }
    __syncwarp();
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    bad += __shfl_xor_sync(kFullMask, bad, off);
    bad_size += __shfl_xor_sync(kFullMask, bad_size, off);
  }
  if (lane == 0 && bad > 0) atomicAdd(&a.flags[0], bad);
  if (lane == 0 && bad_size > 0) atomicAdd(&a.flags[1], bad_size);
}

// V consecutive elements as floats (16-byte load when V > 1) and back.
template <class T, int V>
__device__ __forceinline__ void load_vec(const T* g, float (&v)[V]) {
  if constexpr (V == 1) {
    v[0] = to_float(g[0]);
  } else {
    static_assert(V * sizeof(T) == 16, "16-byte vectors");
    const uint4 raw = *reinterpret_cast<const uint4*>(g);
    T e[V];
    memcpy(e, &raw, 16);
#pragma unroll
    for (int k = 0; k < V; ++k) v[k] = to_float(e[k]);
  }
}
template <class T, int V>
__device__ __forceinline__ void store_vec(T* g, const float (&v)[V]) {
  if constexpr (V == 1) {
    g[0] = from_float<T>(v[0]);
  } else {
    T e[V];
#pragma unroll
    for (int k = 0; k < V; ++k) e[k] = from_float<T>(v[k]);
    uint4 raw;
    memcpy(&raw, e, 16);
    *reinterpret_cast<uint4*>(g) = raw;
  }
}

// ---- 2. gather: warp per output row ----
template <class T, int V>
__global__ void __launch_bounds__(kMergeWarps* kWarpSize) merge_gather_kernel(MergePtrs p) {
  const MergeArgs& a = p.a;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t orow = static_cast<int64_t>(blockIdx.x) * kMergeWarps + warp;
  if (orow >= a.B * a.n_out) return;
  const int64_t n_out = a.n_out, N = a.N, D = a.D, b = orow / n_out, o = orow % n_out;
  const int32_t* ptr = p.ptr + b * (n_out + 1);
  const int32_t* order = p.order + b * N;
  const float* sizes = a.sizes + b * N;
  const int32_t beg = ptr[o], end = ptr[o + 1], count = end - beg;
  float slot_size = 0.0f;
  for (int32_t k = beg; k < end; ++k) slot_size += sizes[order[k]];
  if (lane == 0) a.out_sizes[orow] = slot_size;
  const T* x = static_cast<const T*>(a.x) + b * N * D;
  T* out = static_cast<T*>(a.out) + orow * D;
  const int64_t chunks = merge_chunks(D, V);
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t c = merge_col(ch, lane, V);
    if (c >= D) continue;  // with V > 1, D % V == 0: a started vector is whole
    float acc[V];
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = 0.0f;
    for (int32_t k = beg; k < end; ++k) {
      const int32_t i = order[k];
      const float w = merge_weight(sizes[i], slot_size, count);
      float xv[V];
      load_vec<T, V>(x + i * D + c, xv);
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = dot_step(w, xv[e], acc[e]);
    }
    store_vec<T, V>(out + c, acc);
  }
}

unsigned blocks_of(int64_t n, int64_t per) { return static_cast<unsigned>((n + per - 1) / per); }

}  // namespace

cudaError_t launch_match_prepare(const MatchArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.N == 0) return cudaSuccess;
  const MatchPtrs p = match_ptrs(a);
  with_type(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    prepare_kernel<T><<<static_cast<unsigned>(a.B), kPrepThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

cudaError_t launch_match_finish(const MatchArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.N == 0) return cudaSuccess;
  const MatchPtrs p = match_ptrs(a);
  const dim3 mgrid(static_cast<unsigned>(a.B), static_cast<unsigned>(match_tiles(a.N)));
  with_type(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    match_kernel<T><<<mgrid, kMatchThreads, 0, stream>>>(p);
  });
  if (a.r > 0) {
    const dim3 rgrid(static_cast<unsigned>(a.B), static_cast<unsigned>(rank_tiles(a.N)));
    rank_kernel<<<rgrid, kRankThreads, 0, stream>>>(p);
  }
  slot_kernel<<<static_cast<unsigned>(a.B), kSlotThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_merge_index(const MergeArgs& a, cudaStream_t stream) {
  if (a.B == 0) return cudaSuccess;
  merge_index_kernel<<<blocks_of(a.B, kMergeWarps), kMergeWarps * kWarpSize, 0, stream>>>(merge_ptrs(a));
  return cudaGetLastError();
}

cudaError_t launch_merge_gather(const MergeArgs& a, cudaStream_t stream) {
  if (a.B == 0 || a.n_out == 0) return cudaSuccess;
  const MergePtrs p = merge_ptrs(a);
  const unsigned grid = blocks_of(a.B * a.n_out, kMergeWarps);
  with_type(a.dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const bool aligned = reinterpret_cast<uintptr_t>(a.x) % 16 == 0 && reinterpret_cast<uintptr_t>(a.out) % 16 == 0;
    if (merge_vec(a.D, sizeof(T), aligned) > 1)
      merge_gather_kernel<T, 16 / sizeof(T)><<<grid, kMergeWarps * kWarpSize, 0, stream>>>(p);
    else
      merge_gather_kernel<T, 1><<<grid, kMergeWarps * kWarpSize, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace tome
}  // namespace slimformer
