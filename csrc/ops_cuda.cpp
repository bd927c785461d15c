// Torch binding of the CUDA kernels: groups tensors by dtype combination, fills the
// kernel-argument tables, launches on the current stream under a device guard, and checks
// every launch.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <array>
#include <map>

#include "binding.h"

namespace pathgeom {
namespace {

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "pathgeom: CUDA launch of ", what, " failed: ", cuda_error_string(err));
}

at::Tensor cuda_rows(const char* op, const Inputs& in, int64_t K, bool per_tensor, double wd) {
  Prepared p = prepare_inputs(op, in, K);
  const int64_t T = p.T;
  const int32_t W = static_cast<int32_t>(3 * K);
  const c10::cuda::CUDAGuard guard(p.device);
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto dopts = at::TensorOptions().dtype(at::kDouble).device(p.device);

  // Group first, then launch: one kernel specialisation per dtype combination.
  std::map<std::array<int, 3>, std::vector<int64_t>> groups;
  for (int64_t t = 0; t < T; ++t) {
    groups[{static_cast<int>(p.g_dt[t]), static_cast<int>(p.x_dt[t]), static_cast<int>(p.r_dt[t])}]
        .push_back(t);
  }
  auto nchunks_of = [](int64_t n) { return (n + kCudaChunk - 1) / kCudaChunk; };
  int64_t total_chunks = 0;
  for (int64_t t = 0; t < T; ++t) total_chunks += nchunks_of(p.numel[t]);
  at::Tensor partials = at::empty({total_chunks, W}, dopts);
  double* part = partials.data_ptr<double>();

  // Launches of the first pass, kept for the per-tensor finalisation (same chunk layout).
  std::vector<CudaLaunch> first_pass;
  const int32_t passes = static_cast<int32_t>((K + kCudaMaxGradsPerPass - 1) / kCudaMaxGradsPerPass);
  int64_t chunk_offset = 0;
  for (const auto& kv : groups) {
    const DType gd = static_cast<DType>(kv.first[0]);
    const DType xd = static_cast<DType>(kv.first[1]);
    const DType rd = static_cast<DType>(kv.first[2]);
    const std::vector<int64_t>& ts = kv.second;
    // Tensors per launch: bounded by the table sizes (pointers for the widest pass).
    const int64_t kc_max = std::min<int64_t>(K, kCudaMaxGradsPerPass);
    const int64_t per_launch = std::min<int64_t>(kCudaMaxTensors, kCudaMaxPtrs / (kc_max + 2));
    for (size_t s = 0; s < ts.size(); s += per_launch) {
      const size_t e = std::min(ts.size(), s + static_cast<size_t>(per_launch));
      CudaLaunch L{};
      L.ntensors = static_cast<int32_t>(e - s);
      L.K = static_cast<int32_t>(K);
      L.chunk_offset = chunk_offset;
      L.weight_decay = wd;
      L.chunk_start[0] = 0;
      for (size_t j = 0; j < e - s; ++j) {
        const int64_t t = ts[s + j];
        L.numel[j] = p.numel[t];
        L.tensor_index[j] = static_cast<int32_t>(t);
        L.chunk_start[j + 1] = L.chunk_start[j] + nchunks_of(p.numel[t]);
      }
      for (int32_t pass = 0; pass < passes; ++pass) {
        L.k0 = pass * kCudaMaxGradsPerPass;
        L.kcount = static_cast<int32_t>(std::min<int64_t>(kCudaMaxGradsPerPass, K - L.k0));
        for (size_t j = 0; j < e - s; ++j) {
          const int64_t t = ts[s + j];
          const void** row = L.ptrs + j * (L.kcount + 2);
          for (int32_t k = 0; k < L.kcount; ++k) row[k] = p.g[t * K + L.k0 + k];
          row[L.kcount] = p.x[t];
          row[L.kcount + 1] = p.r[t];
        }
        check_launch(cuda_launch_partials(gd, xd, rd, L, part, stream), "partials_kernel");
        if (pass == 0 && per_tensor) first_pass.push_back(L);
      }
      chunk_offset += L.chunk_start[L.ntensors];
    }
  }

  at::Tensor rows = at::empty({per_tensor ? T : 1, K, 3}, dopts);
  if (per_tensor) {
    for (const CudaLaunch& L : first_pass) {
      check_launch(cuda_launch_finalize_per_tensor(L, part, W, rows.data_ptr<double>(), stream),
                   "finalize_per_tensor_kernel");
    }
  } else {
    check_launch(cuda_launch_finalize_total(part, total_chunks, W, rows.data_ptr<double>(), stream),
                 "finalize_total_kernel");
  }
  return rows;
}

at::Tensor secant_stats_cuda(at::TensorList grads, at::TensorList params, at::TensorList refs,
                             bool per_tensor, double weight_decay) {
  return shape_output(
      cuda_rows("secant_stats", inputs_of(grads, params, refs), 1, per_tensor, weight_decay), 1,
      per_tensor, false);
}

at::Tensor secant_stats_multi_cuda(at::TensorList grads, at::TensorList params,
                                   at::TensorList refs, int64_t num_grads, bool per_tensor,
                                   double weight_decay) {
  return shape_output(
      cuda_rows("secant_stats_multi", inputs_of(grads, params, refs), num_grads, per_tensor,
                weight_decay),
      num_grads, per_tensor, true);
}

// Makes the CUDA rows reachable from the direct (dispatcher-free) entry point in ops.cpp.
const bool kRegistered = (cuda_rows_fn = &cuda_rows, true);

}  // namespace

TORCH_LIBRARY_IMPL(pathgeom, CUDA, m) {
  m.impl("secant_stats", &secant_stats_cuda);
  m.impl("secant_stats_multi", &secant_stats_multi_cuda);
}

}  // namespace pathgeom
