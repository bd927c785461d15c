// Torch binding: op schemas, input checks, and the CPU implementation.
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

// Tensors the checks of the parallel passes leave to prepare_inputs, on the calling thread:
// those whose metadata may be computed by Python code (tensor subclasses with
// __torch_dispatch__), by functorch or functionalization wrappers, and nested tensors.
bool unusual(const c10::TensorImpl* t) {
  constexpr c10::DispatchKeySet kWrapped = c10::DispatchKeySet(c10::DispatchKey::Python) |
                                           c10::DispatchKeySet(c10::DispatchKey::PythonTLSSnapshot) |
                                           c10::DispatchKeySet(c10::DispatchKey::FuncTorchBatched) |
                                           c10::DispatchKeySet(c10::DispatchKey::FuncTorchGradWrapper) |
                                           c10::DispatchKeySet(c10::DispatchKey::Functionalize);
  return t->key_set().has_any(kWrapped) || t->is_nested();
}

// Tensor metadata (TensorImpl, StorageImpl) of long lists is scattered over the heap between
// the data blocks: each read is a cache and TLB miss. Prefetching a few positions ahead
// overlaps those misses (2-3x faster set-up for 10^4 small tensors).
constexpr int64_t kAheadImpl = 16, kAheadStorage = 8;

// Every cache line of an object (malloc aligns to 16 bytes only: a 176-byte TensorImpl spans
// 3 or 4 lines, and the checks read fields at both ends).
template <size_t kBytes>
void prefetch_object(const void* p) {
  const char* c = static_cast<const char*>(p);
  for (size_t b = 0; b < kBytes; b += 64) __builtin_prefetch(c + b);
  __builtin_prefetch(c + kBytes - 1);
}

// Of a TensorImpl, the checks read the storage pointer (near its start) and the fields at its
// end (storage offset, numel, dtype, device, flags, dispatch keys; with torch 2.14, bytes
// 144-175 of 176); sizes and strides only for non-contiguous tensors, which are rare. Fetching
// just those lines leaves the CPU's few outstanding-miss slots to the other objects (on 10^4
// positions, all lines of every object: the prefetches themselves stall on full fill buffers).
void prefetch_impl(const c10::TensorImpl* t) {
  const char* c = reinterpret_cast<const char*>(t);
  __builtin_prefetch(c + 16);
  __builtin_prefetch(c + sizeof(c10::TensorImpl) - 32);
  __builtin_prefetch(c + sizeof(c10::TensorImpl) - 1);
}

// An undefined tensor's impl is the UndefinedTensorImpl singleton, which has no storage.
const c10::StorageImpl* storage_of(const c10::TensorImpl* t) {
  if (t == c10::UndefinedTensorImpl::singleton()) return nullptr;
  return t->unsafe_storage().unsafeGetStorageImpl();
}

void prefetch_storage(const c10::TensorImpl* t) {
  if (const c10::StorageImpl* s = storage_of(t)) prefetch_object<sizeof(c10::StorageImpl)>(s);
}

// Calls f on the TensorImpls of params[i], refs[i] and the K vectors of position i.
template <typename F>
void for_each_impl(const Inputs& in, int64_t T, int64_t K, int64_t i, F&& f) {
  f(in.param_impls[i]);
  f(in.ref_impls[i]);
  for (int64_t k = 0; k < K; ++k) f(in.grad_impls[k * T + i]);
}

// Prefetches the metadata of the positions checked after position i, up to `end`.
void prefetch_position(const Inputs& in, int64_t end, int64_t T, int64_t K, int64_t i) {
  if (i + kAheadImpl < end) for_each_impl(in, T, K, i + kAheadImpl, prefetch_impl);
  if (i + kAheadStorage < end) for_each_impl(in, T, K, i + kAheadStorage, prefetch_storage);
}

}  // namespace

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

