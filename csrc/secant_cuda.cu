// CUDA kernels, multi-tensor-apply style: the tensor tables live in device memory (one buffer
// per call, plan.h), each block reduces one chunk of kCudaChunk elements to one fp64 partial
// row per gradient list, and a second small kernel sums the partials in a fixed order.
// Torch-free: nvcc compiles this file on its own.
#include "secant_core.h"

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace pathgeom {
namespace {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

constexpr int kVec = 8;  // elements per thread per step: one 16-byte load for 16-bit types
constexpr int kWarps = kCudaThreads / 32;
// The partials kernel comes in two widths: KCMAX = 1 (one gradient list: secant_stats, the
// usual call) and KCMAX = kCudaMaxGradsPerPass (secant_stats_multi's passes of up to 8 lists).
// Each is compiled for the blocks per SM its registers allow without spilling: fp32
// accumulators and KCMAX = 1, 4 blocks of 256 threads (<= 64 registers); KCMAX = 8 or fp64
// accumulators, 2 (<= 128: the 8 gradient addresses of a pass take 16 registers beside the 17
// accumulators). compile_check verifies that no instantiation spills.
template <typename Acc, int KCMAX>
constexpr int min_blocks() { return KCMAX == 1 && sizeof(Acc) == 4 ? 4 : 2; }

__device__ __forceinline__ float half_bits_to_float(uint32_t h) {
  float f;
  asm("{ .reg .f16 t; mov.b16 t, %1; cvt.f32.f16 %0, t; }" : "=f"(f) : "h"(static_cast<unsigned short>(h)));
  return f;
}
__device__ __forceinline__ float bf16_bits_to_float(uint32_t h) { return __uint_as_float(h << 16); }

// Streaming (evict-first) loads: every byte is read once.
template <typename Acc>
__device__ __forceinline__ void load_vec(const float* p, Acc* v) {
  const float4 a = __ldcs(reinterpret_cast<const float4*>(p));
  const float4 b = __ldcs(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
template <typename Acc>
__device__ __forceinline__ void load_vec(const double* p, Acc* v) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const double2 a = __ldcs(reinterpret_cast<const double2*>(p) + j);
    v[2 * j] = static_cast<Acc>(a.x);
    v[2 * j + 1] = static_cast<Acc>(a.y);
  }
}
template <typename Acc>
__device__ __forceinline__ void load_vec(const Half* p, Acc* v) {
  const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[2 * j] = half_bits_to_float(w[j] & 0xffffu);
    v[2 * j + 1] = half_bits_to_float(w[j] >> 16);
  }
}
template <typename Acc>
__device__ __forceinline__ void load_vec(const BFloat16* p, Acc* v) {
  const uint4 u = __ldcs(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    v[2 * j] = bf16_bits_to_float(w[j] & 0xffffu);
    v[2 * j + 1] = bf16_bits_to_float(w[j] >> 16);
  }
}

template <typename Acc>
__device__ __forceinline__ Acc load_one(const float* p, int64_t i) { return p[i]; }
template <typename Acc>
__device__ __forceinline__ Acc load_one(const double* p, int64_t i) { return static_cast<Acc>(p[i]); }
template <typename Acc>
__device__ __forceinline__ Acc load_one(const Half* p, int64_t i) { return half_bits_to_float(p[i].bits); }
template <typename Acc>
__device__ __forceinline__ Acc load_one(const BFloat16* p, int64_t i) { return bf16_bits_to_float(p[i].bits); }

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// Fixed-order block sum of one double per thread; the result is valid in thread 0.
__device__ __forceinline__ double block_sum(double v, double* smem) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < (blockDim.x >> 5) ? smem[lane] : 0.0;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

template <typename Acc, typename TG, typename TX, typename TR, int KCMAX>
__global__ void __launch_bounds__(kCudaThreads, min_blocks<Acc, KCMAX>())
partials_kernel(const __grid_constant__ CudaLaunch L, double* __restrict__ partials) {
  __shared__ double smem[kWarps];
  const int64_t chunk = blockIdx.x;
  const int64_t j = L.block_tensor[chunk];  // this chunk's tensor (the host wrote it)
  const int64_t n = L.numel[j];
  const int64_t begin = (chunk - L.chunk_start[j]) * kCudaChunk;
  const int64_t end = begin + kCudaChunk < n ? begin + kCudaChunk : n;
  const int kc = L.kcount;
  const int64_t* ptrs = L.ptrs + j * (L.K + 2);
  const TX* __restrict__ x = reinterpret_cast<const TX*>(ptrs[L.K]);
  const TR* __restrict__ r = reinterpret_cast<const TR*>(ptrs[L.K + 1]);
  // The pass's gradient addresses, in registers (indexed at compile time only, in the unrolled
  // loops below)
  const void* gp[KCMAX];
#pragma unroll
  for (int k = 0; k < KCMAX; ++k) {
    gp[k] = k < kc ? reinterpret_cast<const void*>(ptrs[L.k0 + k]) : nullptr;
  }
  const Acc wd = static_cast<Acc>(L.weight_decay);
  // Without weight decay h = g exactly: 0 * x would turn an Inf in x into a NaN in b.
  const bool with_wd = L.weight_decay != 0.0;

  Acc acc_a[KCMAX], acc_b[KCMAX], acc_c = 0;
#pragma unroll
  for (int k = 0; k < KCMAX; ++k) acc_a[k] = acc_b[k] = 0;

  bool vec_ok = aligned16(x) && aligned16(r);
#pragma unroll
  for (int k = 0; k < KCMAX; ++k) {
    if (k < kc) vec_ok = vec_ok && aligned16(gp[k]);
  }
  // begin is a multiple of kCudaChunk (a multiple of kVec), so aligned bases stay aligned.
  const int64_t vec_end = vec_ok ? begin + (end - begin) / kVec * kVec : begin;

  for (int64_t i = begin + static_cast<int64_t>(threadIdx.x) * kVec; i < vec_end;
       i += static_cast<int64_t>(kCudaThreads) * kVec) {
    Acc xv[kVec], rv[kVec], d[kVec];
    load_vec<Acc>(x + i, xv);
    load_vec<Acc>(r + i, rv);
#pragma unroll
    for (int e = 0; e < kVec; ++e) {
      d[e] = xv[e] - rv[e];
      acc_c += d[e] * d[e];
    }
#pragma unroll
    for (int k = 0; k < KCMAX; ++k) {
      if (k < kc) {
        Acc gv[kVec];
        load_vec<Acc>(static_cast<const TG*>(gp[k]) + i, gv);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const Acc h = with_wd ? gv[e] + wd * xv[e] : gv[e];
          acc_a[k] += h * d[e];
          acc_b[k] += h * h;
        }
      }
    }
  }
  // Scalar path: the tail of an aligned chunk, or all of a misaligned one.
  for (int64_t i = vec_end + threadIdx.x; i < end; i += kCudaThreads) {
    const Acc xi = load_one<Acc>(x, i);
    const Acc di = xi - load_one<Acc>(r, i);
    acc_c += di * di;
#pragma unroll
    for (int k = 0; k < KCMAX; ++k) {
      if (k < kc) {
        const Acc gi = load_one<Acc>(static_cast<const TG*>(gp[k]), i);
        const Acc h = with_wd ? gi + wd * xi : gi;
        acc_a[k] += h * di;
        acc_b[k] += h * h;
      }
    }
  }

  double* row = partials + (L.chunk_offset + chunk) * (3 * static_cast<int64_t>(L.K));
#pragma unroll
  for (int k = 0; k < KCMAX; ++k) {
    if (k < kc) {
      const double a = block_sum(static_cast<double>(acc_a[k]), smem);
      const double b = block_sum(static_cast<double>(acc_b[k]), smem);
      if (threadIdx.x == 0) {
        row[3 * (L.k0 + k)] = a;
        row[3 * (L.k0 + k) + 1] = b;
      }
    }
  }
  const double c = block_sum(static_cast<double>(acc_c), smem);
  if (threadIdx.x == 0) {
    for (int k = 0; k < kc; ++k) row[3 * (L.k0 + k) + 2] = c;
  }
}

