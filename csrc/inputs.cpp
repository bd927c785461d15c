// Input checks and preparation shared by every backend: the tensor lists as raw pointers
// (prepare_inputs), their error messages, the CUDA host table and the output shapes.
#include <sstream>

#include "binding.h"
#include "metadata.h"

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

std::string layout_name(at::Layout l) {
  switch (l) {
    case at::kStrided: return "torch.strided";
    case at::kSparse: return "torch.sparse_coo";
    case at::kSparseCsr: return "torch.sparse_csr";
    case at::kSparseCsc: return "torch.sparse_csc";
    case at::kSparseBsr: return "torch.sparse_bsr";
    case at::kSparseBsc: return "torch.sparse_bsc";
    case at::kJagged: return "torch.jagged";
    default: {
      std::ostringstream s;
      s << l;
      return s.str();
    }
  }
}

}  // namespace

std::string describe(const at::Tensor& t) {
  std::ostringstream s;
  s << "shape " << t.sizes() << ", " << dtype_name(t.scalar_type()) << ", " << t.device();
  return s.str();
}

// Name of entry j of the K vector lists: "grads[i]" for one list, "grads[k][i]" for K lists.
std::string grad_name(int64_t j, int64_t T, int64_t K, const ListNames& names) {
  std::ostringstream s;
  if (K == 1 || T <= 0) s << names.list << "[" << j << "]";
  else s << names.list << "[" << j / T << "][" << j % T << "]";
  return s.str();
}

void check_lengths(const char* op, int64_t ng, int64_t nx, int64_t nr, int64_t K, const ListNames& names) {
  TORCH_CHECK_VALUE(K >= 1, op, ": ", names.count, " must be >= 1, got ", K);
  TORCH_CHECK_VALUE(K <= std::numeric_limits<int32_t>::max() / 3, op, ": ", names.count, " must be at most ",
                    std::numeric_limits<int32_t>::max() / 3, ", got ", K);
  // ng == K * nx without forming K * nx (K comes from the caller and may be huge)
  const bool ok = nr == nx && (nx == 0 ? ng == 0 : ng % nx == 0 && ng / nx == K);
  if (ok) return;
  std::string expected;
  if (K > 1) {
    expected = std::string(" (expected ") + names.count + " * len(params) = ";
    if (nx == 0 || K <= std::numeric_limits<int64_t>::max() / nx) expected += std::to_string(K * nx);
    else expected += std::to_string(K) + " * " + std::to_string(nx);
    expected += ")";
  }
  TORCH_CHECK_VALUE(false, op, ": the lists must have matching lengths, got ", ng, " ", names.list, expected,
                    ", ", nx, " params and ", nr, " refs");
}

void Inputs::own() {
  owned.clear();
  owned.reserve(grads.size() + params.size() + refs.size());
  for (auto* list : {&grads, &params, &refs}) {
    for (const at::Tensor*& t : *list) {
      owned.push_back(*t);
      t = &owned.back();  // reserved above: no reallocation moves it
    }
  }
}

Inputs inputs_of(at::TensorList grads, at::TensorList params, at::TensorList refs) {
  Inputs in;
  for (const auto& t : grads) in.grads.push_back(&t);
  for (const auto& t : params) in.params.push_back(&t);
  for (const auto& t : refs) in.refs.push_back(&t);
  for (const auto& t : grads) in.grad_impls.push_back(t.unsafeGetTensorImpl());
  for (const auto& t : params) in.param_impls.push_back(t.unsafeGetTensorImpl());
  for (const auto& t : refs) in.ref_impls.push_back(t.unsafeGetTensorImpl());
  return in;
}

RowsFn cuda_rows_fn = nullptr;
PreparedRowsFn cuda_prepared_rows_fn = nullptr;

