// Launch plan of the CUDA backend: torch-free and CUDA-free, so that it is compiled into
// every build (CPU-only included) and unit-tested on CPU through pathgeom_fast._C.plan_cuda.
//
// Layout it produces (what the kernels and the tests rely on):
//  * Tensors are grouped by an integer key (the dtype combination: one kernel specialisation
//    each); groups in increasing key order, tensors of a group in increasing position.
//  * Each group is cut, at tensor boundaries, into launches of at most `max_tensors` tensors
//    and at most `max_ptrs` pointers (tensors x (widest pass + 2)), and at most `max_blocks`
//    blocks (the CUDA grid limit). The tables live in device memory (cuda_table_fill below),
//    so the default caps on tensors and pointers do not bind: one launch per dtype combination
//    and pass. A tensor is never split across launches.
//  * Each launch is run once per pass: the K gradient lists are read in passes of at most
//    `max_grads_per_pass` lists (k0, kcount), every pass re-reading x and x*.
//  * Block b of a launch reduces chunk b - chunk_start[j] of its tensor j, the largest j with
//    chunk_start[j] <= b (empty tensors own no chunk), elements [q * chunk, min((q+1) * chunk,
//    numel)) with q that chunk number, and writes partial row chunk_offset + b, columns
//    3 k .. 3 k + 2 for the pass's k. Launches take consecutive row ranges, in plan order, so
//    the rows of one launch (and of one tensor) are contiguous.
//  * Per-tensor results: one finalisation per launch sums rows chunk_offset + chunk_start[j]
//    .. chunk_offset + chunk_start[j+1] into output row tensors[j] (an empty tensor: 0).
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

#include "secant_core.h"

namespace pathgeom {

struct CudaPlanLimits {
  int64_t max_tensors = kCudaMaxTensors;
  int64_t max_ptrs = kCudaMaxPtrs;
  int64_t max_grads_per_pass = kCudaMaxGradsPerPass;
  int64_t chunk = kCudaChunk;
  int64_t max_blocks = 0x7fffffff;  // CUDA grid x limit
};

struct CudaPlanLaunch {
  int32_t key = 0;                   // group key of its tensors
  int64_t chunk_offset = 0;          // partial row of its block 0
  std::vector<int64_t> tensors;      // positions in the caller's list
  std::vector<int64_t> chunk_start;  // [ntensors + 1] local chunk prefix sums, chunk_start[0] = 0
};

struct CudaPlan {
  int64_t total_chunks = 0;                      // partial rows (width 3 K)
  std::vector<std::pair<int64_t, int64_t>> passes;  // (k0, kcount), the same for every launch
  std::vector<CudaPlanLaunch> launches;
};

// Plans T tensors of numel[t] elements (>= 0, any size) with group keys key[t], for K >= 1
// gradient lists. Throws std::invalid_argument on bad arguments.
CudaPlan plan_cuda(const int64_t* numel, const int32_t* key, int64_t T, int64_t K,
                   const CudaPlanLimits& limits = CudaPlanLimits());

// The device table of one call: every launch's tables in one int64 buffer, built on the host
// (in pinned memory) and copied to the GPU once per call. Launch l's tables start at word
// base[l]:
//   chunk_start  [nt + 1]       the launch's chunk_start
//   numel        [nt]
//   tensor_index [nt]           position in the caller's list
//   block_tensor [nblocks]      j of block b (the kernel reads it instead of searching)
//   ptrs         [nt * (K + 2)] tensor j's K gradients, then x, then x*, as addresses
// Every pass of a launch reads the same tables (the pass picks gradients k0 .. k0 + kc - 1).
struct CudaTableLaunch {
  int64_t base = 0;      // first word
  int64_t ntensors = 0;
  int64_t nblocks = 0;   // chunk_start[ntensors]
  int64_t numel_at() const { return base + ntensors + 1; }
  int64_t tensor_index_at() const { return base + 2 * ntensors + 1; }
  int64_t block_tensor_at() const { return base + 3 * ntensors + 1; }
  int64_t ptrs_at() const { return block_tensor_at() + nblocks; }
};

// The word offsets of every launch of `plan` for K gradient lists; returns the table's size in
// words.
int64_t cuda_table_layout(const CudaPlan& plan, int64_t K, std::vector<CudaTableLaunch>& out);

// Writes the table (cuda_table_layout's size) into `words`: numel[t] and the addresses of
// tensor t's gradients g[t * K + k], x[t] and r[t].
void cuda_table_fill(const CudaPlan& plan, const std::vector<CudaTableLaunch>& layout, int64_t K,
                     const int64_t* numel, const void* const* g, const void* const* x,
                     const void* const* r, int64_t* words);

}  // namespace pathgeom