// Each thread sums a strided subset of rows in order, then a fixed-order block sum.
__device__ void sum_rows(const double* __restrict__ partials, int64_t first, int64_t last,
                         int32_t width, double* __restrict__ out_row, double* smem) {
  for (int32_t w = 0; w < width; ++w) {
    double s = 0.0;
    for (int64_t c = first + threadIdx.x; c < last; c += blockDim.x) s += partials[c * width + w];
    s = block_sum(s, smem);
    if (threadIdx.x == 0) out_row[w] = s;
  }
}

__global__ void __launch_bounds__(kCudaThreads)
finalize_total_kernel(const double* __restrict__ partials, int64_t nchunks, int32_t width,
                      double* __restrict__ out) {
  __shared__ double smem[kWarps];
  sum_rows(partials, 0, nchunks, width, out, smem);
}

__global__ void __launch_bounds__(kCudaThreads)
finalize_per_tensor_kernel(const __grid_constant__ CudaLaunch L,
                           const double* __restrict__ partials, int32_t width,
                           double* __restrict__ out) {
  __shared__ double smem[kWarps];
  const int j = blockIdx.x;
  sum_rows(partials, L.chunk_offset + L.chunk_start[j], L.chunk_offset + L.chunk_start[j + 1],
           width, out + static_cast<int64_t>(L.tensor_index[j]) * width, smem);
}

