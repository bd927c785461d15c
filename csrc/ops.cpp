// Torch binding: op schemas, input checks, and the CPU implementation.
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <sstream>

#include "binding.h"
#include "plan_python.h"

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

Inputs inputs_of(at::TensorList grads, at::TensorList params, at::TensorList refs) {
  Inputs in;
  for (const auto& t : grads) in.grads.push_back(&t);
  for (const auto& t : params) in.params.push_back(&t);
  for (const auto& t : refs) in.refs.push_back(&t);
  return in;
}

RowsFn cuda_rows_fn = nullptr;

Prepared prepare_inputs(const char* op, const Inputs& in, int64_t K) {
  TORCH_CHECK_VALUE(K >= 1, op, ": num_grads must be >= 1, got ", K);
  const auto& grads = in.grads;
  const auto& params = in.params;
  const auto& refs = in.refs;
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
  p.device = params[0]->device();

  // Names are built only inside failing checks (the message arguments of TORCH_CHECK_* are
  // evaluated only on failure): this loop runs once per tensor on every call.
  enum Which { kGrad, kParam, kRef };
  auto name = [&](Which w, int64_t j) -> std::string {
    if (w == kGrad) return grad_name(j, T, K);
    return std::string(w == kParam ? "params[" : "refs[") + std::to_string(j) + "]";
  };
  auto check_one = [&](const at::Tensor& t, Which w, int64_t j) {
    TORCH_CHECK_VALUE(t.defined(), op, ": ", name(w, j), " is an undefined tensor (None)");
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, op, ": ", name(w, j), " has layout ", layout_name(t.layout()),
                      "; only dense (strided) tensors are supported");
    DType dt;
    TORCH_CHECK_TYPE(to_dtype(t.scalar_type(), &dt), op, ": ", name(w, j), " has ", describe(t),
                     "; expected float16, bfloat16, float32 or float64");
    TORCH_CHECK_VALUE(t.device() == p.device, op, ": ", name(w, j), " is on ", t.device(),
                      " but params[0] is on ", p.device, "; all tensors must be on one device");
    return dt;
  };

  // Tensor metadata (TensorImpl, StorageImpl) of long lists is scattered over the heap
  // between the data blocks: each read is a cache and TLB miss. Prefetching a few tensors
  // ahead overlaps those misses (2-3x faster set-up for 10^4 small tensors).
  constexpr int64_t kAheadImpl = 16, kAheadStorage = 8;
  auto for_each_member = [&](int64_t i, auto&& f) {
    f(*params[i]);
    f(*refs[i]);
    for (int64_t k = 0; k < K; ++k) f(*grads[k * T + i]);
  };
  auto prefetch_impl = [](const at::Tensor& t) {
    const char* c = reinterpret_cast<const char*>(t.unsafeGetTensorImpl());
    __builtin_prefetch(c);
    __builtin_prefetch(c + 64);
    __builtin_prefetch(c + 128);
  };
  auto prefetch_storage = [](const at::Tensor& t) {
    __builtin_prefetch(t.unsafeGetTensorImpl()->unsafe_storage().unsafeGetStorageImpl());
  };
  for (int64_t i = 0; i < std::min(T, kAheadImpl); ++i) for_each_member(i, prefetch_impl);

  std::vector<const at::Tensor*> members;
  members.reserve(K + 2);
  for (int64_t i = 0; i < T; ++i) {
    if (i + kAheadImpl < T) for_each_member(i + kAheadImpl, prefetch_impl);
    if (i + kAheadStorage < T) for_each_member(i + kAheadStorage, prefetch_storage);
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
                         describe(g), " but ", grad_name(i, T, K), " has ",
                         describe(*grads[i]), "; the K gradients of one tensor must share a dtype");
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
    auto ptr_of = [&](const at::Tensor& t) -> const void* {
      if (n == 0) return nullptr;
      if (all_contig || same_dense || t.is_contiguous()) return t.data_ptr();
      p.keepalive.push_back(t.contiguous());
      return p.keepalive.back().data_ptr();
    };
    for (int64_t k = 0; k < K; ++k) p.g[i * K + k] = ptr_of(*grads[k * T + i]);
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

