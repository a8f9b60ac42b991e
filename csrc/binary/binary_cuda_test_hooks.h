// slimformer._C._test_binary_cuda_* : the CUDA binary kernels' bit and index math
// (binary_cuda_math.h) and host replays of the kernels, block by block, warp by warp and lane by
// lane with the same per-thread functions, for tests/test_binary_cuda_math.py. Barriers become loop
// boundaries, the shuffle an addition of the two lanes, the ballot pack_word, the atomics additions
// in split order. Compiled into every build (CPU-only too): nothing here needs CUDA or torch.
// Included by module.cpp only.
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <tuple>
#include <vector>

#include "binary/binary_cuda_math.h"
#include "common/numpy_arrays.h"

namespace slimformer {
namespace binary {
namespace cuda {
namespace test_hooks {

namespace py = pybind11;

struct HostWeights {
  const uint32_t* qw;
  const float* alpha;
  const float* bias;
  int64_t N, K, words;
};

inline HostWeights host_weights(const I32Array& qweight, const F32Array& alpha, const std::optional<F32Array>& bias,
                                int64_t K) {
  if (K <= 0 || alpha.ndim() != 1) throw py::value_error("need in_features > 0 and a 1-D alpha");
  const int64_t N = alpha.shape(0);
  if (qweight.ndim() != 3 || qweight.shape(0) != row_tiles(N) || qweight.shape(1) != words_per_row(K) ||
      qweight.shape(2) != kTileRows)
    throw py::value_error("qweight must be [ceil(N/16), ceil(K/32), 16]");
  if (bias && (bias->ndim() != 1 || bias->shape(0) != N)) throw py::value_error("bias must be [N]");
  return {reinterpret_cast<const uint32_t*>(qweight.data()), alpha.data(), bias ? bias->data() : nullptr, N, K,
          words_per_row(K)};
}

inline void check_x(const F32Array& x, int64_t K) {
  if (x.ndim() != 2 || x.shape(1) != K || x.shape(0) < 1) throw py::value_error("x must be [M >= 1, K]");
}

// One gemv block (tile, split, token block) of the launch with `splits` splits.
template <int TM>
void gemv_block(const HostWeights& w, const float* x, int64_t M, int64_t tile, int64_t splits, int64_t split,
                int64_t tb, float* y, float* ws) {
  const int64_t m0 = tb * TM;
  const Range wr = split_range(w.words, splits, split);
  std::vector<F4> stage(TM * kXTokenStride / 4);
  float* xs = reinterpret_cast<float*>(stage.data());
  float acc[kGemvThreads][TM] = {};
  for (int64_t c0 = wr.begin; c0 < wr.end; c0 += kChunkWords) {
    for (int e = 0; e < TM * kChunkInputs; ++e) {
      const int64_t src = stage_source(e, m0, c0, M, w.K);
      xs[x_smem_index(stage_token(e), stage_input(e))] = src >= 0 ? x[src] : 0.0f;
    }
    for (int t = 0; t < kGemvThreads; ++t) {
      const int warp = t / kWarpSize, lane = t % kWarpSize;
      const int64_t row = tile * kTileRows + lane_row(lane);
      for (int s = 0; s < kGemvSteps; ++s) {
        const int64_t wi = c0 + gemv_local_word(warp, s, lane);
        if (wi < wr.end) accumulate_word<TM>(xs, gemv_local_word(warp, s, lane), w.qw[word_index(row, wi, w.words)], acc[t]);
      }
    }
  }
  float red[kGemvWarps][TM][kTileRows];
  for (int warp = 0; warp < kGemvWarps; ++warp)
    for (int m = 0; m < TM; ++m)
      for (int r = 0; r < kTileRows; ++r)
        red[warp][m][r] = acc[warp * kWarpSize + r][m] + acc[warp * kWarpSize + r + kTileRows][m];
  for (int e = 0; e < TM * kTileRows; ++e) {
    const int64_t m = m0 + reduce_token(e), n = tile * kTileRows + reduce_row(e);
    if (m >= M || n >= w.N) continue;
    float s = red[0][reduce_token(e)][reduce_row(e)];
    for (int j = 1; j < kGemvWarps; ++j) s += red[j][reduce_token(e)][reduce_row(e)];
    if (ws != nullptr) {
      ws[m * w.N + n] += s;
    } else {
      y[m * w.N + n] = gemv_epilogue(s, w.alpha[n], w.bias ? w.bias[n] : 0.0f);
    }
  }
}

inline F32Array emulate_gemv(const I32Array& qweight, const F32Array& alpha, const std::optional<F32Array>& bias,
                             const F32Array& x, int64_t in_features, int sm_count, std::optional<int64_t> splits) {
  const HostWeights w = host_weights(qweight, alpha, bias, in_features);
  check_x(x, w.K);
  if (sm_count < 1 || (splits && (*splits < 1 || *splits > kMaxGridYZ))) throw py::value_error("bad sm_count or splits");
  const int64_t M = x.shape(0);
  GemvPlan plan = plan_gemv(M, w.N, w.K, sm_count);
  if (splits) plan.splits = *splits;  // any split count is valid; the plan only picks a fast one
  F32Array y({M, w.N});
  std::vector<float> ws(plan.splits > 1 ? M * w.N : 0, 0.0f);
  float* wsp = plan.splits > 1 ? ws.data() : nullptr;
  for (int64_t tb = 0; tb < plan.token_blocks; ++tb)
    for (int64_t split = 0; split < plan.splits; ++split)
      for (int64_t tile = 0; tile < plan.row_tiles; ++tile) {
        switch (plan.tm) {
          case 1: gemv_block<1>(w, x.data(), M, tile, plan.splits, split, tb, y.mutable_data(), wsp); break;
          case 2: gemv_block<2>(w, x.data(), M, tile, plan.splits, split, tb, y.mutable_data(), wsp); break;
          case 4: gemv_block<4>(w, x.data(), M, tile, plan.splits, split, tb, y.mutable_data(), wsp); break;
          default: gemv_block<kMaxTokenTile>(w, x.data(), M, tile, plan.splits, split, tb, y.mutable_data(), wsp);
        }
      }
  if (wsp != nullptr) {  // finish_kernel
    float* yp = y.mutable_data();
    for (int64_t i = 0; i < M * w.N; ++i) {
      const int64_t n = i % w.N;
      yp[i] = gemv_epilogue(ws[i], w.alpha[n], w.bias ? w.bias[n] : 0.0f);
    }
  }
  return y;
}

// pack_kernel: abits [M, words] (uint32 bits in an int32 array).
inline std::vector<uint32_t> pack_host(const float* x, int64_t M, int64_t K, float shift) {
  const int64_t words = words_per_row(K);
  std::vector<uint32_t> abits(M * words);
  for (int64_t g = 0; g < M * words; ++g) {
    const int64_t m = pack_token(g, words), wi = pack_word_of(g, words);
    abits[g] = pack_word(x + m * K + wi * kWordBits, pack_valid(wi, K), shift);
  }
  return abits;
}

inline py::array_t<uint32_t> emulate_pack(const F32Array& x, float shift) {
  if (x.ndim() != 2 || x.shape(1) < 1) throw py::value_error("x must be [M, K >= 1]");
  const int64_t M = x.shape(0), K = x.shape(1);
  const std::vector<uint32_t> a = pack_host(x.data(), M, K, shift);
  py::array_t<uint32_t> out({M, words_per_row(K)});
  std::copy(a.begin(), a.end(), out.mutable_data());
  return out;
}

inline F32Array emulate_gemm_a1(const I32Array& qweight, const F32Array& alpha, const std::optional<F32Array>& bias,
                                const F32Array& x, float scale, float shift, int64_t in_features) {
  const HostWeights w = host_weights(qweight, alpha, bias, in_features);
  check_x(x, w.K);
  const int64_t M = x.shape(0), tiles = row_tiles(w.N);
  const std::vector<uint32_t> abits = pack_host(x.data(), M, w.K, shift);
  F32Array y({M, w.N});
  float* yp = y.mutable_data();
  std::vector<U4> wstage(kA1ChunkWords * kA1Rows / 4);
  uint32_t* wsm = reinterpret_cast<uint32_t*>(wstage.data());
  std::vector<uint32_t> as(kA1Tokens * kAWordStride);
  for (int64_t group = 0; group < a1_row_groups(w.N); ++group)
    for (int64_t tt = 0; tt < a1_token_tiles(M); ++tt) {
      const int64_t m0 = tt * kA1Tokens;
      int pc[kA1Threads][4][4] = {}, rpc[kA1Threads][4] = {};
      for (int64_t c0 = 0; c0 < w.words; c0 += kA1ChunkWords) {
        for (int e = 0; e < kA1TileGroup * kA1ChunkWords * kTileRows; ++e) {
          const int64_t src = a1_weight_source(e, group, c0, tiles, w.words);
          wsm[a1_weight_slot(e)] = src >= 0 ? w.qw[src] : 0u;
        }
        for (int e = 0; e < kA1Tokens * kA1ChunkWords; ++e) {
          const int64_t src = a1_act_source(e, m0, c0, M, w.words);
          as[a1_act_slot(e)] = src >= 0 ? abits[src] : 0u;
        }
        for (int t = 0; t < kA1Threads; ++t)
          for (int wl = 0; wl < kA1ChunkWords; ++wl) a1_step(as.data(), wsm, wl, a1_tx(t), a1_ty(t), pc[t], rpc[t]);
      }
      for (int t = 0; t < kA1Threads; ++t)
        for (int j = 0; j < 4; ++j)
          for (int i = 0; i < 4; ++i) {
            const int64_t m = m0 + a1_ty(t) * kA1ThreadTokens + j, n = group * kA1Rows + a1_tx(t) * kA1ThreadRows + i;
            if (m < M && n < w.N)
              yp[m * w.N + n] = a1_epilogue(static_cast<int>(w.K), pc[t][j][i], rpc[t][i], w.alpha[n], scale, shift,
                                            w.bias ? w.bias[n] : 0.0f);
          }
    }
  return y;
}

inline F32Array emulate_unpack(const I32Array& qweight, int64_t N, int64_t K) {
  if (N < 1 || K < 1 || qweight.ndim() != 3 || qweight.shape(0) != row_tiles(N) || qweight.shape(1) != words_per_row(K) ||
      qweight.shape(2) != kTileRows)
    throw py::value_error("qweight must be [ceil(N/16), ceil(K/32), 16]");
  const uint32_t* qw = reinterpret_cast<const uint32_t*>(qweight.data());
  F32Array out({N, K});
  float* o = out.mutable_data();
  for (int64_t i = 0; i < N * K; ++i) {
    const int64_t n = i / K, k = i % K;
    o[i] = sign_of_bit(qw[word_index(n, k / kWordBits, words_per_row(K))], static_cast<int>(k % kWordBits));
  }
  return out;
}

inline void add(py::module_& m) {
  m.def("_test_binary_cuda_sign_mask", &sign_mask);
  m.def("_test_binary_cuda_signed_input", &signed_input);
  m.def("_test_binary_cuda_sign_of_bit", &sign_of_bit);
  m.def("_test_binary_cuda_act_bit", &act_bit);
  m.def("_test_binary_cuda_pack_word", [](const F32Array& x, int n_valid, float shift) {
    if (x.ndim() != 1 || n_valid < 0 || n_valid > kWordBits || x.shape(0) < n_valid)
      throw py::value_error("x must be 1-D with at least n_valid <= 32 entries");
    return pack_word(x.data(), n_valid, shift);
  });
  m.def("_test_binary_cuda_pack_valid", &pack_valid);
  m.def("_test_binary_cuda_x_smem_index", &x_smem_index);
  m.def("_test_binary_cuda_stage_source", &stage_source);
  m.def("_test_binary_cuda_gemv_local_word", &gemv_local_word);
  m.def("_test_binary_cuda_lane_row_half", [](int lane) { return std::make_tuple(lane_row(lane), lane_half(lane)); });
  m.def("_test_binary_cuda_split_range", [](int64_t total, int64_t parts, int64_t i) {
    if (total < 0 || parts < 1 || i < 0 || i >= parts) throw py::value_error("need total >= 0, 0 <= i < parts");
    const Range r = split_range(total, parts, i);
    return std::make_tuple(r.begin, r.end);
  });
  m.def("_test_binary_cuda_plan_gemv", [](int64_t M, int64_t N, int64_t K, int sm_count) {
    if (M < 1 || N < 1 || K < 1 || sm_count < 1) throw py::value_error("bad plan inputs");
    const GemvPlan p = plan_gemv(M, N, K, sm_count);
    return std::make_tuple(p.tm, p.token_blocks, p.row_tiles, p.splits);
  });
  m.def("_test_binary_cuda_a1_weight_source", &a1_weight_source);
  m.def("_test_binary_cuda_a1_weight_slot", &a1_weight_slot);
  m.def("_test_binary_cuda_a1_act_source", &a1_act_source);
  m.def("_test_binary_cuda_a1_act_slot", &a1_act_slot);
  m.def("_test_binary_cuda_a1_thread", [](int t) { return std::make_tuple(a1_tx(t), a1_ty(t)); });
  m.def("_test_binary_cuda_gemv_epilogue", &gemv_epilogue);
  m.def("_test_binary_cuda_a1_epilogue", &a1_epilogue);
  m.def("_test_binary_cuda_constants", [] {
    return py::dict(py::arg("gemv_threads") = kGemvThreads, py::arg("gemv_warps") = kGemvWarps,
                    py::arg("chunk_words") = kChunkWords, py::arg("x_word_stride") = kXWordStride,
                    py::arg("x_token_stride") = kXTokenStride, py::arg("gemv_steps") = kGemvSteps,
                    py::arg("max_token_tile") = kMaxTokenTile, py::arg("max_gemv_tokens") = kMaxGemvTokens,
                    py::arg("target_blocks_per_sm") = kTargetBlocksPerSm, py::arg("a1_threads") = kA1Threads,
                    py::arg("a1_tokens") = kA1Tokens, py::arg("a1_rows") = kA1Rows,
                    py::arg("a1_chunk_words") = kA1ChunkWords, py::arg("a_word_stride") = kAWordStride,
                    py::arg("a1_tile_group") = kA1TileGroup);
  });
  m.def("_test_binary_cuda_emulate_gemv", &emulate_gemv, py::arg("qweight"), py::arg("alpha"), py::arg("bias"),
        py::arg("x"), py::arg("in_features"), py::arg("sm_count"), py::arg("splits") = py::none(),
        "y [M, N] fp32 as the CUDA W1A-fp gemv computes it with plan_gemv(..., sm_count) (or `splits`\n"
        "splits of K), replayed block by block, warp by warp and lane by lane on the host.");
  m.def("_test_binary_cuda_emulate_pack", &emulate_pack, py::arg("x"), py::arg("shift"),
        "The activation words [M, ceil(K/32)] (uint32) as the CUDA pack kernel writes them.");
  m.def("_test_binary_cuda_emulate_gemm_a1", &emulate_gemm_a1, py::arg("qweight"), py::arg("alpha"), py::arg("bias"),
        py::arg("x"), py::arg("scale"), py::arg("shift"), py::arg("in_features"),
        "y [M, N] fp32 as the CUDA W1A1 kernels compute it (pack, then the popcount GEMM), replayed on the host.");
  m.def("_test_binary_cuda_emulate_unpack", &emulate_unpack, py::arg("qweight"), py::arg("N"), py::arg("K"),
        "S [N, K] fp32 (+-1) as the CUDA unpack kernel writes it.");
}

}  // namespace test_hooks
}  // namespace cuda
}  // namespace binary
}  // namespace slimformer
