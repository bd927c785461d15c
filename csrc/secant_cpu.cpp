// CPU kernel: fp32 products (fp64 when an input is fp64), SIMD over tiles of 512 elements,
// fp64 sums of the tile partials. Torch-free; the binding parallelises across chunks.
#include "secant_core.h"

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace pathgeom {
namespace {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// IEEE half -> float without branches so that the tile loops vectorise: shifting the
// exponent and mantissa into float position and multiplying by 2^112 rebiases normal and
// subnormal numbers exactly; Inf and NaN (exponent 31) are patched by a select.
inline float to_acc_float(Half h) {
  const uint32_t em = h.bits & 0x7fffu;
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const float scaled = bits_to_float(em << 13) * 0x1p112f;
  const uint32_t finite = float_to_bits(scaled);
  const uint32_t special = (em << 13) | 0x7f800000u;
  return bits_to_float((em >= 0x7c00u ? special : finite) | sign);
}
inline float to_acc_float(BFloat16 h) { return bits_to_float(static_cast<uint32_t>(h.bits) << 16); }
inline float to_acc_float(float v) { return v; }
inline double to_acc_float(double v) { return v; }

template <typename Acc, typename T>
inline Acc load(const T* p, int64_t i) {
  return static_cast<Acc>(to_acc_float(p[i]));
}

constexpr int64_t kTile = 512;

template <typename Acc, typename TG, typename TX, typename TR>
void chunk_partials(const CpuTriple& t, int32_t K, int64_t begin, int64_t end, double wd_d,
                    double* out) {
  const TX* __restrict__ x = static_cast<const TX*>(t.x);
  const TR* __restrict__ r = static_cast<const TR*>(t.r);
  const Acc wd = static_cast<Acc>(wd_d);
  const bool with_wd = wd_d != 0.0;
  alignas(64) Acc d[kTile];
  alignas(64) Acc xs[kTile];
  double c_sum = 0.0;
  for (int32_t k = 0; k < K; ++k) out[3 * k] = out[3 * k + 1] = 0.0;

  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int64_t n = std::min(kTile, end - t0);
    const TX* __restrict__ xt = x + t0;
    const TR* __restrict__ rt = r + t0;
    Acc cs = 0;
#pragma omp simd reduction(+ : cs)
    for (int64_t i = 0; i < n; ++i) {
      const Acc xi = load<Acc>(xt, i);
      const Acc di = xi - load<Acc>(rt, i);
      xs[i] = xi;
      d[i] = di;
      cs += di * di;
    }
    c_sum += static_cast<double>(cs);
    for (int32_t k = 0; k < K; ++k) {
      const TG* __restrict__ g = static_cast<const TG*>(t.g[k]) + t0;
      Acc as = 0, bs = 0;
      if (with_wd) {
#pragma omp simd reduction(+ : as, bs)
        for (int64_t i = 0; i < n; ++i) {
          const Acc gi = load<Acc>(g, i) + wd * xs[i];
          as += gi * d[i];
          bs += gi * gi;
        }
      } else {
#pragma omp simd reduction(+ : as, bs)
        for (int64_t i = 0; i < n; ++i) {
          const Acc gi = load<Acc>(g, i);
          as += gi * d[i];
          bs += gi * gi;
        }
      }
      out[3 * k] += static_cast<double>(as);
      out[3 * k + 1] += static_cast<double>(bs);
    }
  }
  for (int32_t k = 0; k < K; ++k) out[3 * k + 2] = c_sum;
}

// fp64 arithmetic when any input of the triple is fp64, fp32 otherwise.
template <typename TG, typename TX, typename TR>
void dispatch_acc(const CpuTriple& t, int32_t K, int64_t b, int64_t e, double wd, double* out) {
  constexpr bool any64 = sizeof(TG) == 8 || sizeof(TX) == 8 || sizeof(TR) == 8;
  using Acc = typename std::conditional<any64, double, float>::type;
  chunk_partials<Acc, TG, TX, TR>(t, K, b, e, wd, out);
}


template <typename F>
void visit_dtype(DType d, F&& f) {
  switch (d) {
    case DType::kFloat16: f(Half{}); break;
    case DType::kBFloat16: f(BFloat16{}); break;
    case DType::kFloat32: f(float{}); break;
    case DType::kFloat64: f(double{}); break;
  }
}

}  // namespace

void cpu_chunk_partials(const CpuTriple& t, int32_t K, int64_t begin, int64_t end,
                        double weight_decay, double* out) {
  visit_dtype(t.g_dtype, [&](auto g_tag) {
    visit_dtype(t.x_dtype, [&](auto x_tag) {
      visit_dtype(t.r_dtype, [&](auto r_tag) {
        dispatch_acc<decltype(g_tag), decltype(x_tag), decltype(r_tag)>(t, K, begin, end,
                                                                       weight_decay, out);
      });
    });
  });
}

}  // namespace pathgeom
