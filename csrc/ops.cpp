// Torch binding: op schemas, input checks, and the CPU implementation.
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <sstream>

#include "binding.h"

namespace pathgeom {
namespace {

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << "shape " << t.sizes() << ", " << dtype_name(t.scalar_type()) << ", " << t.device();
  return s.str();
}

bool to_dtype(at::ScalarType t, DType* out) {
  switch (t) {
    case at::kHalf: *out = DType::kFloat16; return true;
    case at::kBFloat16: *out = DType::kBFloat16; return true;
    case at::kFloat: *out = DType::kFloat32; return true;
    case at::kDouble: *out = DType::kFloat64; return true;
    default: return false;
  }
}

// Name of grads entry j: "grads[i]" for one list, "grads[k][i]" for K lists.
std::string grad_name(int64_t j, int64_t T, int64_t K) {
  std::ostringstream s;
  if (K == 1) s << "grads[" << j << "]";
  else s << "grads[" << j / T << "][" << j % T << "]";
  return s.str();
}

}  // namespace

Prepared prepare_inputs(const char* op, at::TensorList grads, at::TensorList params,
                        at::TensorList refs, int64_t K) {
  TORCH_CHECK_VALUE(K >= 1, op, ": num_grads must be >= 1, got ", K);
  const int64_t T = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(static_cast<int64_t>(refs.size()) == T &&
                        static_cast<int64_t>(grads.size()) == K * T,
                    op, ": the lists must have matching lengths, got ", grads.size(),
                    " grads", (K > 1 ? " (expected num_grads * len(params) = " +
                                           std::to_string(K * T) + ")" : std::string()),
                    ", ", params.size(), " params and ", refs.size(), " refs");
  Prepared p;
  p.T = T;
  p.K = K;
  p.g.resize(T * K);
  p.x.resize(T);
  p.r.resize(T);
  p.numel.resize(T);
  p.g_dt.resize(T);
  p.x_dt.resize(T);
  p.r_dt.resize(T);
  if (T == 0) return p;
  p.device = params[0].device();

  auto check_one = [&](const at::Tensor& t, const std::string& name) {
    TORCH_CHECK_VALUE(t.defined(), op, ": ", name, " is an undefined tensor (None)");
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", name, " has layout ", t.layout(),
                      "; only dense (strided) tensors are supported");
    DType dt;
    TORCH_CHECK_TYPE(to_dtype(t.scalar_type(), &dt), op, ": ", name, " has ", describe(t),
                     "; expected float16, bfloat16, float32 or float64");
    TORCH_CHECK_VALUE(t.device() == p.device, op, ": ", name, " is on ", t.device(),
                      " but params[0] is on ", p.device, "; all tensors must be on one device");
    return dt;
  };

  std::vector<const at::Tensor*> members;
  members.reserve(K + 2);
  for (int64_t i = 0; i < T; ++i) {
    const at::Tensor& x = params[i];
    const at::Tensor& r = refs[i];
    const std::string xname = "params[" + std::to_string(i) + "]";
    p.x_dt[i] = check_one(x, xname);
    p.r_dt[i] = check_one(r, "refs[" + std::to_string(i) + "]");
    const int64_t n = x.numel();
    TORCH_CHECK_VALUE(r.numel() == n, op, ": index ", i, ": refs[", i, "] has ", describe(r),
                      " (", r.numel(), " elements) but params[", i, "] has ", describe(x), " (",
                      n, " elements); numel must match");
    for (int64_t k = 0; k < K; ++k) {
      const int64_t j = k * T + i;
      const at::Tensor& g = grads[j];
      const std::string gname = grad_name(j, T, K);
      const DType gdt = check_one(g, gname);
      TORCH_CHECK_VALUE(g.numel() == n, op, ": index ", i, ": ", gname, " has ", describe(g),
                        " (", g.numel(), " elements) but params[", i, "] has ", describe(x),
                        " (", n, " elements); numel must match");
      if (k == 0) {
        p.g_dt[i] = gdt;
      } else {
        TORCH_CHECK_TYPE(gdt == p.g_dt[i], op, ": index ", i, ": ", gname, " has ",
                         describe(g), " but ", grad_name(i, T, K), " has ",
                         describe(grads[i]), "; the K gradients of one tensor must share a dtype");
      }
    }
    p.numel[i] = n;

    // Element i of every member must sit at the same position in memory order. That holds
    // when all are contiguous, or all are dense with the same sizes and strides (a sum does
    // not care about the order). Otherwise the non-contiguous ones are copied: that copy,
    // of this one tensor, is the only extra memory proportional to the input.
    members.clear();
    for (int64_t k = 0; k < K; ++k) members.push_back(&grads[k * T + i]);
    members.push_back(&x);
    members.push_back(&r);
    bool all_contig = true;
    for (auto* t : members) all_contig = all_contig && t->is_contiguous();
    bool same_dense = !all_contig;
    if (same_dense) {
      for (auto* t : members) {
        same_dense = same_dense && t->is_non_overlapping_and_dense() &&
                     t->sizes() == x.sizes() && t->strides() == x.strides();
      }
    }
    auto ptr_of = [&](const at::Tensor& t) -> const void* {
      if (n == 0) return nullptr;
      if (all_contig || same_dense || t.is_contiguous()) return t.data_ptr();
      p.keepalive.push_back(t.contiguous());
      return p.keepalive.back().data_ptr();
    };
    for (int64_t k = 0; k < K; ++k) p.g[i * K + k] = ptr_of(grads[k * T + i]);
    p.x[i] = ptr_of(x);
    p.r[i] = ptr_of(r);
  }
  return p;
}

