// Torch-free kernel core of pathgeom_fast.
//
// Math (DESIGN.md section 1). For one tensor triple (g_k for k < K, x, r = x*) and
// the effective gradient  h_k = g_k + wd * x  (wd = weight decay, usually 0):
//
//     a_k = sum_i h_k[i] * (x[i] - r[i])     b_k = sum_i h_k[i]^2     c = sum_i (x[i] - r[i])^2
//
// Every kernel writes one partial row per (chunk, k): (a_k, b_k, c), in fp64, computed
// from fp32 products (fp64 when any input of the triple is fp64). Partials are combined in
// a fixed order, so results are bitwise reproducible: no atomics anywhere. The Gram kernel
// (cpu_gram_partials) follows the same rules for all pairwise inner products of K vectors
// and x - x*.
//
// Nothing here includes torch: the binding files (inputs.cpp, cpu_pass.cpp, ops_cuda.cpp, ...) convert tensors
// into these plain structs, so nvcc / g++ compile and check this code on their own.
#pragma once

#include <cstddef>
#include <cstdint>

namespace pathgeom {

enum class DType : int32_t { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

constexpr int kNumDTypes = 4;

// ---------------------------------------------------------------------------------------
// CPU
// ---------------------------------------------------------------------------------------

// One tensor position with its K gradients, as raw memory laid out in the same order
// for all of them (contiguous, or dense with identical strides).
struct CpuTriple {
  const void* const* g;  // K gradient pointers
  const void* x;
  const void* r;
  DType g_dtype, x_dtype, r_dtype;
};

// Elements per CPU chunk: a chunk is the unit of parallel work and of partial results.
constexpr int64_t kCpuChunk = 1 << 15;

// Scratch memory one call of a CPU kernel may use (the multi-list and Gram kernels keep tiles
// of x - x* there). The caller owns it, one 64-byte-aligned buffer per thread, so that the
// kernels keep no per-thread state of their own.
constexpr int64_t kCpuScratchBytes = 1 << 19;

// Accumulates elements [begin, end) of `t` and writes K rows (a_k, b_k, c) to out[3*K].
// Serial: the caller runs chunks in parallel.
void cpu_chunk_partials(const CpuTriple& t, int32_t K, int64_t begin, int64_t end,
                        double weight_decay, void* scratch, double* out);

// Gram matrix of the M = K + 1 vectors (t.g[0], ..., t.g[K-1], d = x - x*) over elements
// [begin, end): out[i * M + j] = sum of v_i * v_j, fp32 products (fp64 when an input is fp64)
// summed in fp64, row-major M x M; out[j * M + i] is a copy of out[i * M + j], so the matrix
// is exactly symmetric. 1 <= K <= kGramMaxVecs.
constexpr int32_t kGramMaxVecs = 8;
void cpu_gram_partials(const CpuTriple& t, int32_t K, int64_t begin, int64_t end, void* scratch,
                       double* out);

// The instruction set the CPU kernel runs with: "avx512", "avx2" or "baseline".
const char* cpu_isa();

// ---------------------------------------------------------------------------------------
// CUDA
// ---------------------------------------------------------------------------------------

// The tensor tables live in device memory (plan.h: one int64 buffer per call, copied once
// from pinned host memory), so a launch covers any number of tensors and the host work per
// call is one pass over the lists. The caps below only bound the grid (max_blocks) and the
// gradient lists a pass reads (registers); the tensor and pointer caps are kept as limits of
// the plan, large enough never to bind.
constexpr int64_t kCudaMaxTensors = 0x7fffffff;      // tensors per launch (int32 grid index)
constexpr int64_t kCudaMaxPtrs = int64_t(1) << 62;   // pointers per launch
constexpr int kCudaMaxGradsPerPass = 8;  // gradient lists read per pass over x and x*
constexpr int64_t kCudaChunk = 1 << 16;  // elements per block (multiple of 8)
constexpr int kCudaThreads = 256;

// One launch: device pointers into the call's table (plan.h, CudaTableLaunch).
struct CudaLaunch {
  const int64_t* chunk_start;   // [ntensors + 1] local chunk prefix sums, chunk_start[0] = 0
  const int64_t* numel;         // [ntensors]
  const int64_t* tensor_index;  // [ntensors] position of tensor j in the caller's list
  const int64_t* block_tensor;  // [nblocks] tensor j of block b
  const int64_t* ptrs;          // [ntensors][K + 2]: addresses of K gradients, x, x*
  int32_t ntensors;             // tensors in this launch
  int32_t K;                    // total gradient lists (row width of partials is 3*K)
  int32_t k0, kcount;           // this launch reads gradients k0 .. k0+kcount-1 (kcount <= 8)
  int64_t nblocks;              // chunk_start[ntensors]
  int64_t chunk_offset;         // global chunk index of this launch's first chunk
  double weight_decay;
};

// All return a cudaError_t as int (0 = success) so that this header stays CUDA-free.
// `stream` is a cudaStream_t.

// Writes partials[(chunk_offset + c) * 3K + 3k + {0,1,2}] for this launch's chunks and
// k in [k0, k0 + kcount). Grid: nblocks blocks.
int cuda_launch_partials(DType g, DType x, DType r, const CudaLaunch& launch,
                         double* partials, void* stream);

// out[w] = sum over all chunks of partials[c * width + w], in a fixed order.
int cuda_launch_finalize_total(const double* partials, int64_t nchunks, int32_t width,
                               double* out, void* stream);

// out[tensor_index[j] * width + w] = sum over tensor j's chunks, for the tensors of `launch`.
int cuda_launch_finalize_per_tensor(const CudaLaunch& launch, const double* partials,
                                    int32_t width, double* out, void* stream);

const char* cuda_error_string(int err);

}  // namespace pathgeom
