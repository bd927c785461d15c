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

// Pairwise sum of kLanes fp64 lanes in a fixed order: five dependent additions instead of a
// chain of 32 (the fixed cost of a short tensor is mostly this final reduction). The widths
// are compile-time constants so that the levels stay in vector registers: with the width a
// loop variable, GCC 13 went through the stack with scalar loops for the last levels. Same
// sums, bit for bit; 10^4 one-element positions (all fixed cost) went from 0.93-1.02 ms to
// 0.68-0.80 ms with this and the grouped pass of the CPU pass (then in ops.cpp), which alone gave ~4%.
template <int W>
inline void tree_level(double* v) {
#pragma omp simd
  for (int j = 0; j < W; ++j) v[j] += v[j + W];
}
inline double tree_sum(double* v) {
  static_assert(kLanes == 32, "tree_sum is written out for 32 lanes");
  tree_level<16>(v);
  tree_level<8>(v);
  tree_level<4>(v);
  tree_level<2>(v);
  tree_level<1>(v);
  return v[0];
}

// One tile of chunk_one: elements [t0, t0 + n), n <= kTile, into the kLanes lanes.
template <typename Acc, typename TG, typename TX, typename TR, bool WD>
inline void tile_one(const TG* __restrict__ g, const TX* __restrict__ x, const TR* __restrict__ r,
                     int64_t t0, int64_t n, Acc wd, Acc* __restrict__ sa, Acc* __restrict__ sb,
                     Acc* __restrict__ sc) {
  const int64_t nv = n / kLanes * kLanes;
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
  if (nv < n) {  // the last n - nv < kLanes elements: masked loads, not a scalar loop
    // Lanes past the end get zeros and add +0 to their sums, which are never -0 (they start
    // at +0), so the sums are those of a masked update, bit for bit. A masked update made GCC
    // 13 keep the lanes on the stack with masked stores, read back at full width: a
    // store-forwarding stall per tensor (22% of the kernel's samples on 10^4 1-element tensors).
    const int64_t i = t0 + nv;
    const int rem = static_cast<int>(n - nv);
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const bool in = j < rem;
      const Acc xv = in ? load<Acc>(x, i + j) : Acc(0);
      const Acc d = xv - (in ? load<Acc>(r, i + j) : Acc(0));
      Acc h = in ? load<Acc>(g, i + j) : Acc(0);
      if (WD) h = in ? h + wd * xv : Acc(0);
      sa[j] += h * d;
      sb[j] += h * h;
      sc[j] += d * d;
    }
  }
}

// One gradient list: a single fused pass over g, x and x*. Each tile's lanes are added to
// fp64 lanes, whose tree sums are the results. A chunk of one tile (any tensor of up to
// kTile elements) skips the fp64 lanes: the same sums, for a third of the fixed cost.
template <typename Acc, typename TG, typename TX, typename TR, bool WD>
void chunk_one(const TG* __restrict__ g, const TX* __restrict__ x, const TR* __restrict__ r,
               int64_t begin, int64_t end, Acc wd, double* out) {
  double da[kLanes], db[kLanes], dc[kLanes];
  if (end - begin <= kTile) {
    Acc sa[kLanes] = {}, sb[kLanes] = {}, sc[kLanes] = {};
    tile_one<Acc, TG, TX, TR, WD>(g, x, r, begin, end - begin, wd, sa, sb, sc);
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      da[j] = static_cast<double>(sa[j]);
      db[j] = static_cast<double>(sb[j]);
      dc[j] = static_cast<double>(sc[j]);
    }
  } else {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) da[j] = db[j] = dc[j] = 0.0;
    for (int64_t t0 = begin; t0 < end; t0 += kTile) {
      Acc sa[kLanes] = {}, sb[kLanes] = {}, sc[kLanes] = {};
      tile_one<Acc, TG, TX, TR, WD>(g, x, r, t0, std::min(kTile, end - t0), wd, sa, sb, sc);
#pragma omp simd
      for (int j = 0; j < kLanes; ++j) {
        da[j] += static_cast<double>(sa[j]);
        db[j] += static_cast<double>(sb[j]);
        dc[j] += static_cast<double>(sc[j]);
      }
    }
  }
  out[0] = tree_sum(da);
  out[1] = tree_sum(db);
  out[2] = tree_sum(dc);
}

