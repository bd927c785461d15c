// Torch binding of the CUDA kernels: groups tensors by dtype combination, fills the
// kernel-argument tables, launches on the current stream under a device guard, and checks
// every launch.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "binding.h"
#include "plan.h"

namespace pathgeom {
namespace {

void check_launch(int err, const char* what) {
  TORCH_CHECK(err == 0, "pathgeom: CUDA launch of ", what, " failed: ", cuda_error_string(err));
}

// The rows of inputs checked by prepare_inputs.
at::Tensor cuda_prepared_rows(const Prepared& p, int64_t K, bool per_tensor, double wd) {
  const int64_t T = p.T;
  const int32_t W = static_cast<int32_t>(3 * K);
  const c10::cuda::CUDAGuard guard(p.device);
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto dopts = at::TensorOptions().dtype(at::kDouble).device(p.device);

  // Group first, then launch: one kernel specialisation per dtype combination. The plan
  // (plan.h: launches within the argument-size caps, passes of <= 8 gradient lists, row
  // layout) is torch-free and unit-tested on CPU.
  std::vector<int32_t> keys(T);
  for (int64_t t = 0; t < T; ++t) {
    keys[t] = (static_cast<int32_t>(p.g_dt[t]) * kNumDTypes + static_cast<int32_t>(p.x_dt[t])) * kNumDTypes +
              static_cast<int32_t>(p.r_dt[t]);
  }
  const CudaPlan plan = plan_cuda(p.numel.data(), keys.data(), T, K);
  at::Tensor partials = at::empty({plan.total_chunks, W}, dopts);
  double* part = partials.data_ptr<double>();
  at::Tensor rows = at::empty({per_tensor ? T : 1, K, 3}, dopts);

  CudaLaunch L{};
  for (const CudaPlanLaunch& pl : plan.launches) {
    const DType gd = static_cast<DType>(pl.key / (kNumDTypes * kNumDTypes));
    const DType xd = static_cast<DType>(pl.key / kNumDTypes % kNumDTypes);
    const DType rd = static_cast<DType>(pl.key % kNumDTypes);
    const int64_t nt = static_cast<int64_t>(pl.tensors.size());
    L.ntensors = static_cast<int32_t>(nt);
    L.K = static_cast<int32_t>(K);
    L.chunk_offset = pl.chunk_offset;
    L.weight_decay = wd;
    for (int64_t j = 0; j < nt; ++j) {
      const int64_t t = pl.tensors[j];
      L.numel[j] = p.numel[t];
      L.tensor_index[j] = static_cast<int32_t>(t);
    }
    for (int64_t j = 0; j <= nt; ++j) L.chunk_start[j] = pl.chunk_start[j];
    for (const auto& pass : plan.passes) {
      L.k0 = static_cast<int32_t>(pass.first);
      L.kcount = static_cast<int32_t>(pass.second);
      for (int64_t j = 0; j < nt; ++j) {
        const int64_t t = pl.tensors[j];
        const void** row = L.ptrs + j * (L.kcount + 2);
        for (int32_t k = 0; k < L.kcount; ++k) row[k] = p.g[t * K + L.k0 + k];
        row[L.kcount] = p.x[t];
        row[L.kcount + 1] = p.r[t];
      }
      check_launch(cuda_launch_partials(gd, xd, rd, L, part, stream), "partials_kernel");
    }
    if (per_tensor) {  // every pass of this launch has written its rows (stream order)
      check_launch(cuda_launch_finalize_per_tensor(L, part, W, rows.data_ptr<double>(), stream),
                   "finalize_per_tensor_kernel");
    }
  }
  if (!per_tensor) {
    check_launch(cuda_launch_finalize_total(part, plan.total_chunks, W, rows.data_ptr<double>(), stream),
                 "finalize_total_kernel");
  }
  return rows;
}

at::Tensor cuda_rows(const char* op, const Inputs& in, int64_t K, bool per_tensor, double wd) {
  return cuda_prepared_rows(prepare_inputs(op, in, K), K, per_tensor, wd);
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
const bool kRegistered = (cuda_rows_fn = &cuda_rows, cuda_prepared_rows_fn = &cuda_prepared_rows, true);

}  // namespace

TORCH_LIBRARY_IMPL(pathgeom, CUDA, m) {
  m.impl("secant_stats", &secant_stats_cuda);
  m.impl("secant_stats_multi", &secant_stats_multi_cuda);
}

}  // namespace pathgeom