// ---------------------------------------------------------------------------------------
// CPU: a parallel check pass, then the parallel kernel passes.
//
// For 10^4 tensors of 10^3 elements the reading takes a few milliseconds, and the serial work
// around it used to cost as much: a validation pass over every tensor's metadata (TensorImpl,
// StorageImpl: cache and TLB misses, scattered over the heap between the data blocks), and a
// chunk table built one push_back at a time. Now:
//  1. check pass (cpu_check), parallel, blocks of kBlock positions handed out in order: every
//     check of prepare_inputs, as a predicate, with the raw pointers (metadata prefetched
//     ahead). A position that fails a check, or whose members would need a copy, is flagged;
//     if any is, the serial prepare_inputs runs for the whole list on the calling thread: it
//     raises its usual message, or makes the copies the flagged positions then use. All bad
//     input is rejected here, before any kernel runs: the direct entry point holds the GIL
//     for this step and releases it for the next ones;
//  2. block pass, parallel: the small positions, whole;
//  3. chunk pass, parallel: the larger positions, in chunks of kCpuChunk;
//  4. the fixed-order combine. A position's partial values do not depend on the pass that
//     computed it, nor on the thread: results are bitwise the same whatever the schedule.
// (Until 2026-12 the checks and the small positions shared one pass, a group of 8 positions
// checked then computed at a time, which overlapped the metadata misses with the data
// streams: 0.70-0.72 of the read probe on 10^4 x 10^3 fp32, 2 threads. It raised bad input
// from inside the GIL-free region.)
// ---------------------------------------------------------------------------------------
namespace {

// Fills position i of `p` exactly as prepare_inputs would, when position i passes every check
// of prepare_inputs on p.device and its members share one memory order (no copy needed).
// Returns false otherwise: prepare_inputs must decide.
bool fast_position(const Inputs& in, int64_t i, Prepared& p) {
  using Impl = c10::TensorImpl;
  const int64_t T = p.T, K = p.K;
  auto usable = [&](const Impl* t, DType* dt) {
    return t != c10::UndefinedTensorImpl::singleton() && !unusual(t) && t->layout() == at::kStrided &&
           to_dtype(c10::typeMetaToScalarType(t->dtype()), dt) && t->device() == p.device;
  };
  const Impl* x = in.param_impls[i];
  const Impl* r = in.ref_impls[i];
  DType x_dt, r_dt, g_dt = DType::kFloat32;
  if (!usable(x, &x_dt) || !usable(r, &r_dt)) return false;
  const int64_t n = x->numel();
  if (r->numel() != n) return false;
  bool all_contig = x->is_contiguous() && r->is_contiguous();
  for (int64_t k = 0; k < K; ++k) {
    const Impl* gk = in.grad_impls[k * T + i];
    DType dt;
    if (!usable(gk, &dt) || gk->numel() != n) return false;
    if (k == 0) g_dt = dt;
    else if (dt != g_dt) return false;
    all_contig = all_contig && gk->is_contiguous();
  }
  if (!all_contig) {  // copy-free only if all are dense with the same sizes and strides
    auto same = [&](const Impl* t) {
      return t->is_non_overlapping_and_dense() && t->sizes() == x->sizes() && t->strides() == x->strides();
    };
    if (!same(x) || !same(r)) return false;
    for (int64_t k = 0; k < K; ++k) {
      if (!same(in.grad_impls[k * T + i])) return false;
    }
  }
  p.numel[i] = n;
  p.x_dt[i] = x_dt;
  p.r_dt[i] = r_dt;
  p.g_dt[i] = g_dt;
  p.x[i] = n ? x->data() : nullptr;
  p.r[i] = n ? r->data() : nullptr;
  bool readable = n == 0 || (p.x[i] != nullptr && p.r[i] != nullptr);
  for (int64_t k = 0; k < K; ++k) {
    p.g[i * K + k] = n ? in.grad_impls[k * T + i]->data() : nullptr;
    readable = readable && (n == 0 || p.g[i * K + k] != nullptr);
  }
  return readable;  // else prepare_inputs names the tensor without memory
}

// Runs worker(next) on each intra-op thread (one call inline when a single thread would do);
// the workers take indices in order from the shared counter `next`, so a thread slowed down
// (by another process on its core, by farther memory) simply takes fewer of them. Results
// must not depend on which thread runs which index: here every index writes its own slots.
template <typename F>
void parallel_dynamic(int64_t n, F&& worker) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  if (workers <= 1 || at::in_parallel_region()) {
    worker(next);
    return;
  }
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(next); });
}

// Scratch memory of the kernels (kCpuScratchBytes), one buffer per thread, reused across
// calls. Pages are touched only by the kernels that use it (multi-list, Gram).
void* thread_scratch() {
  struct Buffer {
    void* ptr = nullptr;
    ~Buffer() { std::free(ptr); }
  };
  static thread_local Buffer buf;
  if (buf.ptr == nullptr) {
    buf.ptr = std::aligned_alloc(64, kCpuScratchBytes);
    TORCH_CHECK(buf.ptr != nullptr, "pathgeom: out of memory for the CPU kernel's scratch buffer");
  }
  return buf.ptr;
}

// Positions of at most kSmallNumel elements are computed in the block pass, whole; larger
// ones, in chunks of kCpuChunk elements, in the chunk pass.
constexpr int64_t kSmallNumel = 4096;
// Positions per step of a worker of the check and block passes (paired runs: 256 and 1024
// alike, a few percent faster than 64, 16 and 8 slower).
constexpr int64_t kBlock = 256;
// The tables of the CPU pass, kept by the calling thread from one call to the next: for
// 10^4 positions they are ~0.7 MB, whose allocation and zeroing (fresh pages included) cost
// ~0.08 ms a call. Every entry the call reads it has written first, so only `flagged` is
// cleared. Tables of more than kKeepBytes are freed after the call. A call made while the
// thread's tables are in use (Python code run by a check or a copy, e.g. a tensor subclass's
// __torch_dispatch__, calling the op again) gets fresh tables (CpuTablesLease).
constexpr int64_t kKeepBytes = int64_t(8) << 20;