// K gradient lists: x and x* are read once per tile into L1-resident buffers (d = x - x*,
// and x for weight decay), then each gradient streams against them.
//
// The two tiles live in the caller's scratch buffer. (They were `static thread_local` arrays
// once: one pair per template instantiation and instruction set made the library's TLS block
// 151 MB, allocated and zeroed in full by every thread that ran any of its code.)
template <typename Acc, typename TG, typename TX, typename TR, bool WD>
void chunk_multi(const void* const* gptrs, int32_t K, const TX* __restrict__ x,
                 const TR* __restrict__ r, int64_t begin, int64_t end, Acc wd, void* scratch,
                 double* out) {
  static_assert(2 * kMultiTile * sizeof(Acc) <= kCpuScratchBytes, "scratch too small");
  Acc* __restrict__ d = static_cast<Acc*>(scratch);
  Acc* __restrict__ xs = d + kMultiTile;
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
void dispatch_chunk(const CpuTriple& t, int32_t K, int64_t b, int64_t e, double wd, void* scratch,
                    double* out) {
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
    if (wd != 0.0) chunk_multi<Acc, TG, TX, TR, true>(t.g, K, x, r, b, e, w, scratch, out);
    else chunk_multi<Acc, TG, TX, TR, false>(t.g, K, x, r, b, e, w, scratch, out);
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
                    void* scratch, double* out) {
  visit_dtype(t.g_dtype, [&](auto g_tag) {
    visit_dtype(t.x_dtype, [&](auto x_tag) {
      visit_dtype(t.r_dtype, [&](auto r_tag) {
        dispatch_chunk<decltype(g_tag), decltype(x_tag), decltype(r_tag)>(t, K, begin, end, wd,
                                                                          scratch, out);
      });
    });
  });
}

// ---------------------------------------------------------------------------------------
// Gram matrix of K vectors and d = x - x* (cpu_gram_partials in secant_core.h).
//
// Per tile of GramTile<Acc> elements (as long as the scratch buffer allows, so that every
// stream is read in long runs the hardware prefetchers follow), each of the K + 2 input
// streams is read once and converted into an Acc row of the scratch buffer (d = x - x*
// computed there); the M (M + 1) / 2 inner products then run over these rows, from L2, up to
// four at a time so that a row is loaded once for four products. Each product accumulates
// kTile elements in kLanes Acc lanes (32 products per lane, as chunk_one), added to the pair's
// fp64 lanes, which are tree-summed at the end of the chunk. Only the conversions depend on the input dtypes: the
// products are compiled once per accumulator type, not once per dtype combination.
// ---------------------------------------------------------------------------------------

template <typename Acc>
constexpr int64_t GramTile() {
  return kCpuScratchBytes / ((kGramMaxVecs + 1) * sizeof(Acc)) / kTile * kTile;
}

template <typename Acc, typename T>
void to_acc_row(const T* __restrict__ src, int64_t n, Acc* __restrict__ dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = load<Acc>(src, i);
}

template <typename Acc, typename TX, typename TR>
void diff_row(const TX* __restrict__ x, const TR* __restrict__ r, int64_t n, Acc* __restrict__ dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = load<Acc>(x, i) - load<Acc>(r, i);
}

// lanes[c][j] += lane j of sum_i a[i] * b[c][i], for c < C and n <= kTile: kLanes Acc lanes
// per product (each sums n / kLanes products), added to fp64 lanes.
template <int C, typename Acc>
inline void lane_dots(const Acc* __restrict__ a, const Acc* const* b, int64_t n, double* const* lanes) {
  Acc s[C][kLanes];
  for (int c = 0; c < C; ++c) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) s[c][j] = Acc(0);
  }
  const int64_t nv = n / kLanes * kLanes;
  for (int64_t i = 0; i < nv; i += kLanes) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const Acc av = a[i + j];
      for (int c = 0; c < C; ++c) s[c][j] += av * b[c][i + j];
    }
  }
  const int rem = static_cast<int>(n - nv);