// [T or 1][K][3] rows on the CPU.
at::Tensor cpu_rows(const char* op, const Inputs& in, int64_t K, bool per_tensor, double wd) {
  Prepared p = prepare_inputs(op, in, K);
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
  auto triple_of = [&](int64_t t) {
    return CpuTriple{p.g.data() + t * K, p.x[t], p.r[t], p.g_dt[t], p.x_dt[t], p.r_dt[t]};
  };
  at::parallel_for(0, ntasks, 1, [&](int64_t tb, int64_t te) {
    const int64_t c_end = task_first[te];
    for (int64_t c = task_first[tb]; c < c_end; ++c) {
      const int64_t t = chunk_tensor[c];
      cpu_chunk_partials(triple_of(t), static_cast<int32_t>(K), chunk_begin[c], chunk_end[c], wd,
                         partials.data() + c * W);
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

// ---------------------------------------------------------------------------------------
// Direct entry point for the eager Python API: the dispatcher's conversion of three Python
// lists into std::vector<Tensor> (refcounts, boxing, several passes over scattered objects)
// costs more than the kernel for 10^4 small tensors. Here the lists are walked once, the
// tensors borrowed from their Python objects, and the GIL released while computing.
// torch.compile, opcheck and torch.ops callers use the registered ops above.
// ---------------------------------------------------------------------------------------
namespace {

void borrow_list(PyObject* list, const char* what, std::vector<const at::Tensor*>& out, int64_t T,
                 int64_t K) {
  TORCH_CHECK_TYPE(PyList_Check(list), what, " must be a list");
  const Py_ssize_t n = PyList_GET_SIZE(list);
  out.resize(n);
  for (Py_ssize_t j = 0; j < n; ++j) {
    PyObject* o = PyList_GET_ITEM(list, j);
    if (!THPVariable_Check(o)) {
      std::string name = std::string(what) + "[" + std::to_string(j) + "]";
      if (std::string(what) == "grads") name = grad_name(j, T, K);
      TORCH_CHECK_VALUE(o != Py_None, name, " is None (a parameter without .grad? see pathgeom_fast.grads_of)");
      TORCH_CHECK_TYPE(false, name, " is a ", Py_TYPE(o)->tp_name, ", not a torch.Tensor");
    }
    out[j] = &THPVariable_Unpack(o);
  }
}

struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

// direct(grads, params, refs, num_grads, per_tensor, weight_decay, multi) -> Tensor
PyObject* direct(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *g, *x, *r;
  long long K;
  int per_tensor, multi;
  double wd;
  if (!PyArg_ParseTuple(args, "OOOLpdp", &g, &x, &r, &K, &per_tensor, &wd, &multi)) return nullptr;
  const char* op = multi ? "secant_stats_multi" : "secant_stats";
  Inputs in;
  const int64_t T = PyList_Check(x) ? PyList_GET_SIZE(x) : 0;
  borrow_list(g, "grads", in.grads, T, K);
  borrow_list(x, "params", in.params, T, K);
  borrow_list(r, "refs", in.refs, T, K);
  TORCH_CHECK_VALUE(T > 0, op, ": the direct entry point needs at least one tensor");
  at::Tensor out;
  {
    ReleaseGil nogil;
    const at::Device dev = in.params[0]->device();
    RowsFn fn = dev.is_cpu() ? &cpu_rows : dev.is_cuda() ? cuda_rows_fn : nullptr;
    TORCH_CHECK(fn != nullptr, op, ": no compiled kernel for tensors on ", dev,
                dev.is_cuda() ? " (pathgeom_fast._C was built without CUDA)" : "");
    out = shape_output(fn(op, in, K, per_tensor, wd), K, per_tensor, multi);
  }
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

PyObject* isa(PyObject*, PyObject*) { return PyUnicode_FromString(pathgeom::cpu_isa()); }

PyMethodDef methods[] = {
    {"secant_stats_direct", direct, METH_VARARGS,
     "secant_stats_direct(grads, params, refs, num_grads, per_tensor, weight_decay, multi)"},
    {"cpu_isa", isa, METH_NOARGS, "instruction set of the CPU kernel"},
    PATHGEOM_PLAN_METHODS,
    {nullptr, nullptr, 0, nullptr}};

}  // namespace
}  // namespace pathgeom

// `import pathgeom_fast._C` loads the library, whose static initialisers register the ops.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, pathgeom::methods};
  return PyModule_Create(&module_def);
}
}
