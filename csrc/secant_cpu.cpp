// CPU kernel entry points: the body (secant_cpu_impl.h) compiled for AVX-512, AVX2+FMA and
// baseline x86-64 (or just the baseline elsewhere), dispatched once on the running CPU.
// Torch-free; the binding parallelises across chunks.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "secant_core.h"

namespace pathgeom {

#if defined(__x86_64__) && defined(__GNUC__)
#define PATHGEOM_MULTIVERSION 1
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
namespace isa_avx512 {
#include "secant_cpu_impl.h"
}
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace isa_avx2 {
#include "secant_cpu_impl.h"
}
#pragma GCC pop_options
#endif

namespace isa_base {
#include "secant_cpu_impl.h"
}

namespace {

using ChunkFn = void (*)(const CpuTriple&, int32_t, int64_t, int64_t, double, void*, double*);
using GramFn = void (*)(const CpuTriple&, int32_t, int64_t, int64_t, void*, double*);

struct Kernels {
  ChunkFn chunk;
  GramFn gram;
  const char* isa;
};

Kernels pick() {
#ifdef PATHGEOM_MULTIVERSION
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    return {&isa_avx512::chunk_partials, &isa_avx512::gram_partials, "avx512"};
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    return {&isa_avx2::chunk_partials, &isa_avx2::gram_partials, "avx2"};
  }
#endif
  return {&isa_base::chunk_partials, &isa_base::gram_partials, "baseline"};
}

const Kernels kKernels = pick();

}  // namespace

void cpu_chunk_partials(const CpuTriple& t, int32_t K, int64_t begin, int64_t end,
                        double weight_decay, void* scratch, double* out) {
  kKernels.chunk(t, K, begin, end, weight_decay, scratch, out);
}

void cpu_gram_partials(const CpuTriple& t, int32_t K, int64_t begin, int64_t end, void* scratch,
                       double* out) {
  kKernels.gram(t, K, begin, end, scratch, out);
}

const char* cpu_isa() { return kKernels.isa; }

}  // namespace pathgeom