at::Tensor shape_output(const at::Tensor& rows, int64_t K, bool per_tensor, bool multi) {
  // rows: [T or 1][K][3]
  if (per_tensor) return multi ? rows.permute({1, 0, 2}).contiguous() : rows.select(1, 0);
  return multi ? rows.select(0, 0) : rows.select(0, 0).select(0, 0);
}

namespace {

// [T or 1][K][3] rows on the CPU.
at::Tensor cpu_rows(const char* op, at::TensorList grads, at::TensorList params,
                    at::TensorList refs, int64_t K, bool per_tensor, double wd) {
  Prepared p = prepare_inputs(op, grads, params, refs, K);
  const int64_t T = p.T, W = 3 * K;
  // Chunks never straddle tensors; consecutive chunks are then grouped into tasks of about
  // kCpuChunk elements so that many small tensors make few, balanced parallel tasks.
  std::vector<int64_t> chunk_tensor, chunk_begin, chunk_end;
  std::vector<int64_t> tensor_first_chunk(T + 1, 0);
  for (int64_t t = 0; t < T; ++t) {
    tensor_first_chunk[t] = static_cast<int64_t>(chunk_tensor.size());
    for (int64_t b = 0; b < p.numel[t]; b += kCpuChunk) {
      chunk_tensor.push_back(t);
      chunk_begin.push_back(b);
      chunk_end.push_back(std::min(b + kCpuChunk, p.numel[t]));
    }
  }
  const int64_t nchunks = static_cast<int64_t>(chunk_tensor.size());
  tensor_first_chunk[T] = nchunks;
  std::vector<int64_t> task_first{0};
  int64_t acc = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    acc += chunk_end[c] - chunk_begin[c];
    if (acc >= kCpuChunk) {
      task_first.push_back(c + 1);
      acc = 0;
    }
  }
  if (task_first.back() != nchunks) task_first.push_back(nchunks);
  const int64_t ntasks = static_cast<int64_t>(task_first.size()) - 1;

  std::vector<double> partials(static_cast<size_t>(nchunks * W));
  at::parallel_for(0, ntasks, 1, [&](int64_t tb, int64_t te) {
    std::vector<const void*> gptr(K);
    for (int64_t task = tb; task < te; ++task) {
      for (int64_t c = task_first[task]; c < task_first[task + 1]; ++c) {
        const int64_t t = chunk_tensor[c];
        for (int64_t k = 0; k < K; ++k) gptr[k] = p.g[t * K + k];
        const CpuTriple triple{gptr.data(), p.x[t], p.r[t], p.g_dt[t], p.x_dt[t], p.r_dt[t]};
        cpu_chunk_partials(triple, static_cast<int32_t>(K), chunk_begin[c], chunk_end[c], wd,
                           partials.data() + c * W);
      }
    }
  });

  // Fixed-order combine in fp64.
  at::Tensor rows = at::zeros({per_tensor ? T : 1, K, 3}, at::dtype(at::kDouble));
  double* out = rows.data_ptr<double>();
  for (int64_t t = 0; t < T; ++t) {
    double* row = out + (per_tensor ? t * W : 0);
    for (int64_t c = tensor_first_chunk[t]; c < tensor_first_chunk[t + 1]; ++c) {
      for (int64_t w = 0; w < W; ++w) row[w] += partials[c * W + w];
    }
  }
  return rows;
}

at::Tensor secant_stats_cpu(at::TensorList grads, at::TensorList params, at::TensorList refs,
                            bool per_tensor, double weight_decay) {
  return shape_output(cpu_rows("secant_stats", grads, params, refs, 1, per_tensor, weight_decay),
                      1, per_tensor, false);
}

at::Tensor secant_stats_multi_cpu(at::TensorList grads, at::TensorList params,
                                  at::TensorList refs, int64_t num_grads, bool per_tensor,
                                  double weight_decay) {
  return shape_output(
      cpu_rows("secant_stats_multi", grads, params, refs, num_grads, per_tensor, weight_decay),
      num_grads, per_tensor, true);
}

}  // namespace

TORCH_LIBRARY(pathgeom, m) {
  m.def(
      "secant_stats(Tensor[] grads, Tensor[] params, Tensor[] refs, bool per_tensor=False, "
      "float weight_decay=0.0) -> Tensor");
  m.def(
      "secant_stats_multi(Tensor[] grads, Tensor[] params, Tensor[] refs, int num_grads, "
      "bool per_tensor=False, float weight_decay=0.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(pathgeom, CPU, m) {
  m.impl("secant_stats", &secant_stats_cpu);
  m.impl("secant_stats_multi", &secant_stats_multi_cpu);
}

}  // namespace pathgeom

// `import pathgeom_fast._C` loads the library, whose static initialisers register the ops.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