struct KeptTables;
KeptTables& kept_tables();

}  // namespace

struct CpuTables {
  Prepared p;
  std::vector<uint8_t> flagged;
  std::vector<double> small_rows;

  int64_t bytes() const {
    return static_cast<int64_t>(p.g.capacity() * sizeof(void*) + (p.x.capacity() + p.r.capacity()) * sizeof(void*) +
                                p.numel.capacity() * sizeof(int64_t) +
                                (p.g_dt.capacity() + p.x_dt.capacity() + p.r_dt.capacity()) * sizeof(DType) +
                                flagged.capacity() + small_rows.capacity() * sizeof(double));
  }
};

namespace {
struct KeptTables {
  CpuTables tables;
  bool busy = false;
};
KeptTables& kept_tables() {
  static thread_local KeptTables kept;
  return kept;
}
}  // namespace

CpuTablesLease::CpuTablesLease() {
  KeptTables& k = kept_tables();
  kept_ = !k.busy;
  if (kept_) {
    k.busy = true;
    tables_ = &k.tables;
  } else {
    tables_ = new CpuTables();
  }
}

CpuTablesLease::~CpuTablesLease() {
  if (!kept_) {
    delete tables_;
    return;
  }
  tables_->p.keepalive.clear();  // the copies go, large tables too (also after an exception)
  if (tables_->bytes() > kKeepBytes) *tables_ = CpuTables();
  kept_tables().busy = false;
}

void cpu_check(const char* op, const Inputs& in, int64_t K, const ListNames& names, CpuTables& tables) {
  const int64_t T = static_cast<int64_t>(in.params.size());
  check_lengths(op, static_cast<int64_t>(in.grads.size()), T, static_cast<int64_t>(in.refs.size()), K, names);
  Prepared& p = tables.p;
  p.keepalive.clear();
  p.resize(T, K);
  tables.flagged.assign(T, 0);
  if (T == 0) return;
  if (!in.params[0]->defined() || unusual(in.param_impls[0])) {  // raises, or checks serially
    p = prepare_inputs(op, in, K, names);
    return;
  }
  p.device = in.params[0]->device();
  std::vector<uint8_t>& flagged = tables.flagged;
  std::atomic<bool> any_flagged{false};

  // Check pass, parallel: positions in blocks of kBlock handed out in order, metadata
  // prefetched ahead. The intra-op threads only read tensor metadata (tensors whose metadata
  // could need Python code are `unusual`, left to prepare_inputs); a failing position, or one
  // whose members would need a copy, is flagged.
  const int64_t nblocks = (T + kBlock - 1) / kBlock;
  parallel_dynamic(nblocks, [&](std::atomic<int64_t>& next) {
    for (int64_t blk = next++; blk < nblocks; blk = next++) {
      const int64_t b = blk * kBlock, e = std::min(T, b + kBlock);
      for (int64_t i = b; i < std::min(e, b + kAheadImpl); ++i) for_each_impl(in, T, K, i, prefetch_impl);
      for (int64_t i = b; i < e; ++i) {
        prefetch_position(in, e, T, K, i);
        if (!fast_position(in, i, p)) {
          flagged[i] = 1;
          any_flagged.store(true, std::memory_order_relaxed);
        }
      }
    }
  });
  if (!any_flagged.load()) return;
  // Bad input raises here, with the message naming the first offending index; otherwise the
  // flagged positions get prepare_inputs' pointers (to contiguous copies where needed).
  Prepared full = prepare_inputs(op, in, K, names);
  for (int64_t i = 0; i < T; ++i) {
    if (!flagged[i]) continue;
    p.numel[i] = full.numel[i];
    p.x[i] = full.x[i];
    p.r[i] = full.r[i];
    for (int64_t k = 0; k < K; ++k) p.g[i * K + k] = full.g[i * K + k];
    p.g_dt[i] = full.g_dt[i];
    p.x_dt[i] = full.x_dt[i];
    p.r_dt[i] = full.r_dt[i];
  }
  p.keepalive = std::move(full.keepalive);
}