template <typename T> struct Tag { using type = T; };

template <typename F>
void visit_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat16: f(Tag<Half>{}); break;
    case DType::kBFloat16: f(Tag<BFloat16>{}); break;
    case DType::kFloat32: f(Tag<float>{}); break;
    case DType::kFloat64: f(Tag<double>{}); break;
  }
}

}  // namespace

int cuda_launch_partials(DType g, DType x, DType r, const CudaLaunch& L, double* partials,
                         void* stream) {
  const int64_t nblocks = L.nblocks;
  if (nblocks == 0) return 0;
  auto s = static_cast<cudaStream_t>(stream);
  visit_dtype(g, [&](auto tg) {
    visit_dtype(x, [&](auto tx) {
      visit_dtype(r, [&](auto tr) {
        using TG = typename decltype(tg)::type;
        using TX = typename decltype(tx)::type;
        using TR = typename decltype(tr)::type;
        constexpr bool any64 = std::is_same<TG, double>::value ||
                               std::is_same<TX, double>::value || std::is_same<TR, double>::value;
        using Acc = typename std::conditional<any64, double, float>::type;
        if (L.kcount == 1) {
          partials_kernel<Acc, TG, TX, TR, 1>
              <<<static_cast<unsigned int>(nblocks), kCudaThreads, 0, s>>>(L, partials);
        } else {
          partials_kernel<Acc, TG, TX, TR, kCudaMaxGradsPerPass>
              <<<static_cast<unsigned int>(nblocks), kCudaThreads, 0, s>>>(L, partials);
        }
      });
    });
  });
  return static_cast<int>(cudaGetLastError());
}

int cuda_launch_finalize_total(const double* partials, int64_t nchunks, int32_t width,
                               double* out, void* stream) {
  finalize_total_kernel<<<1, kCudaThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      partials, nchunks, width, out);
  return static_cast<int>(cudaGetLastError());
}

int cuda_launch_finalize_per_tensor(const CudaLaunch& L, const double* partials, int32_t width,
                                    double* out, void* stream) {
  if (L.ntensors == 0) return 0;
  finalize_per_tensor_kernel<<<L.ntensors, kCudaThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      L, partials, width, out);
  return static_cast<int>(cudaGetLastError());
}

const char* cuda_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }

}  // namespace pathgeom
