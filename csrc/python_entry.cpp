// The Python module pathgeom_fast._C: the direct entry point of the eager API (lists borrowed
// from Python, the GIL released while computing), the host-side entry points of the Triton and
// CUDA backends, and PyInit__C.
#include <ATen/Parallel.h>
#include <Python.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <sstream>
#include <utility>

#include "binding.h"
#include "plan_python.h"
#include "metadata.h"

namespace pathgeom {

// ---------------------------------------------------------------------------------------
// Direct entry point for the eager Python API: the dispatcher's conversion of three Python
// lists into std::vector<Tensor> (refcounts, boxing, several passes over scattered objects)
// costs more than the kernel for 10^4 small tensors. Here the lists are walked once, the
// tensors borrowed from their Python objects, and the GIL released while computing.
// torch.compile, opcheck and torch.ops callers use the registered ops above.
// ---------------------------------------------------------------------------------------
namespace {

// True when `o` is a torch.Tensor, a Parameter or a subclass of Tensor, by its real type:
// unlike isinstance (THPVariable_Check), a type check runs no Python code and is not fooled
// by an object that only claims to be a Tensor through its __class__ (a mock with
// spec=torch.Tensor, a proxy), which is not a THPVariable and cannot be read as one.
bool is_tensor_object(PyObject* o) {
  return THPVariable_CheckExact(o) ||
         (THPVariableClass != nullptr && PyObject_TypeCheck(o, reinterpret_cast<PyTypeObject*>(THPVariableClass)));
}

// Borrows the tensors of `list` (checked to be a list of the expected length by the caller).
// Returns false when an object is a tensor subclass (not a plain Tensor or Parameter).
// `names` is given for the K vector lists (their entries are named grads[k][i] / vecs[k][i]).
bool borrow_list(PyObject* list, const char* what, std::vector<const at::Tensor*>& out,
                 std::vector<const c10::TensorImpl*>& impls, int64_t T, int64_t K,
                 const ListNames* names = nullptr) {
  TORCH_CHECK_TYPE(PyList_Check(list), what, " must be a list");
  const Py_ssize_t n = PyList_GET_SIZE(list);
  out.resize(n);
  impls.resize(n);
  bool exact = true;
  constexpr Py_ssize_t kAheadObject = 32;  // 3 x 10^4 objects: 0.17 ms at 16 ahead, 0.14 at 32
  for (Py_ssize_t j = 0; j < n; ++j) {
    if (j + kAheadObject < n) __builtin_prefetch(PyList_GET_ITEM(list, j + kAheadObject));
    PyObject* o = PyList_GET_ITEM(list, j);
    if (!THPVariable_CheckExact(o)) {
      if (!is_tensor_object(o)) {
        std::string name = std::string(what) + "[" + std::to_string(j) + "]";
        if (names != nullptr) name = grad_name(j, T, K, *names);
        const char* hint = names == &kGradNames ? " (a parameter without .grad? see pathgeom_fast.grads_of)" : "";
        TORCH_CHECK_VALUE(o != Py_None, name, " is None", hint);
        TORCH_CHECK_TYPE(false, name, " is a ", Py_TYPE(o)->tp_name, ", not a torch.Tensor");
      }
      exact = false;
    }
    out[j] = &THPVariable_Unpack(o);
    impls[j] = out[j]->unsafeGetTensorImpl();
  }
  return exact;
}

// The three lists of the direct entry point, borrowed into `in` (lists of the lengths the
// caller checked). Returns false when an object is a tensor subclass. Lists of
// kParallelBorrow or more objects in all are borrowed by the intra-op threads, blocks of
// kBorrowBlock objects handed out in order. The calling thread holds the GIL throughout, so
// no Python code runs that could change the lists or their objects, and the workers only
// read: the list items, each object's type and the tensor inside it. They take plain tensors
// and Parameters (THPVariable_CheckExact); anything else (None, another type, a Tensor
// subclass) sends the whole call to the serial borrow, with its usual messages. 3 x 10^4
// objects: 0.11 ms serial, 0.06 ms on 2 threads; and the intra-op threads are awake when the
// pass starts. In one process, both read from memory, 4 paired rounds (10^4 x 10^3 fp32, 2
// threads, 2026-11-28): +2-3% (0.72 -> 0.74 of the probe).
constexpr Py_ssize_t kParallelBorrow = 8192, kBorrowBlock = 2048;

bool borrow_lists(PyObject* g, PyObject* x, PyObject* r, int64_t T, int64_t K, const ListNames& names,
                  Inputs& in) {
  auto serial = [&] {
    bool exact = borrow_list(g, names.list, in.grads, in.grad_impls, T, K, &names);
    exact = borrow_list(x, "params", in.params, in.param_impls, T, K) && exact;
    return borrow_list(r, "refs", in.refs, in.ref_impls, T, K) && exact;
  };
  const Py_ssize_t ng = PyList_GET_SIZE(g), nx = PyList_GET_SIZE(x), nr = PyList_GET_SIZE(r);
  const Py_ssize_t total = ng + nx + nr;
  if (total < kParallelBorrow || at::get_num_threads() < 2) return serial();
  in.grads.resize(ng);
  in.grad_impls.resize(ng);
  in.params.resize(nx);
  in.param_impls.resize(nx);
  in.refs.resize(nr);
  in.ref_impls.resize(nr);
  struct Part {
    PyObject* list;
    const at::Tensor** out;
    const c10::TensorImpl** impls;
    Py_ssize_t n;
  };
  const Part parts[3] = {{g, in.grads.data(), in.grad_impls.data(), ng},
                         {x, in.params.data(), in.param_impls.data(), nx},
                         {r, in.refs.data(), in.ref_impls.data(), nr}};
  std::atomic<bool> other{false};  // an object that is not a plain tensor or a Parameter
  const int64_t nblocks = (total + kBorrowBlock - 1) / kBorrowBlock;
  parallel_dynamic(nblocks, [&](std::atomic<int64_t>& next) {
    constexpr Py_ssize_t kAheadObject = 32;
    for (int64_t blk = next++; blk < nblocks && !other.load(std::memory_order_relaxed); blk = next++) {
      // block [b, e) of the three lists back to back, walked list by list
      Py_ssize_t b = blk * kBorrowBlock, e = std::min(total, b + kBorrowBlock);
      for (const Part& part : parts) {
        const Py_ssize_t lb = std::max<Py_ssize_t>(b, 0), le = std::min(e, part.n);
        for (Py_ssize_t j = lb; j < le; ++j) {
          if (j + kAheadObject < le) __builtin_prefetch(PyList_GET_ITEM(part.list, j + kAheadObject));
          PyObject* o = PyList_GET_ITEM(part.list, j);
          if (!THPVariable_CheckExact(o)) {
            other.store(true, std::memory_order_relaxed);
            return;
          }
          part.out[j] = &THPVariable_Unpack(o);
          part.impls[j] = part.out[j]->unsafeGetTensorImpl();
        }
        b -= part.n;
        e -= part.n;
      }
    }
  });
  return other.load() ? serial() : true;
}

// The borrowed tables of the direct entry point, kept by the calling thread from one call to
// the next (as the CPU pass keeps its own): for 10^4 positions they are 0.5 MB, whose
// allocation and zeroing cost ~0.05 ms a call (3 x 10^4 objects: 0.16 -> 0.11 ms serial).
// Every entry a call reads it has written first. Tables of more than kKeepInputBytes are freed
// after the call. A call made while they are in use (Python code run mid-call on this thread
// calling the op again) gets fresh ones.
constexpr size_t kKeepInputBytes = size_t(8) << 20;
struct KeptInputs {
  Inputs in;
  bool busy = false;
};
KeptInputs& kept_inputs() {
  static thread_local KeptInputs kept;
  return kept;
}

class InputsLease {
 public:
  InputsLease() {
    KeptInputs& k = kept_inputs();
    if (!k.busy) {
      k.busy = true;
      in_ = &k.in;
    } else {
      fresh_ = std::make_unique<Inputs>();
      in_ = fresh_.get();
    }
  }
  ~InputsLease() {
    in_->owned.clear();  // with the GIL held: the last reference to a tensor may be Python's
    if (fresh_) return;
    const size_t bytes = (in_->grads.capacity() + in_->params.capacity() + in_->refs.capacity()) * sizeof(void*) +
                         (in_->grad_impls.capacity() + in_->param_impls.capacity() + in_->ref_impls.capacity()) *
                             sizeof(void*);
    if (bytes > kKeepInputBytes) *in_ = Inputs();
    kept_inputs().busy = false;
  }
  InputsLease(const InputsLease&) = delete;
  InputsLease& operator=(const InputsLease&) = delete;
  Inputs& get() { return *in_; }

