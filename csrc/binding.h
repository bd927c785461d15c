// Shared by the CPU and CUDA bindings: input validation and conversion of tensor lists
// into the raw pointers of the torch-free core. One place for every error message.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "secant_core.h"

namespace pathgeom {

// The K gradient lists, params and refs as raw memory, one entry per tensor position.
struct Prepared {
  int64_t T = 0;                       // tensors per list
  int64_t K = 0;                       // gradient lists
  std::vector<const void*> g;          // [T][K]: g[t * K + k]
  std::vector<const void*> x, r;       // [T]
  std::vector<int64_t> numel;          // [T]
  std::vector<DType> g_dt, x_dt, r_dt; // [T]
  std::vector<at::Tensor> keepalive;   // contiguous copies of non-dense inputs
  at::Device device = at::kCPU;
};

// Validates the inputs and converts them. `grads` holds K lists of T tensors back to back
// (grads[k * T + i]). Raises ValueError / TypeError naming the offending index.
Prepared prepare_inputs(const char* op, at::TensorList grads, at::TensorList params,
                        at::TensorList refs, int64_t K);

// Output layout shared by the backends: [T or 1][K][3] float64 -> the op's shape.
at::Tensor shape_output(const at::Tensor& rows, int64_t K, bool per_tensor, bool multi);

}  // namespace pathgeom
