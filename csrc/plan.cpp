// See plan.h.
#include "plan.h"

#include <algorithm>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>

namespace pathgeom {

CudaPlan plan_cuda(const int64_t* numel, const int32_t* key, int64_t T, int64_t K,
                   const CudaPlanLimits& lim) {
  if (T < 0 || K < 1) throw std::invalid_argument("plan_cuda: need T >= 0 and K >= 1");
  if (lim.max_tensors < 1 || lim.max_grads_per_pass < 1 || lim.chunk < 1 || lim.max_blocks < 1) {
    throw std::invalid_argument("plan_cuda: limits must be >= 1");
  }
  CudaPlan plan;
  for (int64_t k0 = 0; k0 < K; k0 += lim.max_grads_per_pass) {
    plan.passes.emplace_back(k0, std::min(lim.max_grads_per_pass, K - k0));
  }
  // Tensors per launch: bounded by the table sizes (pointers for the widest pass).
  const int64_t kc_max = std::min(K, lim.max_grads_per_pass);
  const int64_t per_launch = std::min(lim.max_tensors, lim.max_ptrs / (kc_max + 2));
  if (per_launch < 1) throw std::invalid_argument("plan_cuda: max_ptrs too small for one tensor");

  std::map<int32_t, std::vector<int64_t>> groups;
  for (int64_t t = 0; t < T; ++t) {
    if (numel[t] < 0) throw std::invalid_argument("plan_cuda: negative numel at " + std::to_string(t));
    groups[key[t]].push_back(t);
  }
  auto nchunks_of = [&](int64_t n) { return n / lim.chunk + (n % lim.chunk != 0); };
  for (const auto& kv : groups) {
    const std::vector<int64_t>& ts = kv.second;
    size_t s = 0;
    while (s < ts.size()) {
      CudaPlanLaunch L;
      L.key = kv.first;
      L.chunk_offset = plan.total_chunks;
      L.chunk_start.push_back(0);
      while (s < ts.size() && static_cast<int64_t>(L.tensors.size()) < per_launch) {
        const int64_t n = nchunks_of(numel[ts[s]]);
        if (n > lim.max_blocks) {
          throw std::invalid_argument("plan_cuda: tensor " + std::to_string(ts[s]) + " has more chunks than blocks per launch");
        }
        if (L.chunk_start.back() + n > lim.max_blocks) break;
        L.tensors.push_back(ts[s]);
        L.chunk_start.push_back(L.chunk_start.back() + n);
        ++s;
      }
      plan.total_chunks += L.chunk_start.back();
      plan.launches.push_back(std::move(L));
    }
  }
  return plan;
}

int64_t cuda_table_layout(const CudaPlan& plan, int64_t K, std::vector<CudaTableLaunch>& out) {
  out.resize(plan.launches.size());
  int64_t words = 0;
  for (size_t l = 0; l < plan.launches.size(); ++l) {
    const CudaPlanLaunch& L = plan.launches[l];
    CudaTableLaunch& t = out[l];
    t.base = words;
    t.ntensors = static_cast<int64_t>(L.tensors.size());
    t.nblocks = L.chunk_start.back();
    words = t.ptrs_at() + t.ntensors * (K + 2);
  }
  return words;
}

void cuda_table_fill(const CudaPlan& plan, const std::vector<CudaTableLaunch>& layout, int64_t K,
                     const int64_t* numel, const void* const* g, const void* const* x,
                     const void* const* r, int64_t* words) {
  auto address = [](const void* p) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(p)); };
  for (size_t l = 0; l < plan.launches.size(); ++l) {
    const CudaPlanLaunch& L = plan.launches[l];
    const CudaTableLaunch& t = layout[l];
    const int64_t nt = t.ntensors;
    std::copy(L.chunk_start.begin(), L.chunk_start.end(), words + t.base);
    int64_t* n = words + t.numel_at();
    int64_t* index = words + t.tensor_index_at();
    int64_t* block = words + t.block_tensor_at();
    int64_t* ptrs = words + t.ptrs_at();
    for (int64_t j = 0; j < nt; ++j) {
      const int64_t pos = L.tensors[j];
      n[j] = numel[pos];
      index[j] = pos;
      for (int64_t b = L.chunk_start[j]; b < L.chunk_start[j + 1]; ++b) block[b] = j;
      int64_t* row = ptrs + j * (K + 2);
      for (int64_t k = 0; k < K; ++k) row[k] = address(g[pos * K + k]);
      row[K] = address(x[pos]);
      row[K + 1] = address(r[pos]);
    }
  }
}

}  // namespace pathgeom
