// Index and bit math of the CUDA GPTQ kernels, as __host__ __device__ functions that compile
// without CUDA or torch, so that the CPU tests (tests/test_gptq_cuda_math.py, through the
// slimformer._C._test_cuda_* hooks) check exactly what the GPU runs (GUIDE.md section 5b).
//
// Geometry shared by both kernels: a thread owns kVec = 4 consecutive output columns, so one
// 128-bit load brings one qweight word for each of its columns. A unit (gptq_format.h) is the run
// of words_per_unit(bits) qweight rows that holds values_per_unit(bits) consecutive k of a column;
// K is always a whole number of units because check_weights() demands (K * bits) % 32 == 0.
//
// Small-batch kernel (gemv): a block of kGemvWarps warps covers kBlockCols = 32 * kVec columns and
// up to `rows` rows of x (blockIdx.z picks the row tile). The K units are cut into
// splits * kGemvWarps slices: blockIdx.y picks the split, the warp its slice within it. Warps
// reduce through shared memory; blocks of different splits add into an fp32 workspace.
#pragma once
#include <stdint.h>

#include "common/cuda_warp.h"
#include "gptq/gptq_format.h"

// `#pragma unroll` for nvcc only (g++ -Wall warns about unknown pragmas).
#if defined(__CUDACC__)
#define SF_UNROLL _Pragma("unroll")
#else
#define SF_UNROLL
#endif