 private:
  Inputs* in_;
  std::unique_ptr<Inputs> fresh_;
};

struct ReleaseGil {
  PyThreadState* state = PyEval_SaveThread();
  ~ReleaseGil() { PyEval_RestoreThread(state); }
};

// The checks of the direct entry points that come before any tensor is read: the three
// arguments are lists, of matching lengths. Returns T.
int64_t check_lists(const char* op, PyObject* g, PyObject* x, PyObject* r, int64_t K, const ListNames& names) {
  TORCH_CHECK_TYPE(PyList_Check(g), op, ": ", names.list, " must be a list, got ", Py_TYPE(g)->tp_name);
  TORCH_CHECK_TYPE(PyList_Check(x), op, ": params must be a list, got ", Py_TYPE(x)->tp_name);
  TORCH_CHECK_TYPE(PyList_Check(r), op, ": refs must be a list, got ", Py_TYPE(r)->tp_name);
  const int64_t T = PyList_GET_SIZE(x);
  check_lengths(op, PyList_GET_SIZE(g), T, PyList_GET_SIZE(r), K, names);
  return T;
}

// Borrows the lists into `in`. Where Python code may run during the checks or copies that
// follow (a tensor subclass, whose __torch_dispatch__ a copy reaches; a dispatch mode on this
// thread), takes strong references first: that code may empty the lists or drop the tensors.
void borrow_checked(PyObject* g, PyObject* x, PyObject* r, int64_t T, int64_t K, const ListNames& names,
                    Inputs& in) {
  const bool exact = borrow_lists(g, x, r, T, K, names, in);
  if (!exact || c10::impl::TorchDispatchModeTLS::stack_len() > 0) in.own();
}

// direct(grads, params, refs, num_grads, per_tensor, weight_decay, mode) -> Tensor
// mode: 0 (or False) secant_stats, 1 (or True) secant_stats_multi, 2 secant_gram (grads are
// then its vectors; weight_decay is ignored).
//
// Every check runs with the GIL held (bad input raises before any kernel runs); the GIL is
// released for the kernels alone, which read only the checked tables.
PyObject* direct(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *g, *x, *r;
  long long K;
  int per_tensor, mode;
  double wd;
  if (!PyArg_ParseTuple(args, "OOOLpdi", &g, &x, &r, &K, &per_tensor, &wd, &mode)) return nullptr;
  TORCH_CHECK_VALUE(mode >= 0 && mode <= 2, "secant_stats_direct: mode must be 0, 1 or 2, got ", mode);
  const bool multi = mode == 1, gram = mode == 2;
  const char* op = gram ? "secant_gram" : multi ? "secant_stats_multi" : "secant_stats";
  const ListNames& names = gram ? kVecNames : kGradNames;
  if (gram) check_num_vecs(K);
  const int64_t T = check_lists(op, g, x, r, K, names);
  TORCH_CHECK_VALUE(T > 0, op, ": the direct entry point needs at least one tensor");
  InputsLease lease;
  Inputs& in = lease.get();
  borrow_checked(g, x, r, T, K, names, in);
  if (!in.params[0]->defined()) prepare_inputs(op, in, K, names);  // raises
  const at::Device dev = in.params[0]->device();
  RowsFn fn = gram ? nullptr : dev.is_cpu() ? &cpu_rows : dev.is_cuda() ? cuda_rows_fn : nullptr;
  if (gram) {
    TORCH_CHECK_VALUE(dev.is_cpu(), op, ": no compiled kernel for tensors on ", dev, " (params[0] is on ", dev,
                      "; the Gram op has a CPU kernel only; use backend='triton')");
  } else {
    TORCH_CHECK_VALUE(fn != nullptr && (dev.is_cpu() || cuda_prepared_rows_fn != nullptr), op,
                      ": no compiled kernel for tensors on ", dev, " (params[0] is on ", dev, ")",
                      dev.is_cuda() ? " (pathgeom_fast._C was built without CUDA)" : "");
  }
  // Checks (and contiguous copies) with the GIL held; they raise bad input here.
  // The parallel check pass serves every device (it reads metadata only).
  CpuTablesLease tables;  // destroyed after the GIL is back (it holds the copies)
  const bool on_cpu = dev.is_cpu();
  cpu_check(op, in, K, names, tables.get());
  const CpuKernel kernel = gram ? gram_kernel_of(K) : CpuKernel{3 * K, &cpu_chunk_partials, wd};
  // The kernels without the GIL. An error there (out of memory, a failed launch) is carried
  // out as an exception_ptr and rethrown once the GIL is back, so that no exception unwinds
  // through the release.
  at::Tensor out;
  std::exception_ptr error;
  {
    ReleaseGil nogil;
    try {
      if (gram) {
        out = gram_shape(cpu_compute(K, per_tensor, kernel, tables.get()), K, per_tensor);
      } else {
        at::Tensor rows = on_cpu ? cpu_compute(K, per_tensor, kernel, tables.get()).view({-1, K, 3})
                                 : cuda_prepared_rows_fn(tables.get().p, K, per_tensor, wd);
        out = shape_output(rows, K, per_tensor, multi);
      }
    } catch (...) {
      error = std::current_exception();
    }
  }
  if (error) std::rethrow_exception(error);
  return THPVariable_Wrap(std::move(out));
  END_HANDLE_TH_ERRORS
}

// The checks of the host-side entry points (triton_inputs, cuda_host_work): the lists,
// borrowed, then the parallel check pass of the CPU kernels (any device: it reads metadata
// only). The leases hold the borrowed tables and the contiguous copies for the caller.
const Prepared& check_call(const char* op, PyObject* g, PyObject* x, PyObject* r, int64_t K, const ListNames& names,
                           InputsLease& inputs, CpuTablesLease& tables) {
  const int64_t T = check_lists(op, g, x, r, K, names);
  borrow_checked(g, x, r, T, K, names, inputs.get());
  cpu_check(op, inputs.get(), K, names, tables.get());
  return tables.get().p;
}

// A 64-bit digest of n words (four independent multiply-xor lanes: ~1 cycle a word). The
// Triton backend keys its caches by it and compares the full contents on a hit, so a
// collision costs a rebuild, never a wrong table.
uint64_t digest(const int64_t* w, int64_t n, uint64_t seed) {
  constexpr uint64_t kMul = 0x9e3779b97f4a7c15ull;
  uint64_t h[4] = {seed ^ 0x243f6a8885a308d3ull, seed ^ 0x13198a2e03707344ull, seed ^ 0xa4093822299f31d0ull,
                   seed ^ 0x082efa98ec4e6c89ull};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int l = 0; l < 4; ++l) h[l] = (h[l] ^ static_cast<uint64_t>(w[i + l])) * kMul;
  }
  for (; i < n; ++i) h[0] = (h[0] ^ static_cast<uint64_t>(w[i])) * kMul;
  uint64_t out = static_cast<uint64_t>(n);
  for (uint64_t v : h) out = (out ^ (v >> 29) ^ v) * kMul;
  return out ^ (out >> 32);
}

