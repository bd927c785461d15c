// The torch ops: schemas (TORCH_LIBRARY, once) and their CPU implementations. The CUDA
// implementations are registered by ops_cuda.cpp when built.
#include <torch/library.h>

#include "binding.h"

namespace pathgeom {

namespace {

at::Tensor secant_stats_cpu(at::TensorList grads, at::TensorList params, at::TensorList refs,
                            bool per_tensor, double weight_decay) {
  return shape_output(
      cpu_rows("secant_stats", inputs_of(grads, params, refs), 1, per_tensor, weight_decay), 1,
      per_tensor, false);
}

at::Tensor secant_stats_multi_cpu(at::TensorList grads, at::TensorList params,
                                  at::TensorList refs, int64_t num_grads, bool per_tensor,
                                  double weight_decay) {
  return shape_output(
      cpu_rows("secant_stats_multi", inputs_of(grads, params, refs), num_grads, per_tensor,
               weight_decay),
      num_grads, per_tensor, true);
}

void gram_kernel(const CpuTriple& t, int32_t K, int64_t begin, int64_t end, double /*wd*/,
                 void* scratch, double* out) {
  cpu_gram_partials(t, K, begin, end, scratch, out);
}

}  // namespace

// [K + 1, K + 1] or [T, K + 1, K + 1]. No CUDA kernel: CUDA tensors go to the Triton kernel
// (pathgeom_fast.triton_gram) from Python.
void check_num_vecs(int64_t num_vecs) {
  TORCH_CHECK_VALUE(num_vecs >= 1 && num_vecs <= kGramMaxVecs,
                    "secant_gram: num_vecs must be between 1 and ", kGramMaxVecs, ", got ", num_vecs);
}

CpuKernel gram_kernel_of(int64_t num_vecs) { return CpuKernel{(num_vecs + 1) * (num_vecs + 1), &gram_kernel, 0.0}; }

at::Tensor gram_shape(const at::Tensor& rows, int64_t num_vecs, bool per_tensor) {
  const int64_t M = num_vecs + 1;
  return per_tensor ? rows.view({-1, M, M}) : rows.view({M, M});
}

namespace {


at::Tensor gram_cpu(const Inputs& in, int64_t num_vecs, bool per_tensor) {
  check_num_vecs(num_vecs);
  return gram_shape(cpu_kernel_rows("secant_gram", in, num_vecs, kVecNames, per_tensor, gram_kernel_of(num_vecs)),
                    num_vecs, per_tensor);
}

at::Tensor secant_gram_cpu(at::TensorList vecs, at::TensorList params, at::TensorList refs,
                           int64_t num_vecs, bool per_tensor) {
  return gram_cpu(inputs_of(vecs, params, refs), num_vecs, per_tensor);
}

}  // namespace

TORCH_LIBRARY(pathgeom, m) {
  m.def(
      "secant_stats(Tensor[] grads, Tensor[] params, Tensor[] refs, bool per_tensor=False, "
      "float weight_decay=0.0) -> Tensor");
  m.def(
      "secant_stats_multi(Tensor[] grads, Tensor[] params, Tensor[] refs, int num_grads, "
      "bool per_tensor=False, float weight_decay=0.0) -> Tensor");
  m.def(
      "secant_gram(Tensor[] vecs, Tensor[] params, Tensor[] refs, int num_vecs, "
      "bool per_tensor=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(pathgeom, CPU, m) {
  m.impl("secant_stats", &secant_stats_cpu);
  m.impl("secant_stats_multi", &secant_stats_multi_cpu);
  m.impl("secant_gram", &secant_gram_cpu);
}

}  // namespace pathgeom