at::Tensor cpu_compute(int64_t K, bool per_tensor, const CpuKernel& kernel, CpuTables& tables) {
  const Prepared& p = tables.p;
  const int64_t T = p.T;
  const int64_t W = kernel.width;
  at::Tensor rows = at::zeros({per_tensor ? T : 1, W}, at::dtype(at::kDouble));
  if (T == 0) return rows;
  auto in_block_pass = [&](int64_t t) { return p.numel[t] <= kSmallNumel; };
  std::vector<double>& small_rows = tables.small_rows;  // partial row of such a position
  small_rows.resize(static_cast<size_t>(T * W));

  // Block pass: the small positions, in blocks of kBlock positions handed out in order.
  const int64_t nblocks = (T + kBlock - 1) / kBlock;
  std::atomic<bool> any_large{false};
  parallel_dynamic(nblocks, [&](std::atomic<int64_t>& next) {
    void* scratch = thread_scratch();
    for (int64_t blk = next++; blk < nblocks; blk = next++) {
      const int64_t b = blk * kBlock, e = std::min(T, b + kBlock);
      for (int64_t t = b; t < e; ++t) {
        if (!in_block_pass(t)) {
          any_large.store(true, std::memory_order_relaxed);
        } else if (p.numel[t] > 0) {
          const CpuTriple tr{p.g.data() + t * K, p.x[t], p.r[t], p.g_dt[t], p.x_dt[t], p.r_dt[t]};
          kernel.fn(tr, static_cast<int32_t>(K), 0, p.numel[t], kernel.weight_decay, scratch,
                    small_rows.data() + t * W);
        }
      }
    }
  });

  // Chunk pass: the other positions, in chunks of kCpuChunk elements (chunk q of position t
  // writes chunk_rows[first[t] + q]). The values are those a single chunk [0, numel) of the
  // block pass would give, so results do not depend on the path a position took.
  std::vector<int64_t> first;
  std::vector<std::pair<int64_t, int64_t>> chunks;  // (position, chunk)
  if (any_large.load()) first.assign(T + 1, 0);
  for (int64_t t = 0; t < static_cast<int64_t>(first.size()) - 1; ++t) {
    first[t] = static_cast<int64_t>(chunks.size());
    if (in_block_pass(t)) continue;
    for (int64_t q = 0; q * kCpuChunk < p.numel[t]; ++q) chunks.emplace_back(t, q);
  }
  const int64_t nchunks = static_cast<int64_t>(chunks.size());
  if (!first.empty()) first[T] = nchunks;
  std::vector<double> chunk_rows(static_cast<size_t>(nchunks * W));
  parallel_dynamic(nchunks, [&](std::atomic<int64_t>& next) {
    void* scratch = thread_scratch();
    for (int64_t c = next++; c < nchunks; c = next++) {
      const int64_t t = chunks[c].first, b = chunks[c].second * kCpuChunk;
      const CpuTriple tr{p.g.data() + t * K, p.x[t], p.r[t], p.g_dt[t], p.x_dt[t], p.r_dt[t]};
      kernel.fn(tr, static_cast<int32_t>(K), b, std::min(p.numel[t], b + kCpuChunk),
                kernel.weight_decay, scratch, chunk_rows.data() + c * W);
    }
  });

  // Fixed-order combine in fp64: positions in order, the chunks of each in order.
  double* out = rows.data_ptr<double>();
  for (int64_t t = 0; t < T; ++t) {
    double* row = out + (per_tensor ? t * W : 0);
    if (in_block_pass(t)) {
      if (p.numel[t] > 0) {
        for (int64_t w = 0; w < W; ++w) row[w] += small_rows[t * W + w];
      }
      continue;
    }
    for (int64_t c = first[t]; c < first[t + 1]; ++c) {
      for (int64_t w = 0; w < W; ++w) row[w] += chunk_rows[c * W + w];
    }
  }
  return rows;
}

at::Tensor cpu_kernel_rows(const char* op, const Inputs& in, int64_t K, const ListNames& names,
                           bool per_tensor, const CpuKernel& kernel) {
  CpuTablesLease lease;
  cpu_check(op, in, K, names, lease.get());
  return cpu_compute(K, per_tensor, kernel, lease.get());
}

// [T or 1][K][3] rows on the CPU.
at::Tensor cpu_rows(const char* op, const Inputs& in, int64_t K, bool per_tensor, double wd) {
  check_lengths(op, static_cast<int64_t>(in.grads.size()), static_cast<int64_t>(in.params.size()),
                static_cast<int64_t>(in.refs.size()), K, kGradNames);  // before 3 * K
  const CpuKernel kernel{3 * K, &cpu_chunk_partials, wd};
  return cpu_kernel_rows(op, in, K, kGradNames, per_tensor, kernel).view({-1, K, 3});
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

void gram_kernel(const CpuTriple& t, int32_t K, int64_t begin, int64_t end, double /*wd*/,
                 void* scratch, double* out) {
  cpu_gram_partials(t, K, begin, end, scratch, out);
}

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
