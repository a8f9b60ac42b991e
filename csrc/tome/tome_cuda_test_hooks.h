// slimformer._C._test_tome_cuda_* : the token merging CUDA kernels' index, selection and merge math
// (tome_cuda_math.h) and host replays of the kernels (tome_cuda.cu), CTA by CTA, warp by warp and lane
// by lane with the same functions, for tests/test_tome_cuda_math.py. Barriers become loop boundaries;
// __shfl_xor_sync the same butterflies over emulated lanes; __ballot_sync / __match_any_sync masks built
// from the emulated lanes. Every float operation is the kernel's (explicit fmaf, the same order), so a
// replay is bit-exact: tests/test_tome_cuda.py compares the GPU outputs with it bit for bit. fp16/bf16
// inputs arrive as their exact fp32 values; the merge replay returns the fp32 accumulators before the
// kernel's final round-to-nearest-even store (the tests convert them with torch, which rounds the same).
// Workspaces start filled with garbage patterns, so a kernel step that read something no earlier step
// wrote would show up as a wrong answer. Compiled into every build (CPU-only too): nothing here needs
// CUDA or torch. Included by module.cpp only.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <tuple>
#include <vector>

#include "common/numpy_arrays.h"
#include "tome/tome_cuda_math.h"

namespace slimformer {
namespace tome {
namespace cuda {
namespace test_hooks {

namespace py = pybind11;

constexpr int kLanes = kWarpSize;

inline uint32_t ballot_host(const bool* flags32) {
  uint32_t m = 0;
  for (int l = 0; l < kLanes; ++l) m |= static_cast<uint32_t>(flags32[l]) << l;
  return m;
}

// __match_any_sync over 32 emulated lanes.
inline void match_any_host(const int32_t* v32, uint32_t* peers32) {
  for (int l = 0; l < kLanes; ++l) {
    uint32_t m = 0;
    for (int q = 0; q < kLanes; ++q) m |= static_cast<uint32_t>(v32[q] == v32[l]) << q;
    peers32[l] = m;
  }
}

// ---------------------------------------------------------------------------------------------------
// tome_match: prepare, match, rank, slot kernels replayed in launch order.
struct MatchState {
  int64_t B, N, C, r;
  const float* metric;
  const float* sizes;
  const int8_t* roles;
  std::vector<float> inv_norm;
  std::vector<int32_t> src_list, dst_list, row_info, survivor;
  std::vector<uint8_t> selected;
  std::vector<int64_t> slot, dst;
  std::vector<float> score;
  int32_t flags[3] = {0, 0, 0};
};

inline void replay_prepare(MatchState& s) {
  const int64_t N = s.N, C = s.C;
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t row = b * N;
    const float* metric = s.metric + row * C;
    const float* sizes = s.sizes + row;
    const int8_t* roles = s.roles + row;
    for (int64_t i = 0; i < N; ++i) {  // warp i % kPrepWarps; the order of warps does not matter
      const int8_t role = roles[i];
      if (role == kSource || role == kDestination) {
        float part[kLanes];
        for (int l = 0; l < kLanes; ++l) {
          float ss = 0.0f;
          for (int64_t c = l; c < C; c += kLanes) ss = square_step(metric[i * C + c], ss);
          part[l] = ss;
        }
        const float ss = warp_sum_host(part);
        float inv = inverse_norm(ss);
        if (std::isinf(ss)) {  // the kernel's rescaling of huge rows
          float mx = 0.0f;
          for (int64_t c = 0; c < C; ++c) mx = std::fmax(mx, std::fabs(metric[i * C + c]));
          if (std::isfinite(mx)) {
            for (int l = 0; l < kLanes; ++l) {
              float s2 = 0.0f;
              for (int64_t c = l; c < C; c += kLanes) s2 = square_step(metric[i * C + c] / mx, s2);
              part[l] = s2;
            }
            inv = inverse_norm(warp_sum_host(part)) / mx;
          }
        }
        s.inv_norm[row + i] = inv;
      }
      if (role != kSource) {
        s.dst[row + i] = -1;
        s.score[row + i] = -INFINITY;
      }
    }
    int32_t first_dst = INT32_MAX, n_dst = 0, n_bad = 0, n_bad_size = 0, carry_src = 0, carry_dst = 0;
    for (int64_t base = 0; base < N; base += kPrepThreads) {
      bool src[kPrepThreads], real[kPrepThreads];
      for (int t = 0; t < kPrepThreads; ++t) {
        const int64_t i = base + t;
        src[t] = real[t] = false;
        if (i < N) {
          const int8_t role = roles[i];
          src[t] = role == kSource;
          real[t] = is_real_destination(role, sizes[i]);
          if (!size_valid(sizes[i])) ++n_bad_size;
          if (role == kDestination) {
            first_dst = std::min<int32_t>(first_dst, static_cast<int32_t>(i));
            ++n_dst;
          }
          if (!role_valid(role)) ++n_bad;
        }
      }
      uint32_t bs[kPrepWarps], bd[kPrepWarps];
      int32_t warp_src[kPrepWarps], warp_dst[kPrepWarps];
      for (int w = 0; w < kPrepWarps; ++w) {
        bs[w] = ballot_host(src + w * kLanes);
        bd[w] = ballot_host(real + w * kLanes);
        warp_src[w] = popcount32(bs[w]);
        warp_dst[w] = popcount32(bd[w]);
      }
      int32_t ts = 0, td = 0;
      for (int w = 0; w < kPrepWarps; ++w) {
        ts += warp_src[w];
        td += warp_dst[w];
      }
      for (int t = 0; t < kPrepThreads; ++t) {
        const int warp = t / kLanes, lane = t % kLanes;
        int32_t os = carry_src, od = carry_dst;
        for (int w = 0; w < warp; ++w) {
          os += warp_src[w];
          od += warp_dst[w];
        }
        if (src[t]) s.src_list[row + os + lane_prefix(bs[warp], lane)] = static_cast<int32_t>(base + t);
        if (real[t]) s.dst_list[row + od + lane_prefix(bd[warp], lane)] = static_cast<int32_t>(base + t);
      }
      carry_src += ts;
      carry_dst += td;
    }
    int32_t* info = s.row_info.data() + b * kRowInfo;
    info[kInfoSources] = carry_src;
    info[kInfoRealDestinations] = carry_dst;
    info[kInfoFallback] = fallback_destination(first_dst, n_dst);
    info[kInfoDestinations] = n_dst;
    if (!row_feasible(carry_src, n_dst, s.r)) s.flags[0] += 1;
    s.flags[1] += n_bad;
    s.flags[2] += n_bad_size;
  }
}

inline void replay_match(MatchState& s) {
  const int64_t N = s.N, C = s.C;
  std::vector<float> as(kTileS * kSmemStride), bs(kTileD * kSmemStride);
  std::vector<Best> best(kMatchThreads * kMicro);
  std::vector<float> acc(kMatchThreads * kMicro * kMicro);
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t row = b * N;
    const float* metric = s.metric + row * C;
    const int32_t* info = s.row_info.data() + b * kRowInfo;
    const int32_t ns = info[kInfoSources], nd = info[kInfoRealDestinations], fallback = info[kInfoFallback];
    for (int64_t tile = 0; tile < match_tiles(N); ++tile) {
      const int64_t s0 = tile * kTileS;
      if (s0 >= ns) continue;
      int32_t si[kTileS], dj[kTileD];
      float sinv[kTileS], dinv[kTileD];
      for (int t = 0; t < kTileS; ++t) {
        const int64_t q = s0 + t;
        si[t] = q < ns ? s.src_list[row + q] : -1;
        sinv[t] = si[t] >= 0 ? s.inv_norm[row + si[t]] : 0.0f;
      }
      for (auto& x : best) x = best_init();
      for (int64_t d0 = 0; d0 < nd; d0 += kTileD) {
        for (int t = 0; t < kTileD; ++t) {
          const int64_t q = d0 + t;
          dj[t] = q < nd ? s.dst_list[row + q] : -1;
          dinv[t] = dj[t] >= 0 ? s.inv_norm[row + dj[t]] : 0.0f;
        }
        for (auto& x : acc) x = 0.0f;
        for (int64_t c0 = 0; c0 < C; c0 += kChunkC) {
          for (int e = 0; e < kTileS * kChunkC; ++e) {
            const int r = stage_row(e), cc = stage_col(e);
            const int64_t c = c0 + cc;
            as[smem_index(r, cc)] = si[r] >= 0 && c < C ? metric[si[r] * C + c] * sinv[r] : 0.0f;
            bs[smem_index(r, cc)] = dj[r] >= 0 && c < C ? metric[dj[r] * C + c] * dinv[r] : 0.0f;
          }
          for (int t = 0; t < kMatchThreads; ++t) {
            const int ty = match_ty(t), tx = match_tx(t);
            float* a = acc.data() + t * kMicro * kMicro;
            for (int c = 0; c < kChunkC; ++c) {
              float x[kMicro], y[kMicro];
              for (int k = 0; k < kMicro; ++k) {
                x[k] = as[smem_index(match_src_of(ty, k), c)];
                y[k] = bs[smem_index(match_dst_of(tx, k), c)];
              }
              for (int k1 = 0; k1 < kMicro; ++k1)
                for (int k2 = 0; k2 < kMicro; ++k2) a[k1 * kMicro + k2] = dot_step(x[k1], y[k2], a[k1 * kMicro + k2]);
            }
          }
        }
        for (int t = 0; t < kMatchThreads; ++t) {
          const int tx = match_tx(t);
          for (int k2 = 0; k2 < kMicro; ++k2) {
            const int32_t j = dj[match_dst_of(tx, k2)];
            if (j >= 0)
              for (int k1 = 0; k1 < kMicro; ++k1)
                best_update(best[t * kMicro + k1], acc[(t * kMicro + k1) * kMicro + k2], j);
          }
        }
      }
      for (int w = 0; w < kMatchThreads / kLanes; ++w)  // butterfly over the half-warps, per k
        for (int k = 0; k < kMicro; ++k)
          for (int off = kGroup / 2; off > 0; off >>= 1) {
            Best old[kLanes];
            for (int l = 0; l < kLanes; ++l) old[l] = best[(w * kLanes + l) * kMicro + k];
            for (int l = 0; l < kLanes; ++l) best[(w * kLanes + l) * kMicro + k] = best_combine(old[l], old[l ^ off]);
          }
      for (int t = 0; t < kMatchThreads; ++t) {
        const int ty = match_ty(t), tx = match_tx(t);
        for (int k = 0; k < kMicro; ++k) {
          if (tx != k) continue;
          const int32_t i = si[match_src_of(ty, k)];
          if (i < 0) continue;
          const SourceResult res = finish_source(s.sizes[row + i], best[t * kMicro + k], fallback);
          s.dst[row + i] = res.dst;
          s.score[row + i] = res.score;
        }
      }
    }
  }
}

inline void replay_rank(MatchState& s) {
  const int64_t N = s.N;
  std::vector<float> sc(kRankChunk);
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t row = b * N;
    const int32_t ns = s.row_info[b * kRowInfo + kInfoSources];
    for (int64_t tile = 0; tile < rank_tiles(N); ++tile) {
      const int64_t p0 = tile * kRankThreads;
      if (p0 >= ns) continue;
      int64_t rank[kRankThreads] = {};
      for (int64_t q0 = 0; q0 < ns; q0 += kRankChunk) {
        for (int e = 0; e < kRankChunk; ++e) {
          const int64_t q = q0 + e;
          sc[e] = q < ns ? s.score[row + s.src_list[row + q]] : 0.0f;
        }
        const int w = static_cast<int>(std::min<int64_t>(ns - q0, kRankChunk));
        for (int t = 0; t < kRankThreads; ++t) {
          const int64_t pos = p0 + t;
          if (pos >= ns || !merges(rank[t], s.r)) continue;
          const float mine = s.score[row + s.src_list[row + pos]];
          for (int e = 0; e < w; ++e) rank[t] += ranks_before(sc[e], q0 + e, mine, pos);
        }
      }
      for (int t = 0; t < kRankThreads; ++t) {
        const int64_t pos = p0 + t;
        if (pos < ns) s.selected[row + s.src_list[row + pos]] = merges(rank[t], s.r) ? 1 : 0;
      }
    }
  }
}

inline bool keeps_host(const MatchState& s, int64_t idx) {
  const int8_t role = s.roles[idx];
  return keeps(role, s.r > 0 && role == kSource && s.selected[idx] != 0, s.r);
}

inline void replay_slot(MatchState& s) {
  const int64_t N = s.N;
  constexpr int kWarps = kSlotThreads / kLanes;
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t row = b * N;
    int32_t carry = 0;
    for (int64_t base = 0; base < N; base += kSlotThreads) {
      bool keep[kSlotThreads];
      for (int t = 0; t < kSlotThreads; ++t) keep[t] = base + t < N && keeps_host(s, row + base + t);
      uint32_t bal[kWarps];
      int32_t warp_keep[kWarps], total = 0;
      for (int w = 0; w < kWarps; ++w) {
        bal[w] = ballot_host(keep + w * kLanes);
        warp_keep[w] = popcount32(bal[w]);
        total += warp_keep[w];
      }
      for (int t = 0; t < kSlotThreads; ++t) {
        const int64_t i = base + t;
        if (i >= N) continue;
        const int warp = t / kLanes, lane = t % kLanes;
        int32_t off = carry;
        for (int w = 0; w < warp; ++w) off += warp_keep[w];
        const int32_t surv = off + lane_prefix(bal[warp], lane) + (keep[t] ? 1 : 0) - 1;
        s.survivor[row + i] = surv;
        if (keep[t]) s.slot[row + i] = surv;
      }
      carry += total;
    }
    for (int64_t i = 0; i < N; ++i)
      if (!keeps_host(s, row + i)) {
        int64_t d = s.dst[row + i];
        d = d < 0 ? 0 : d >= N ? N - 1 : d;
        s.slot[row + i] = s.survivor[row + d];
      }
  }
}