namespace slimformer {
namespace gptq {
namespace cuda {

constexpr int kVec = 4;                       // columns per thread (one 128-bit qweight load)
constexpr int kBlockCols = kWarpSize * kVec;  // columns per gemv block
constexpr int kGemvWarps = 4;                 // K slices per gemv block
constexpr int kGemvThreads = kGemvWarps * kWarpSize;
constexpr int kGemvMinBlocksPerSm = 3;  // __launch_bounds__: 12 warps per SM at the least
constexpr int kDequantThreads = kWarpSize * 4;  // dequant block: 512 columns of one unit
constexpr int kMaxGemvRows = 16;  // the adapter's small-batch limit
constexpr int kMaxRowTile = 8;    // rows of x per gemv block (8 x 4 fp32 accumulators a thread)
constexpr int64_t kMaxGridY = 65535;
// Split-K targets: enough blocks for every SM to hold several (latency hiding), but every warp
// keeps at least kMinKPerWarp values of k, so that the reduction stays small next to the work.
constexpr int kTargetBlocksPerSm = 4;
constexpr int kMinKPerWarp = 64;
// 2^23 as float bits: OR-ing an integer below 2^23 into the mantissa yields 2^23 + q exactly.
constexpr uint32_t kMagicBits = 0x4B000000u;
constexpr float kMagic = 8388608.0f;

// Half-open range [begin, end).
struct Range {
  int64_t begin, end;
};

// Part i of `parts` balanced parts of [0, total): sizes differ by at most one, parts in order,
// together exactly [0, total). Empty when parts > total and i is past the last non-empty part.
SF_HD Range split_range(int64_t total, int64_t parts, int64_t i) {
  const int64_t base = total / parts, extra = total % parts;
  const int64_t begin = i * base + (i < extra ? i : extra);
  return {begin, begin + base + (i < extra ? 1 : 0)};
}

SF_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// An index read from device memory, forced into [0, n): the CUDA adapter cannot validate g_idx or
// perm without a device sync, so a bad value reads a wrong but in-bounds element instead of
// faulting (QuantLinear validates them on load).
SF_HD int64_t clamp_index(int64_t v, int64_t n) { return v < 0 ? 0 : (v >= n ? n - 1 : v); }

// Number of units along K (whole, see above).
SF_HD int64_t units_of(int64_t K, int bits) { return K / values_per_unit(bits); }

// qweight row holding word `w` (0 <= w < words_per_unit) of unit `u`; k of its value `j`.
SF_HD int64_t unit_word_row(int64_t u, int bits, int w) { return u * words_per_unit(bits) + w; }
SF_HD int64_t unit_value_k(int64_t u, int bits, int j) { return u * values_per_unit(bits) + j; }

// A 128-bit load of 4 qweight words needs 16-byte alignment of every row's first column, which
// holds for all rows only when N % 4 == 0 and the base pointer is 16-byte aligned. Otherwise the
// kernels load the 4 words one by one.
SF_HD bool vector_loads_ok(int64_t N, uintptr_t qweight_address) {
  return N % kVec == 0 && qweight_address % 16 == 0;
}

// Column `col` (0 <= col < kBlockCols) of gemv column block `block`, and the first of the kVec
// columns of thread `lane` there. Lane l's accumulators are reduction columns l*kVec + c.
SF_HD int64_t gemv_column(int64_t block, int col) { return block * kBlockCols + col; }
SF_HD int64_t gemv_first_column(int64_t block, int lane) { return gemv_column(block, lane * kVec); }

// Dequantize kernel: thread `thread` of block `block` (blockIdx.x) owns kVec columns from here.
SF_HD int64_t dequant_first_column(int64_t block, int thread) {
  return (block * kDequantThreads + thread) * kVec;
}
SF_HD int64_t dequant_grid_x(int64_t N) { return ceil_div(N, static_cast<int64_t>(kDequantThreads) * kVec); }

// Float 2^23 + q, exactly, for 0 <= q < 2^23 (one integer OR instead of an int-to-float convert,
// which has a quarter of the FMA throughput).
SF_HD float magic_float(uint32_t q) {
  union {
    uint32_t u;
    float f;
  } cvt{q | kMagicBits};
  return cvt.f;
}

// The zero point (stored zero + zero_offset) shifted by the same 2^23 as magic_float.
SF_HD float magic_zero(float zero_point) { return zero_point + kMagic; }

// scales * (q - zero): both operands of the subtraction are integers in [2^23, 2^24), so the
// difference is exact and the result is the single rounding of s * (q - z), bit-identical to the
// CPU kernels' dequantization.
SF_HD float dequant_magic(uint32_t q, float zero_magic, float scale) {
  return (magic_float(q) - zero_magic) * scale;
}

// Rows of x per gemv block for M rows (at most kMaxRowTile; larger M uses several row tiles).
SF_HD int gemv_row_tile(int64_t M) { return M <= 1 ? 1 : (M <= 2 ? 2 : (M <= 4 ? 4 : kMaxRowTile)); }

struct GemvPlan {
  int rows;            // row tile (template parameter of the kernel): 1, 2, 4 or 8
  int64_t row_tiles;   // gridDim.z
  int64_t col_blocks;  // gridDim.x
  int64_t splits;      // gridDim.y: K split across blocks (> 1 needs the fp32 workspace)
};

SF_HD GemvPlan plan_gemv(int64_t M, int64_t N, int64_t K, int bits, int sm_count) {
  GemvPlan p;
  p.rows = gemv_row_tile(M);
  p.row_tiles = ceil_div(M, p.rows);
  p.col_blocks = ceil_div(N, kBlockCols);
  const int64_t blocks = p.col_blocks * p.row_tiles;
  const int64_t want = ceil_div(static_cast<int64_t>(sm_count) * kTargetBlocksPerSm, blocks);
  const int64_t min_units = ceil_div(kMinKPerWarp, values_per_unit(bits));
  const int64_t most = units_of(K, bits) / (kGemvWarps * min_units);
  int64_t s = want < most ? want : most;
  s = s < kMaxGridY ? s : kMaxGridY;
  p.splits = s < 1 ? 1 : s;
  return p;
}

// The K units of one warp: slice (split, warp) of splits * kGemvWarps.
SF_HD Range gemv_warp_units(int64_t units, int64_t splits, int64_t split, int warp) {
  return split_range(units, splits * kGemvWarps, split * kGemvWarps + warp);
}

// Entry e of a block's shared-memory reduction [rows][kBlockCols]: its row and column in the
// block. Consecutive threads take consecutive columns (conflict-free reads, coalesced stores).
SF_HD int reduce_row(int e) { return e / kBlockCols; }
SF_HD int reduce_col(int e) { return e % kBlockCols; }

// gridDim.y of the dequantize kernel: one unit row per block, grid-strided past the limit.
SF_HD int64_t dequant_grid_y(int64_t units) { return units < kMaxGridY ? units : kMaxGridY; }

}  // namespace cuda
}  // namespace gptq
}  // namespace slimformer