// triton_inputs(lists, params, refs, K, gram) -> (addrs, numels, keys, copies, digests)
// The host side of the Triton backends (pathgeom_fast.triton_kernels.prepare), without
// per-tensor Python work: the checks and messages of the compiled kernels (the parallel check
// pass) and the tables of the launch plan. addrs: int64 [(K + 2) T], the data addresses of the
// K lists back to back (list k's tensor i at k T + i), then params, then refs (0 for empty
// tensors); numels: int64 [T]; keys: int64 [T], the kernel specialisation of each tensor
// (triton_kernels.group_key: dtypes of list 0, params and refs, and whether all K + 2
// addresses are 16-byte aligned); copies: the contiguous copies made of non-contiguous inputs,
// to be kept alive until the launches are queued; digests: (of numels and keys, of addrs),
// Python ints, for the caches.
PyObject* triton_inputs(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *g, *x, *r;
  long long K;
  int gram;
  if (!PyArg_ParseTuple(args, "OOOLp", &g, &x, &r, &K, &gram)) return nullptr;
  const ListNames& names = gram ? kVecNames : kGradNames;
  const char* op = gram ? "secant_gram" : "secant_stats";
  TORCH_CHECK_VALUE(!gram || (K >= 1 && K <= kGramMaxVecs), op, ": num_vecs must be between 1 and ",
                    kGramMaxVecs, ", got ", K);
  InputsLease inputs;
  CpuTablesLease tables;
  const Prepared& p = check_call(op, g, x, r, K, names, inputs, tables);
  const int64_t T = p.T;
  at::Tensor addrs = at::empty({(K + 2) * T}, at::dtype(at::kLong));
  at::Tensor numels = at::empty({2 * T}, at::dtype(at::kLong));  // numels, then keys
  int64_t* a = addrs.data_ptr<int64_t>();
  int64_t* n = numels.data_ptr<int64_t>();
  int64_t* key = n + T;
  auto address = [](const void* ptr) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(ptr)); };
  // every position writes its own slots: split over the intra-op threads (10^4 positions:
  // about 3 ns a position less, paired runs on 2 threads)
  at::parallel_for(0, T, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      int64_t misaligned = 0;
      for (int64_t k = 0; k < K; ++k) misaligned |= a[k * T + i] = address(p.g[i * K + k]);
      misaligned |= a[K * T + i] = address(p.x[i]);
      misaligned |= a[(K + 1) * T + i] = address(p.r[i]);
      n[i] = p.numel[i];
      key[i] = ((static_cast<int64_t>(p.g_dt[i]) * 4 + static_cast<int64_t>(p.x_dt[i])) * 4 +
                static_cast<int64_t>(p.r_dt[i])) * 2 + ((misaligned & 15) == 0);
    }
  });
  const uint64_t plan_digest = digest(n, 2 * T, static_cast<uint64_t>(K));
  const uint64_t addr_digest = digest(a, (K + 2) * T, plan_digest);
  PyObject* copies = PyList_New(static_cast<Py_ssize_t>(p.keepalive.size()));
  if (copies == nullptr) return nullptr;
  for (size_t j = 0; j < p.keepalive.size(); ++j) {
    PyList_SET_ITEM(copies, static_cast<Py_ssize_t>(j), THPVariable_Wrap(p.keepalive[j]));
  }
  return Py_BuildValue("(NNNN(KK))", THPVariable_Wrap(std::move(addrs)), THPVariable_Wrap(numels.narrow(0, 0, T)),
                       THPVariable_Wrap(numels.narrow(0, T, T)), copies,
                       static_cast<unsigned long long>(plan_digest), static_cast<unsigned long long>(addr_digest));
  END_HANDLE_TH_ERRORS
}