inline py::tuple emulate_match(const F32Array& metric, const F32Array& sizes, const I8Array& roles, int64_t r) {
  if (metric.ndim() != 3) throw py::value_error("metric must be [B, N, C]");
  MatchState s;
  s.B = metric.shape(0);
  s.N = metric.shape(1);
  s.C = metric.shape(2);
  s.r = r;
  if (sizes.ndim() != 2 || roles.ndim() != 2 || sizes.shape(0) != s.B || sizes.shape(1) != s.N ||
      roles.shape(0) != s.B || roles.shape(1) != s.N)
    throw py::value_error("sizes and roles must be [B, N]");
  if (r < 0) throw py::value_error("r must be >= 0");
  s.metric = metric.data();
  s.sizes = sizes.data();
  s.roles = roles.data();
  const int64_t bn = s.B * s.N;
  s.inv_norm.assign(bn, std::numeric_limits<float>::quiet_NaN());
  s.src_list.assign(bn, 0x7fff0000);
  s.dst_list.assign(bn, 0x7fff0000);
  s.row_info.assign(s.B * kRowInfo, -12345);
  s.survivor.assign(bn, -777);
  s.selected.assign(bn, 0xAA);
  s.slot.assign(bn, -999);
  s.dst.assign(bn, -999);
  s.score.assign(bn, std::numeric_limits<float>::quiet_NaN());
  if (bn > 0) {
    replay_prepare(s);
    replay_match(s);
    if (r > 0) replay_rank(s);
    replay_slot(s);
  }
  py::array_t<int64_t> slot({s.B, s.N}), dst({s.B, s.N});
  py::array_t<float> score({s.B, s.N});
  std::copy(s.slot.begin(), s.slot.end(), slot.mutable_data());
  std::copy(s.dst.begin(), s.dst.end(), dst.mutable_data());
  std::copy(s.score.begin(), s.score.end(), score.mutable_data());
  return py::make_tuple(slot, dst, score, py::make_tuple(s.flags[0], s.flags[1], s.flags[2]));
}

