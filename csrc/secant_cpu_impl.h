// CPU kernel body, included by secant_cpu.cpp once per instruction set (inside a namespace
// and a `#pragma GCC target` region), so that one binary carries AVX-512, AVX2 and baseline
// versions chosen at run time. No includes here: secant_cpu.cpp includes what it needs first.
//
// Arithmetic: fp32 products (fp64 when an input is fp64), accumulated in kLanes independent
// lanes (independent dependency chains the compiler maps onto vector registers), flushed to
// fp64 lanes every kTile elements, summed in fp64 at the end of the chunk.

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

// IEEE half -> float without branches so that the loops vectorise: shifting the exponent
// and mantissa into float position and multiplying by 2^112 rebiases normal and subnormal
// numbers exactly; Inf and NaN (exponent 31) are patched by a select.
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

constexpr int64_t kTile = 1024;
// Multi: long tiles (a whole CPU chunk) so that each of the K + 2 streams is read in runs the
// hardware prefetcher follows (0.79 of the probe for K = 8, against 0.57 with 2048-element
// tiles); d and x (2 x 128 KiB in fp32) stay in L2. Each fp32 lane then sums up to
// kMultiTile / kLanes = 1024 products before the fp64 combine (measured error 2e-8 relative).
constexpr int64_t kMultiTile = 32768;
constexpr int kLanes = 32;

// One gradient list: a single fused pass over g, x and x*.
template <typename Acc, typename TG, typename TX, typename TR, bool WD>
void chunk_one(const TG* __restrict__ g, const TX* __restrict__ x, const TR* __restrict__ r,
               int64_t begin, int64_t end, Acc wd, double* out) {
  double da[kLanes] = {}, db[kLanes] = {}, dc[kLanes] = {};
  for (int64_t t0 = begin; t0 < end; t0 += kTile) {
    const int64_t n = std::min(kTile, end - t0);
    const int64_t nv = n / kLanes * kLanes;
    Acc sa[kLanes] = {}, sb[kLanes] = {}, sc[kLanes] = {};
    for (int64_t i = t0; i < t0 + nv; i += kLanes) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        const Acc xv = load<Acc>(x, i + j);
        const Acc d = xv - load<Acc>(r, i + j);
        Acc h = load<Acc>(g, i + j);
        if (WD) h += wd * xv;
        sa[j] += h * d;
        sb[j] += h * h;
        sc[j] += d * d;
      }
    }
    for (int64_t i = t0 + nv; i < t0 + n; ++i) {
      const int j = static_cast<int>(i - t0 - nv);
      const Acc xv = load<Acc>(x, i);
      const Acc d = xv - load<Acc>(r, i);
      Acc h = load<Acc>(g, i);
      if (WD) h += wd * xv;
      sa[j] += h * d;
      sb[j] += h * h;
      sc[j] += d * d;
    }
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      da[j] += static_cast<double>(sa[j]);
      db[j] += static_cast<double>(sb[j]);
      dc[j] += static_cast<double>(sc[j]);
    }
  }
  double a = 0, b = 0, c = 0;
  for (int j = 0; j < kLanes; ++j) {
    a += da[j];
    b += db[j];
    c += dc[j];
  }
  out[0] = a;
  out[1] = b;
  out[2] = c;
}

// K gradient lists: x and x* are read once per tile into L1-resident buffers (d = x - x*,
// and x for weight decay), then each gradient streams against them.
template <typename Acc, typename TG, typename TX, typename TR, bool WD>
void chunk_multi(const void* const* gptrs, int32_t K, const TX* __restrict__ x,
                 const TR* __restrict__ r, int64_t begin, int64_t end, Acc wd, double* out) {
  alignas(64) static thread_local Acc d[kMultiTile];
  alignas(64) static thread_local Acc xs[kMultiTile];
  double c_sum = 0.0;
  for (int32_t k = 0; k < K; ++k) out[3 * k] = out[3 * k + 1] = 0.0;
  for (int64_t t0 = begin; t0 < end; t0 += kMultiTile) {
    const int64_t n = std::min(kMultiTile, end - t0);
    const int64_t nv = n / kLanes * kLanes;
    Acc sc[kLanes] = {};
    const TX* __restrict__ xt = x + t0;
    const TR* __restrict__ rt = r + t0;
    for (int64_t i = 0; i < nv; i += kLanes) {
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        const Acc xv = load<Acc>(xt, i + j);
        const Acc di = xv - load<Acc>(rt, i + j);
        xs[i + j] = xv;
        d[i + j] = di;
        sc[j] += di * di;
      }
    }
    for (int64_t i = nv; i < n; ++i) {
      const Acc xv = load<Acc>(xt, i);
      const Acc di = xv - load<Acc>(rt, i);
      xs[i] = xv;
      d[i] = di;
      sc[i - nv] += di * di;
    }
    for (int j = 0; j < kLanes; ++j) c_sum += static_cast<double>(sc[j]);
    for (int32_t k = 0; k < K; ++k) {
      const TG* __restrict__ g = static_cast<const TG*>(gptrs[k]) + t0;
      Acc sa[kLanes] = {}, sb[kLanes] = {};
      const int64_t nv = n / kLanes * kLanes;
      for (int64_t i = 0; i < nv; i += kLanes) {
#pragma omp simd
        for (int j = 0; j < kLanes; ++j) {
          Acc h = load<Acc>(g, i + j);
          if (WD) h += wd * xs[i + j];
          sa[j] += h * d[i + j];
          sb[j] += h * h;
        }
      }
      for (int64_t i = nv; i < n; ++i) {
        Acc h = load<Acc>(g, i);
        if (WD) h += wd * xs[i];
        sa[i - nv] += h * d[i];
        sb[i - nv] += h * h;
      }
      double a = 0, b = 0;
      for (int j = 0; j < kLanes; ++j) {
        a += sa[j];
        b += sb[j];
      }
      out[3 * k] += a;
      out[3 * k + 1] += b;
    }
  }
  for (int32_t k = 0; k < K; ++k) out[3 * k + 2] = c_sum;
}

template <typename TG, typename TX, typename TR>
void dispatch_chunk(const CpuTriple& t, int32_t K, int64_t b, int64_t e, double wd, double* out) {
  constexpr bool any64 = sizeof(TG) == 8 || sizeof(TX) == 8 || sizeof(TR) == 8;
  using Acc = typename std::conditional<any64, double, float>::type;
  const TX* x = static_cast<const TX*>(t.x);
  const TR* r = static_cast<const TR*>(t.r);
  const Acc w = static_cast<Acc>(wd);
  if (K == 1) {
    const TG* g = static_cast<const TG*>(t.g[0]);
    if (wd != 0.0) chunk_one<Acc, TG, TX, TR, true>(g, x, r, b, e, w, out);
    else chunk_one<Acc, TG, TX, TR, false>(g, x, r, b, e, w, out);
  } else {
    if (wd != 0.0) chunk_multi<Acc, TG, TX, TR, true>(t.g, K, x, r, b, e, w, out);
    else chunk_multi<Acc, TG, TX, TR, false>(t.g, K, x, r, b, e, w, out);
  }
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

void chunk_partials(const CpuTriple& t, int32_t K, int64_t begin, int64_t end, double wd,
                    double* out) {
  visit_dtype(t.g_dtype, [&](auto g_tag) {
    visit_dtype(t.x_dtype, [&](auto x_tag) {
      visit_dtype(t.r_dtype, [&](auto r_tag) {
        dispatch_chunk<decltype(g_tag), decltype(x_tag), decltype(r_tag)>(t, K, begin, end, wd, out);
      });
    });
  });
}