#pragma omp simd
  for (int j = 0; j < kLanes; ++j) {
    if (j < rem) {
      const Acc av = a[nv + j];
      for (int c = 0; c < C; ++c) s[c][j] += av * b[c][nv + j];
    }
  }
  for (int c = 0; c < C; ++c) {
    double* __restrict__ l = lanes[c];
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) l[j] += static_cast<double>(s[c][j]);
  }
}

template <typename Acc>
void gram_chunk(const CpuTriple& t, int32_t K, int64_t begin, int64_t end, void* scratch,
                double* out) {
  constexpr int64_t kGramTile = GramTile<Acc>();
  static_assert(kGramTile >= kTile, "scratch too small");
  const int M = K + 1;
  Acc* rows[kGramMaxVecs + 1];
  for (int m = 0; m < M; ++m) rows[m] = static_cast<Acc*>(scratch) + m * kGramTile;
  // fp64 lanes of pair (i, j), i <= j; tree-summed once, at the end of the chunk
  alignas(64) double lanes[(kGramMaxVecs + 1) * (kGramMaxVecs + 1)][kLanes];
  for (int i = 0; i < M; ++i) {
    for (int j = i; j < M; ++j) {
#pragma omp simd
      for (int l = 0; l < kLanes; ++l) lanes[i * M + j][l] = 0.0;
    }
  }
  for (int64_t t0 = begin; t0 < end; t0 += kGramTile) {
    const int64_t n = std::min(kGramTile, end - t0);
    for (int32_t k = 0; k < K; ++k) {
      visit_dtype(t.g_dtype, [&](auto tag) {
        to_acc_row(static_cast<const decltype(tag)*>(t.g[k]) + t0, n, rows[k]);
      });
    }
    visit_dtype(t.x_dtype, [&](auto x_tag) {
      visit_dtype(t.r_dtype, [&](auto r_tag) {
        diff_row(static_cast<const decltype(x_tag)*>(t.x) + t0,
                 static_cast<const decltype(r_tag)*>(t.r) + t0, n, rows[K]);
      });
    });
    for (int64_t s0 = 0; s0 < n; s0 += kTile) {
      const int64_t m = std::min(kTile, n - s0);
      for (int i = 0; i < M; ++i) {
        // products of row i with rows j = i .. M - 1, four at a time
        for (int j = i; j < M; j += 4) {
          const Acc* b[4] = {};
          double* o[4] = {};
          for (int c = 0; c < 4 && j + c < M; ++c) {
            b[c] = rows[j + c] + s0;
            o[c] = lanes[i * M + j + c];
          }
          switch (std::min(4, M - j)) {
            case 4: lane_dots<4>(rows[i] + s0, b, m, o); break;
            case 3: lane_dots<3>(rows[i] + s0, b, m, o); break;
            case 2: lane_dots<2>(rows[i] + s0, b, m, o); break;
            default: lane_dots<1>(rows[i] + s0, b, m, o); break;
          }
        }
      }
    }
  }
  for (int i = 0; i < M; ++i) {
    for (int j = i; j < M; ++j) out[i * M + j] = out[j * M + i] = tree_sum(lanes[i * M + j]);
  }
}

void gram_partials(const CpuTriple& t, int32_t K, int64_t begin, int64_t end, void* scratch,
                   double* out) {
  const bool any64 = t.g_dtype == DType::kFloat64 || t.x_dtype == DType::kFloat64 ||
                     t.r_dtype == DType::kFloat64;
  if (any64) gram_chunk<double>(t, K, begin, end, scratch, out);
  else gram_chunk<float>(t, K, begin, end, scratch, out);
}