// ---------------------------------------------------------------------------------------------------
// tome_merge: index and gather kernels replayed.
inline py::tuple emulate_merge(const F32Array& x, const F32Array& sizes, const I64Array& slot, int64_t n_out,
                               int vec) {
  if (x.ndim() != 3) throw py::value_error("x must be [B, N, D]");
  const int64_t B = x.shape(0), N = x.shape(1), D = x.shape(2);
  if (sizes.ndim() != 2 || slot.ndim() != 2 || sizes.shape(0) != B || sizes.shape(1) != N || slot.shape(0) != B ||
      slot.shape(1) != N)
    throw py::value_error("sizes and slot must be [B, N]");
  if (n_out < 0) throw py::value_error("n_out must be >= 0");
  if (!(vec == 1 || vec == 4 || vec == 8) || (vec > 1 && D % vec != 0))
    throw py::value_error("vec must be 1, or 4 / 8 dividing D (the kernel's 16-byte path)");
  const float* xd = x.data();
  const float* sz = sizes.data();
  const int64_t* sl = slot.data();
  std::vector<int32_t> ptr(B * (n_out + 1), -55), cursor(B * n_out, -66), order(B * N, -77);
  int32_t bad_total = 0, bad_sizes = 0;
  for (int64_t b = 0; b < B; ++b) {  // index kernel: warp b
    const int64_t row = b * N;
    int32_t* p = ptr.data() + b * (n_out + 1);
    int32_t* cur = cursor.data() + b * n_out;
    int32_t* ord = order.data() + row;
    for (int64_t o = 0; o <= n_out; ++o) p[o] = 0;
    auto slots_of_step = [&](int64_t base, int32_t* o32, int& bad) {
      for (int l = 0; l < kLanes; ++l) {
        const int64_t i = base + l;
        o32[l] = -1;
        if (i >= N) continue;
        if (!slot_valid(sl[row + i], n_out)) {
          ++bad;
          continue;
        }
        o32[l] = static_cast<int32_t>(sl[row + i]);
      }
    };
    int bad = 0, ignored = 0;
    for (int64_t base = 0; base < N; base += kLanes) {
      int32_t o[kLanes];
      uint32_t peers[kLanes];
      slots_of_step(base, o, bad);
      for (int l = 0; l < kLanes; ++l) bad_sizes += base + l < N && !size_valid(sz[row + base + l]);
      match_any_host(o, peers);
      for (int l = 0; l < kLanes; ++l)
        if (o[l] >= 0 && l == peer_leader(peers[l])) p[o[l] + 1] += popcount32(peers[l]);
    }
    int32_t carry = 0;
    for (int64_t o0 = 0; o0 < n_out; o0 += kLanes) {
      int32_t v[kLanes], incl[kLanes];
      for (int l = 0; l < kLanes; ++l) incl[l] = v[l] = o0 + l < n_out ? p[o0 + l + 1] : 0;
      for (int off = 1; off < kLanes; off <<= 1) {  // __shfl_up_sync Hillis-Steele scan
        int32_t up[kLanes];
        for (int l = 0; l < kLanes; ++l) up[l] = l >= off ? incl[l - off] : incl[l];
        for (int l = 0; l < kLanes; ++l)
          if (l >= off) incl[l] += up[l];
      }
      for (int l = 0; l < kLanes; ++l)
        if (o0 + l < n_out) {
          p[o0 + l + 1] = carry + incl[l];
          cur[o0 + l] = carry + incl[l] - v[l];
        }
      carry += incl[kLanes - 1];
    }
    for (int64_t base = 0; base < N; base += kLanes) {
      int32_t o[kLanes], pos[kLanes];
      uint32_t peers[kLanes];
      slots_of_step(base, o, ignored);
      match_any_host(o, peers);
      for (int l = 0; l < kLanes; ++l) pos[l] = o[l] >= 0 ? cur[o[l]] + peer_rank(peers[l], l) : -1;
      for (int l = 0; l < kLanes; ++l)
        if (o[l] >= 0) {
          if (pos[l] < 0 || pos[l] >= N) throw std::runtime_error("merge index replay: position out of range");
          ord[pos[l]] = static_cast<int32_t>(base + l);
        }
      for (int l = 0; l < kLanes; ++l)
        if (o[l] >= 0 && l == peer_leader(peers[l])) cur[o[l]] += popcount32(peers[l]);
    }
    bad_total += bad;
  }
  py::array_t<float> out({B, n_out, D}), out_sizes({B, n_out});
  float* od = out.mutable_data();
  float* os = out_sizes.mutable_data();
  for (int64_t orow = 0; orow < B * n_out; ++orow) {  // gather kernel: warp orow
    const int64_t b = orow / n_out, o = orow % n_out;
    const int32_t* p = ptr.data() + b * (n_out + 1);
    const int32_t* ord = order.data() + b * N;
    const float* szb = sz + b * N;
    const int32_t beg = p[o], end = p[o + 1], count = end - beg;
    float slot_size = 0.0f;
    for (int32_t k = beg; k < end; ++k) slot_size += szb[ord[k]];
    os[orow] = slot_size;
    const float* xb = xd + b * N * D;
    float* orw = od + orow * D;
    for (int64_t d = 0; d < D; ++d) orw[d] = std::numeric_limits<float>::quiet_NaN();  // must all be written
    for (int64_t ch = 0; ch < merge_chunks(D, vec); ++ch)
      for (int l = 0; l < kLanes; ++l) {
        const int64_t c = merge_col(ch, l, vec);
        if (c >= D) continue;
        float acc[8] = {};
        for (int32_t k = beg; k < end; ++k) {
          const int32_t i = ord[k];
          const float w = merge_weight(szb[i], slot_size, count);
          for (int e = 0; e < vec; ++e) acc[e] = dot_step(w, xb[i * D + c + e], acc[e]);
        }
        for (int e = 0; e < vec; ++e) orw[c + e] = acc[e];
      }
  }
  py::array_t<int32_t> ptr_a({B, n_out + 1}), order_a({B, N});
  std::copy(ptr.begin(), ptr.end(), ptr_a.mutable_data());
  std::copy(order.begin(), order.end(), order_a.mutable_data());
  return py::make_tuple(out, out_sizes, py::make_tuple(bad_total, bad_sizes), ptr_a, order_a);
}

