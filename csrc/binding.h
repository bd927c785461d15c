// Shared by the CPU and CUDA bindings: input validation and conversion of tensor lists
// into the raw pointers of the torch-free core. One place for every error message.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "plan.h"
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

  // Tables sized for T positions of K lists (contents filled by the caller).
  void resize(int64_t positions, int64_t lists) {
    T = positions;
    K = lists;
    g.resize(T * K);
    numel.resize(T);
    x.resize(T);
    r.resize(T);
    g_dt.resize(T);
    x_dt.resize(T);
    r_dt.resize(T);
  }
};

// The three input lists as pointers to tensors owned elsewhere (by the dispatcher's argument
// vectors, or by the Python objects of the direct entry point): no refcount traffic.
struct Inputs {
  std::vector<const at::Tensor*> grads, params, refs;  // grads: K lists back to back
  // Their TensorImpls, taken with the pointers: the CPU pass checks and prefetches the
  // metadata from these contiguous tables, without going back to the (Python) objects that
  // hold the tensors, each a dependent cache miss before the prefetch can even start.
  std::vector<const c10::TensorImpl*> grad_impls, param_impls, ref_impls;
  // Strong references to the tensors above, taken by the direct entry point before it runs
  // code that may call back into Python (a tensor subclass's __torch_dispatch__ reached from
  // a check or a copy), which could drop the objects the pointers were borrowed from.
  std::vector<at::Tensor> owned;

  // Points grads/params/refs at strong references held in `owned`.
  void own();
};

Inputs inputs_of(at::TensorList grads, at::TensorList params, at::TensorList refs);

// What the messages call the K vector lists of an op: "grads[k][i]", "num_grads", "the K
// gradients of one tensor" for the secant ops, "vecs[k][i]" ... for secant_gram.
struct ListNames {
  const char* list;
  const char* count;
  const char* noun;
};
inline constexpr ListNames kGradNames{"grads", "num_grads", "gradients"};
inline constexpr ListNames kVecNames{"vecs", "num_vecs", "vectors"};

// Validates the inputs and converts them. `grads` holds K lists of T tensors back to back
// (grads[k * T + i]). Raises ValueError / TypeError naming the offending index.
Prepared prepare_inputs(const char* op, const Inputs& in, int64_t K,
                        const ListNames& names = kGradNames);

// Output layout shared by the backends: [T or 1][K][3] float64 -> the op's shape.
at::Tensor shape_output(const at::Tensor& rows, int64_t K, bool per_tensor, bool multi);

// [T or 1][K][3] rows, per device type. The CUDA one is set by ops_cuda.cpp when built.
using RowsFn = at::Tensor (*)(const char* op, const Inputs& in, int64_t K, bool per_tensor,
                              double weight_decay);
at::Tensor cpu_rows(const char* op, const Inputs& in, int64_t K, bool per_tensor, double wd);
extern RowsFn cuda_rows_fn;
// The CUDA rows of inputs already checked by prepare_inputs (the direct entry point checks
// with the GIL held, then launches without it). Set by ops_cuda.cpp when built.
using PreparedRowsFn = at::Tensor (*)(const Prepared& p, int64_t K, bool per_tensor, double weight_decay);
extern PreparedRowsFn cuda_prepared_rows_fn;

// The host side of a CUDA call, up to the copy and the launches: the plan of the checked
// inputs (tensors grouped by dtype combination) and the layout of its device table
// (plan.h). Compiled into every build, so that its cost is measured on CPU tensors too
// (pathgeom_fast._C.cuda_host_work, `pathgeom bench --cases host`).
struct CudaHostTable {
  CudaPlan plan;
  std::vector<CudaTableLaunch> layout;
  int64_t words = 0;  // table size in int64 words
};
CudaHostTable cuda_host_table(const Prepared& p, int64_t K);
// Writes the table of `t` into words[0 .. t.words).
void cuda_host_fill(const Prepared& p, const CudaHostTable& t, int64_t* words);

// "list[j]" for one list, "list[k][i]" for K lists of T tensors back to back.
std::string grad_name(int64_t j, int64_t T, int64_t K, const ListNames& names = kGradNames);

// Raises the ValueError of mismatched list lengths (or of K < 1): ng vectors in the K lists,
// nx params, nr refs. Overflow-free for any K.
void check_lengths(const char* op, int64_t ng, int64_t nx, int64_t nr, int64_t K,
                   const ListNames& names);

// A CPU kernel of secant_core.h: elements [begin, end) of one tensor position -> `width` fp64
// values (weight_decay is passed through; kernels without one ignore it).
struct CpuKernel {
  int64_t width;
  void (*fn)(const CpuTriple& t, int32_t K, int64_t begin, int64_t end, double weight_decay,
             void* scratch, double* out);
  double weight_decay;
};

// [T or 1][width] float64 rows of `kernel` over the inputs on the CPU: validation, chunking,
// the parallel pass and the fixed-order combine shared by every CPU op.
at::Tensor cpu_kernel_rows(const char* op, const Inputs& in, int64_t K, const ListNames& names,
                           bool per_tensor, const CpuKernel& kernel);

// The same in two steps, for callers that hold the GIL during the checks only.
// cpu_check: every check (raises ValueError / TypeError naming the offending index) and the
// tables of the pass (contiguous copies where needed). It may run Python code (a tensor
// subclass's __torch_dispatch__, reached by a copy), never on the intra-op threads.
// cpu_compute: the kernels over the checked tables; no Python, no tensor metadata.
struct CpuTables;
class CpuTablesLease {  // the calling thread's kept tables, or fresh ones in a nested call
 public:
  CpuTablesLease();
  ~CpuTablesLease();
  CpuTablesLease(const CpuTablesLease&) = delete;
  CpuTablesLease& operator=(const CpuTablesLease&) = delete;
  CpuTables& get() { return *tables_; }

 private:
  CpuTables* tables_;
  bool kept_;
};
void cpu_check(const char* op, const Inputs& in, int64_t K, const ListNames& names, CpuTables& tables);
at::Tensor cpu_compute(int64_t K, bool per_tensor, const CpuKernel& kernel, CpuTables& tables);

// secant_gram's CPU kernel and shapes (registration.cpp), shared with the direct entry point:
// raises unless 1 <= num_vecs <= kGramMaxVecs; the kernel of num_vecs vectors; [T or 1] rows
// -> [M, M] or [T, M, M], M = num_vecs + 1.
void check_num_vecs(int64_t num_vecs);
CpuKernel gram_kernel_of(int64_t num_vecs);
at::Tensor gram_shape(const at::Tensor& rows, int64_t num_vecs, bool per_tensor);

}  // namespace pathgeom