Prepared prepare_inputs(const char* op, const Inputs& in, int64_t K, const ListNames& names) {
  const auto& grads = in.grads;
  const auto& params = in.params;
  const auto& refs = in.refs;
  const int64_t T = static_cast<int64_t>(params.size());
  check_lengths(op, static_cast<int64_t>(grads.size()), T, static_cast<int64_t>(refs.size()), K, names);
  Prepared p;
  p.resize(T, K);
  if (T == 0) return p;
  p.device = params[0]->device();

  // Names are built only inside failing checks (the message arguments of TORCH_CHECK_* are
  // evaluated only on failure): this loop runs once per tensor on every call.
  enum Which { kGrad, kParam, kRef };
  auto name = [&](Which w, int64_t j) -> std::string {
    if (w == kGrad) return grad_name(j, T, K, names);
    return std::string(w == kParam ? "params[" : "refs[") + std::to_string(j) + "]";
  };
  auto check_one = [&](const at::Tensor& t, Which w, int64_t j) {
    TORCH_CHECK_VALUE(t.defined(), op, ": ", name(w, j), " is an undefined tensor (None)");
    TORCH_CHECK_TYPE(!t.is_nested(), op, ": ", name(w, j), " is a nested tensor; pass its components");
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", name(w, j), " has layout ", layout_name(t.layout()),
                      "; only dense (strided) tensors are supported");
    DType dt;
    TORCH_CHECK_TYPE(to_dtype(t.scalar_type(), &dt), op, ": ", name(w, j), " has ", describe(t),
                     "; expected float16, bfloat16, float32 or float64");
    TORCH_CHECK_VALUE(t.device() == p.device, op, ": ", name(w, j), " is on ", t.device(),
                      " but params[0] is on ", p.device, "; all tensors must be on one device");
    return dt;
  };

  for (int64_t i = 0; i < std::min(T, kAheadImpl); ++i) for_each_impl(in, T, K, i, prefetch_impl);

  std::vector<const at::Tensor*> members;
  members.reserve(K + 2);
  for (int64_t i = 0; i < T; ++i) {
    prefetch_position(in, T, T, K, i);
    const at::Tensor& x = *params[i];
    const at::Tensor& r = *refs[i];
    p.x_dt[i] = check_one(x, kParam, i);
    p.r_dt[i] = check_one(r, kRef, i);
    const int64_t n = x.numel();
    TORCH_CHECK_VALUE(r.numel() == n, op, ": index ", i, ": refs[", i, "] has ", describe(r),
                      " (", r.numel(), " elements) but params[", i, "] has ", describe(x), " (",
                      n, " elements); numel must match");
    for (int64_t k = 0; k < K; ++k) {
      const int64_t j = k * T + i;
      const at::Tensor& g = *grads[j];
      const DType gdt = check_one(g, kGrad, j);
      TORCH_CHECK_VALUE(g.numel() == n, op, ": index ", i, ": ", name(kGrad, j), " has ", describe(g),
                        " (", g.numel(), " elements) but params[", i, "] has ", describe(x),
                        " (", n, " elements); numel must match");
      if (k == 0) {
        p.g_dt[i] = gdt;
      } else {
        TORCH_CHECK_TYPE(gdt == p.g_dt[i], op, ": index ", i, ": ", name(kGrad, j), " has ",
                         describe(g), " but ", grad_name(i, T, K, names), " has ",
                         describe(*grads[i]), "; the K ", names.noun,
                         " of one tensor must share a dtype");
      }
    }
    p.numel[i] = n;

    // Element i of every member must sit at the same position in memory order. That holds
    // when all are contiguous, or all are dense with the same sizes and strides (a sum does
    // not care about the order). Otherwise the non-contiguous ones are copied: that copy,
    // of this one tensor, is the only extra memory proportional to the input.
    members.clear();
    for (int64_t k = 0; k < K; ++k) members.push_back(grads[k * T + i]);
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
    // const_data_ptr: reading never materialises a copy-on-write storage.
    // A tensor with no memory of its own (a wrapper subclass, a functorch wrapper) cannot be
    // read here: its data access throws or gives a null pointer, reported as a TypeError.
    auto data_of = [&](const at::Tensor& t, Which w, int64_t j) -> const void* {
      const void* ptr = nullptr;
      std::string why = "no data pointer";
      try {
        ptr = t.const_data_ptr();
      } catch (const c10::Error& e) {
        why = e.what_without_backtrace();
      }
      TORCH_CHECK_TYPE(ptr != nullptr, op, ": ", name(w, j), " (", describe(t),
                       ") has no memory this kernel can read (", why, "); pass plain tensors");
      return ptr;
    };
    auto ptr_of = [&](const at::Tensor& t, Which w, int64_t j) -> const void* {
      if (n == 0) return nullptr;
      if (all_contig || same_dense || t.is_contiguous()) return data_of(t, w, j);
      at::Tensor c = t.contiguous();
      const void* ptr = data_of(c, w, j);
      p.keepalive.push_back(std::move(c));
      return ptr;
    };
    for (int64_t k = 0; k < K; ++k) p.g[i * K + k] = ptr_of(*grads[k * T + i], kGrad, k * T + i);
    p.x[i] = ptr_of(x, kParam, i);
    p.r[i] = ptr_of(r, kRef, i);
  }
  return p;
}

CudaHostTable cuda_host_table(const Prepared& p, int64_t K) {
  const int64_t T = p.T;
  std::vector<int32_t> keys(T);  // one kernel specialisation per dtype combination
  for (int64_t t = 0; t < T; ++t) {
    keys[t] = (static_cast<int32_t>(p.g_dt[t]) * kNumDTypes + static_cast<int32_t>(p.x_dt[t])) * kNumDTypes +
              static_cast<int32_t>(p.r_dt[t]);
  }
  CudaHostTable t;
  t.plan = plan_cuda(p.numel.data(), keys.data(), T, K);
  t.words = cuda_table_layout(t.plan, K, t.layout);
  return t;
}

void cuda_host_fill(const Prepared& p, const CudaHostTable& t, int64_t* words) {
  cuda_table_fill(t.plan, t.layout, p.K, p.numel.data(), p.g.data(), p.x.data(), p.r.data(), words);
}

at::Tensor shape_output(const at::Tensor& rows, int64_t K, bool per_tensor, bool multi) {
  // rows: [T or 1][K][3]
  if (per_tensor) return multi ? rows.permute({1, 0, 2}).contiguous() : rows.select(1, 0);
  return multi ? rows.select(0, 0) : rows.select(0, 0).select(0, 0);
}

}  // namespace pathgeom