inline void add(py::module_& m) {
  m.def("_test_tome_cuda_constants", [] {
    return py::dict(py::arg("warp") = kWarpSize, py::arg("prep_threads") = kPrepThreads,
                    py::arg("match_threads") = kMatchThreads, py::arg("group") = kGroup, py::arg("micro") = kMicro,
                    py::arg("tile_s") = kTileS, py::arg("tile_d") = kTileD, py::arg("chunk_c") = kChunkC,
                    py::arg("smem_stride") = kSmemStride, py::arg("rank_threads") = kRankThreads,
                    py::arg("rank_chunk") = kRankChunk, py::arg("slot_threads") = kSlotThreads,
                    py::arg("merge_warps") = kMergeWarps, py::arg("max_tokens") = kMaxTokens);
  });
  // [threads, micro, micro, 2]: (source tile row, destination tile row) of accumulator (k1, k2) of thread t.
  m.def("_test_tome_cuda_tile_pairs", [] {
    py::array_t<int32_t> a({kMatchThreads, kMicro, kMicro, 2});
    for (int t = 0; t < kMatchThreads; ++t)
      for (int k1 = 0; k1 < kMicro; ++k1)
        for (int k2 = 0; k2 < kMicro; ++k2) {
          a.mutable_at(t, k1, k2, 0) = match_src_of(match_ty(t), k1);
          a.mutable_at(t, k1, k2, 1) = match_dst_of(match_tx(t), k2);
        }
    return a;
  });
  // [kTileS * kChunkC, 3]: staged element e -> (tile row, chunk column, smem index).
  m.def("_test_tome_cuda_stage_map", [] {
    py::array_t<int32_t> a({kTileS * kChunkC, 3});
    for (int e = 0; e < kTileS * kChunkC; ++e) {
      a.mutable_at(e, 0) = stage_row(e);
      a.mutable_at(e, 1) = stage_col(e);
      a.mutable_at(e, 2) = smem_index(stage_row(e), stage_col(e));
    }
    return a;
  });
  m.def("_test_tome_cuda_best_combine", [](float v1, int32_t j1, float v2, int32_t j2) {
    const Best b = best_combine({v1, j1}, {v2, j2});
    return std::make_tuple(b.v, b.j);
  });
  m.def("_test_tome_cuda_best_init", [] {
    const Best b = best_init();
    return std::make_tuple(b.v, b.j);
  });
  // Sequential argmax with best_update over (cosine, index) candidates in the given order.
  m.def("_test_tome_cuda_best_scan", [](const std::vector<float>& v, const std::vector<int32_t>& j) {
    if (v.size() != j.size()) throw py::value_error("v and j differ in length");
    Best b = best_init();
    for (size_t k = 0; k < v.size(); ++k) best_update(b, v[k], j[k]);
    return std::make_tuple(b.v, b.j);
  });
  m.def("_test_tome_cuda_finish_source", [](float size, float v, int32_t j, int32_t fallback) {
    const SourceResult r = finish_source(size, {v, j}, fallback);
    return std::make_tuple(r.dst, r.score);
  });
  m.def("_test_tome_cuda_fallback", &fallback_destination);
  m.def("_test_tome_cuda_row_feasible", &row_feasible);
  m.def("_test_tome_cuda_keeps", [](int8_t role, bool selected, int64_t r) { return keeps(role, selected, r); });
  m.def("_test_tome_cuda_warp_sum", [](const std::vector<float>& v) {
    if (v.size() != kLanes) throw py::value_error("32 lane values");
    return warp_sum_host(v.data());
  });
  m.def("_test_tome_cuda_lane_prefix", &lane_prefix);
  m.def("_test_tome_cuda_peer", [](uint32_t peers, int lane) {
    if (peers == 0 || lane < 0 || lane > 31 || !((peers >> lane) & 1u)) throw py::value_error("lane must be a peer");
    return std::make_tuple(peer_rank(peers, lane), peer_leader(peers));
  });
  m.def("_test_tome_cuda_merge_vec", &merge_vec);
  m.def("_test_tome_cuda_merge_cols", [](int64_t D, int vec) {  // the columns each (chunk, lane) covers
    std::vector<std::tuple<int64_t, int, int64_t>> cols;
    for (int64_t ch = 0; ch < merge_chunks(D, vec); ++ch)
      for (int l = 0; l < kLanes; ++l) {
        const int64_t c = merge_col(ch, l, vec);
        if (c < D) cols.emplace_back(ch, l, c);
      }
    return cols;
  });
  m.def("_test_tome_cuda_match_workspace", [](int64_t B, int64_t N) {
    const MatchWorkspace w = match_workspace(B, N);
    return py::dict(py::arg("inv_norm") = w.inv_norm, py::arg("src_list") = w.src_list,
                    py::arg("dst_list") = w.dst_list, py::arg("row_info") = w.row_info,
                    py::arg("selected") = w.selected, py::arg("survivor") = w.survivor, py::arg("bytes") = w.bytes);
  });
  m.def("_test_tome_cuda_merge_workspace", [](int64_t B, int64_t N, int64_t n_out) {
    const MergeWorkspace w = merge_workspace(B, N, n_out);
    return py::dict(py::arg("ptr") = w.ptr, py::arg("cursor") = w.cursor, py::arg("order") = w.order,
                    py::arg("bytes") = w.bytes);
  });
  m.def("_test_tome_cuda_emulate_match", &emulate_match, py::arg("metric"), py::arg("sizes"), py::arg("roles"),
        py::arg("r"),
        "(slot int64, dst int64, score float32, (infeasible rows, bad roles, bad sizes)) as the CUDA tome_match kernels\n"
        "compute them, replayed on the host (metric as fp32 values: fp16/bf16 inputs converted exactly).");
  m.def("_test_tome_cuda_emulate_merge", &emulate_merge, py::arg("x"), py::arg("sizes"), py::arg("slot"),
        py::arg("n_out"), py::arg("vec"),
        "(acc float32 [B, n_out, D] before the store's rounding, out_sizes, (bad slots, bad sizes), ptr, order) as the CUDA\n"
        "tome_merge kernels compute them, replayed on the host; vec = the gather's elements per load.");
}

}  // namespace test_hooks
}  // namespace cuda
}  // namespace tome
}  // namespace slimformer
