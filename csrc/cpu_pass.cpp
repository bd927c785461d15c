// The CPU implementation: a parallel check pass over the lists' metadata, then the parallel
// kernel passes and the fixed-order combine (cpu_check, cpu_compute, cpu_rows).
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "binding.h"
#include "metadata.h"

namespace pathgeom {

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

}  // namespace pathgeom
