// Tensor-metadata helpers shared by the input checks (inputs.cpp), the CPU pass
// (cpu_pass.cpp) and the direct Python entry point (python_entry.cpp). The hot ones run per
// tensor position on 10^4-tensor lists: they are inline here so that every pass keeps them
// inlined (no cross-file calls; the build has no LTO).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <vector>

#include "binding.h"

namespace pathgeom {

// The tables of the CPU pass (cpu_check fills them, cpu_compute reads them; the direct entry
// point hands the checked pointers to the CUDA kernels).
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

// "shape [2, 3], torch.float32, cpu": how the error messages name a tensor.
std::string describe(const at::Tensor& t);

inline bool to_dtype(at::ScalarType t, DType* out) {
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
inline bool unusual(const c10::TensorImpl* t) {
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
inline constexpr int64_t kAheadImpl = 16, kAheadStorage = 8;

// Every cache line of an object (malloc aligns to 16 bytes only: a 176-byte TensorImpl spans
// 3 or 4 lines, and the checks read fields at both ends).
template <size_t kBytes>
inline void prefetch_object(const void* p) {
  const char* c = static_cast<const char*>(p);
  for (size_t b = 0; b < kBytes; b += 64) __builtin_prefetch(c + b);
  __builtin_prefetch(c + kBytes - 1);
}

// Of a TensorImpl, the checks read the storage pointer (near its start) and the fields at its
// end (storage offset, numel, dtype, device, flags, dispatch keys; with torch 2.14, bytes
// 144-175 of 176); sizes and strides only for non-contiguous tensors, which are rare. Fetching
// just those lines leaves the CPU's few outstanding-miss slots to the other objects (on 10^4
// positions, all lines of every object: the prefetches themselves stall on full fill buffers).
inline void prefetch_impl(const c10::TensorImpl* t) {
  const char* c = reinterpret_cast<const char*>(t);
  __builtin_prefetch(c + 16);
  __builtin_prefetch(c + sizeof(c10::TensorImpl) - 32);
  __builtin_prefetch(c + sizeof(c10::TensorImpl) - 1);
}

// An undefined tensor's impl is the UndefinedTensorImpl singleton, which has no storage.
inline const c10::StorageImpl* storage_of(const c10::TensorImpl* t) {
  if (t == c10::UndefinedTensorImpl::singleton()) return nullptr;
  return t->unsafe_storage().unsafeGetStorageImpl();
}

inline void prefetch_storage(const c10::TensorImpl* t) {
  if (const c10::StorageImpl* s = storage_of(t)) prefetch_object<sizeof(c10::StorageImpl)>(s);
}

// Calls f on the TensorImpls of params[i], refs[i] and the K vectors of position i.
template <typename F>
inline void for_each_impl(const Inputs& in, int64_t T, int64_t K, int64_t i, F&& f) {
  f(in.param_impls[i]);
  f(in.ref_impls[i]);
  for (int64_t k = 0; k < K; ++k) f(in.grad_impls[k * T + i]);
}

// Prefetches the metadata of the positions checked after position i, up to `end`.
inline void prefetch_position(const Inputs& in, int64_t end, int64_t T, int64_t K, int64_t i) {
  if (i + kAheadImpl < end) for_each_impl(in, T, K, i + kAheadImpl, prefetch_impl);
  if (i + kAheadStorage < end) for_each_impl(in, T, K, i + kAheadStorage, prefetch_storage);
}

// Runs worker(next) on each intra-op thread (one call inline when a single thread would do);
// the workers take indices in order from the shared counter `next`, so a thread slowed down
// (by another process on its core, by farther memory) simply takes fewer of them. Results
// must not depend on which thread runs which index: here every index writes its own slots.
template <typename F>
inline void parallel_dynamic(int64_t n, F&& worker) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), n);
  if (workers <= 1 || at::in_parallel_region()) {
    worker(next);
    return;
  }
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(next); });
}

}  // namespace pathgeom
