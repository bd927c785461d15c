// See plan.h.
#include "plan.h"

#include <algorithm>
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

}  // namespace pathgeom
