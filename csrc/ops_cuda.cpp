// Torch binding of the CUDA kernels: the call's tensor tables copied to the device once,
// launches on the current stream under a device guard, every launch checked.
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

// The rows of inputs checked by prepare_inputs / cpu_check.
//
// Host work: the plan and one table (cuda_host_table, shared with the CPU-measurable
// _C.cuda_host_work), written into pinned memory and copied to the device with one
// asynchronous copy on the current stream; then one partials launch per dtype combination and
// pass (one for the usual call), and one finalisation launch. No synchronisation. Under CUDA
// graph capture, torch's pinned-memory allocator keeps a block allocated during capture out of
// reuse, so the graph's copy node reads the same table at every replay.
at::Tensor cuda_prepared_rows(const Prepared& p, int64_t K, bool per_tensor, double wd) {
  const int64_t T = p.T;
  const int32_t W = static_cast<int32_t>(3 * K);
  const c10::cuda::CUDAGuard guard(p.device);
  void* stream = c10::cuda::getCurrentCUDAStream().stream();
  const auto dopts = at::TensorOptions().dtype(at::kDouble).device(p.device);

  const CudaHostTable table = cuda_host_table(p, K);
  const CudaPlan& plan = table.plan;
  at::Tensor rows = at::empty({per_tensor ? T : 1, K, 3}, dopts);
  if (table.words == 0) return rows.zero_();  // no tensors
  at::Tensor host = at::empty({table.words}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  cuda_host_fill(p, table, host.data_ptr<int64_t>());
  at::Tensor words = at::empty({table.words}, at::TensorOptions().dtype(at::kLong).device(p.device));
  words.copy_(host, /*non_blocking=*/true);
  const int64_t* dev = words.const_data_ptr<int64_t>();
  at::Tensor partials = at::empty({plan.total_chunks, W}, dopts);
  double* part = partials.data_ptr<double>();

  for (size_t l = 0; l < plan.launches.size(); ++l) {
    const CudaPlanLaunch& pl = plan.launches[l];
    const CudaTableLaunch& tl = table.layout[l];
    const DType gd = static_cast<DType>(pl.key / (kNumDTypes * kNumDTypes));
    const DType xd = static_cast<DType>(pl.key / kNumDTypes % kNumDTypes);
    const DType rd = static_cast<DType>(pl.key % kNumDTypes);
    CudaLaunch L{};
    L.chunk_start = dev + tl.base;
    L.numel = dev + tl.numel_at();
    L.tensor_index = dev + tl.tensor_index_at();
    L.block_tensor = dev + tl.block_tensor_at();
    L.ptrs = dev + tl.ptrs_at();
    L.ntensors = static_cast<int32_t>(tl.ntensors);
    L.K = static_cast<int32_t>(K);
    L.nblocks = tl.nblocks;
    L.chunk_offset = pl.chunk_offset;
    L.weight_decay = wd;
    for (const auto& pass : plan.passes) {
      L.k0 = static_cast<int32_t>(pass.first);
      L.kcount = static_cast<int32_t>(pass.second);
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

// Makes the CUDA rows reachable from the direct (dispatcher-free) entry point in python_entry.cpp.
const bool kRegistered = (cuda_rows_fn = &cuda_rows, cuda_prepared_rows_fn = &cuda_prepared_rows, true);

}  // namespace

TORCH_LIBRARY_IMPL(pathgeom, CUDA, m) {
  m.impl("secant_stats", &secant_stats_cuda);
  m.impl("secant_stats_multi", &secant_stats_multi_cuda);
}

}  // namespace pathgeom