// cuda_host_work(grads, params, refs, K, describe)
//     -> None | (table, launches, passes, total_chunks, copies)
// The host work of one call of the CUDA kernels (everything the direct entry point does before
// the copy of the table and the launches: borrowing, the check pass, the plan and the table),
// on tensors of any device, so that its cost is measured without a GPU. With `describe`, also
// returns the table (int64 CPU tensor, as the device would receive it), its layout, and the
// contiguous copies of non-contiguous inputs whose addresses it holds (for tests).
PyObject* cuda_host_work(PyObject* /*self*/, PyObject* args) {
  HANDLE_TH_ERRORS
  PyObject *g, *x, *r;
  long long K;
  int describe;
  if (!PyArg_ParseTuple(args, "OOOLp", &g, &x, &r, &K, &describe)) return nullptr;
  const char* op = K == 1 ? "secant_stats" : "secant_stats_multi";
  InputsLease inputs;
  CpuTablesLease tables;
  const Prepared& p = check_call(op, g, x, r, K, kGradNames, inputs, tables);
  const CudaHostTable t = cuda_host_table(p, K);
  at::Tensor words = at::empty({t.words}, at::dtype(at::kLong));
  cuda_host_fill(p, t, words.data_ptr<int64_t>());
  if (!describe) Py_RETURN_NONE;
  PyObject* launches = PyList_New(static_cast<Py_ssize_t>(t.layout.size()));
  if (launches == nullptr) return nullptr;
  for (size_t l = 0; l < t.layout.size(); ++l) {
    const CudaTableLaunch& L = t.layout[l];
    PyObject* item = Py_BuildValue("{s:i,s:L,s:L,s:L,s:L,s:L,s:L,s:L,s:L}", "key", t.plan.launches[l].key,
                                  "chunk_offset", static_cast<long long>(t.plan.launches[l].chunk_offset),
                                  "ntensors", static_cast<long long>(L.ntensors), "nblocks",
                                  static_cast<long long>(L.nblocks), "chunk_start", static_cast<long long>(L.base),
                                  "numel", static_cast<long long>(L.numel_at()), "tensor_index",
                                  static_cast<long long>(L.tensor_index_at()), "block_tensor",
                                  static_cast<long long>(L.block_tensor_at()), "ptrs",
                                  static_cast<long long>(L.ptrs_at()));
    if (item == nullptr) {
      Py_DECREF(launches);
      return nullptr;
    }
    PyList_SET_ITEM(launches, static_cast<Py_ssize_t>(l), item);
  }
  PyObject* passes = PyList_New(static_cast<Py_ssize_t>(t.plan.passes.size()));
  if (passes == nullptr) {
    Py_DECREF(launches);
    return nullptr;
  }
  for (size_t q = 0; q < t.plan.passes.size(); ++q) {
    PyObject* item = Py_BuildValue("(LL)", static_cast<long long>(t.plan.passes[q].first),
                                   static_cast<long long>(t.plan.passes[q].second));
    if (item == nullptr) {
      Py_DECREF(launches);
      Py_DECREF(passes);
      return nullptr;
    }
    PyList_SET_ITEM(passes, static_cast<Py_ssize_t>(q), item);
  }
  PyObject* copies = PyList_New(static_cast<Py_ssize_t>(p.keepalive.size()));
  if (copies == nullptr) {
    Py_DECREF(launches);
    Py_DECREF(passes);
    return nullptr;
  }
  for (size_t j = 0; j < p.keepalive.size(); ++j) {
    PyList_SET_ITEM(copies, static_cast<Py_ssize_t>(j), THPVariable_Wrap(p.keepalive[j]));
  }
  return Py_BuildValue("(NNNLN)", THPVariable_Wrap(std::move(words)), launches, passes,
                       static_cast<long long>(t.plan.total_chunks), copies);
  END_HANDLE_TH_ERRORS
}

PyObject* isa(PyObject*, PyObject*) { return PyUnicode_FromString(pathgeom::cpu_isa()); }

// same_bytes(a, b) -> bool: whether two C-contiguous buffers (NumPy arrays) hold the same
// elements: same format, item size, shape and bytes. The Triton backend's caches compare a
// hit's tables with it (one memcmp; numpy.array_equal builds a boolean array first: at 10^4
// tensors, 5 x 10^4 int64 words a call, 17 us against 43).
PyObject* same_bytes(PyObject* /*self*/, PyObject* args) {
  PyObject *a, *b;
  if (!PyArg_ParseTuple(args, "OO", &a, &b)) return nullptr;
  constexpr int kFlags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT;
  Py_buffer va, vb;
  if (PyObject_GetBuffer(a, &va, kFlags) != 0) return nullptr;
  if (PyObject_GetBuffer(b, &vb, kFlags) != 0) {
    PyBuffer_Release(&va);
    return nullptr;
  }
  bool same = va.len == vb.len && va.itemsize == vb.itemsize && va.ndim == vb.ndim &&
              std::strcmp(va.format ? va.format : "B", vb.format ? vb.format : "B") == 0;
  for (int d = 0; same && d < va.ndim; ++d) same = va.shape[d] == vb.shape[d];
  if (same && va.len > 0) same = std::memcmp(va.buf, vb.buf, static_cast<size_t>(va.len)) == 0;
  PyBuffer_Release(&va);
  PyBuffer_Release(&vb);
  return PyBool_FromLong(same);
}

PyMethodDef methods[] = {
    {"secant_stats_direct", direct, METH_VARARGS,
     "secant_stats_direct(grads, params, refs, num_grads, per_tensor, weight_decay, multi)"},
    {"triton_inputs", triton_inputs, METH_VARARGS,
     "triton_inputs(lists, params, refs, K, gram) -> (addrs, numels, keys, copies, digests): "
     "checked inputs of the Triton backends"},
    {"cuda_host_work", cuda_host_work, METH_VARARGS,
     "cuda_host_work(grads, params, refs, K, describe): the CUDA backend's host work, up to the "
     "launches, on tensors of any device; with describe, (table, launches, passes, total_chunks, copies)"},
    {"cpu_isa", isa, METH_NOARGS, "instruction set of the CPU kernel"},
    {"same_bytes", same_bytes, METH_VARARGS,
     "same_bytes(a, b) -> bool: two C-contiguous buffers of the same format, shape and bytes"},
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
