// Generic soft-area chunk kernels over a vector abstraction `V`. Included by each kernel
// translation unit inside an anonymous namespace, after it defines its vector type, so every
// instruction set gets its own internal-linkage copy (no symbol can leak between units compiled
// with different flags).
//
// V provides: W (lanes), S (scalar compute type), F (vector of S), I (vector of region ids), M
// (lane mask); zero, set1, add, sub, mul, div, recip, max, exp, load_s, store_s, load<DT>, store<DT>,
// load_ids, eq, valid, tail, mask_add, select, permute, gather, hsum; BadIds, no_bad_ids,
// flag_bad_ids (marks W int64 ids outside [0, R), exactly on all 64 bits) and any_bad_ids.

template <DType DT>
struct Storage;
template <>
struct Storage<DType::Float32> {
  using T = float;
};
template <>
struct Storage<DType::Float16> {
  using T = std::uint16_t;
};
template <>
struct Storage<DType::BFloat16> {
  using T = std::uint16_t;
};
template <>
struct Storage<DType::Float64> {
  using T = double;
};

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Loads n (<= W) logits at stride `stride`; lanes >= n read as zero.
template <class V, DType DT>
inline typename V::F load_x(const typename Storage<DT>::T* ptr, int64_t stride, int n) {
  using T = typename Storage<DT>::T;
  if (stride == 1 && n == V::W) return V::template load<DT>(ptr);
  alignas(64) T buf[V::W];
  for (int i = 0; i < V::W; ++i) buf[i] = T(0);
  for (int i = 0; i < n; ++i) buf[i] = ptr[i * stride];
  return V::template load<DT>(buf);
}

// Stores the first n lanes of v contiguously.
template <class V, DType DT>
inline void store_x(typename Storage<DT>::T* ptr, typename V::F v, int n) {
  using T = typename Storage<DT>::T;
  if (n == V::W) {
    V::template store<DT>(ptr, v);
    return;
  }
  alignas(64) T buf[V::W];
  V::template store<DT>(buf, v);
  for (int i = 0; i < n; ++i) ptr[i] = buf[i];
}

// Loads n (<= W) region ids at stride `stride`; lanes >= n read as -1 (matches no region).
template <class V>
inline typename V::I load_region_ids(const int64_t* ptr, int64_t stride, int n) {
  if (stride == 1 && n == V::W) return V::load_ids(ptr);
  alignas(64) int64_t buf[V::W];
  for (int i = 0; i < V::W; ++i) buf[i] = -1;
  for (int i = 0; i < n; ++i) buf[i] = ptr[i * stride];
  return V::load_ids(buf);
}

// In place: logits of one vector of positions -> probabilities (softmax over C or sigmoid).
template <class V>
inline void probabilities(typename V::F* xs, int64_t C, Activation act) {
  using F = typename V::F;
  const F one = V::set1(1);
  if (act == Activation::Sigmoid) {
    for (int64_t c = 0; c < C; ++c) xs[c] = V::div(one, V::add(one, V::exp(V::sub(V::zero(), xs[c]))));
    return;
  }
  F m = xs[0];
  for (int64_t c = 1; c < C; ++c) m = V::max(m, xs[c]);
  F s = V::zero();
  for (int64_t c = 0; c < C; ++c) {
    xs[c] = V::exp_nonpos(V::sub(xs[c], m));
    s = V::add(s, xs[c]);
  }
  const F inv = V::recip(s);
  for (int64_t c = 0; c < C; ++c) xs[c] = V::mul(xs[c], inv);
}

// Walks the flattened spatial range [begin, end) of batch item b row by row (rows along the
// last spatial axis) and calls fn(flat_index, logits_base, region_base, length) per row segment.
template <class T, class Fn>
inline void for_each_segment(const Problem& p, int64_t b, int64_t begin, int64_t end, Fn&& fn) {
  const int64_t n2 = p.size[2], n1 = p.size[1];
  int64_t i2 = begin % n2, t = begin / n2;
  int64_t i1 = t % n1, i0 = t / n1;
  int64_t flat = begin;
  while (flat < end) {
    const int64_t len = min64(n2 - i2, end - flat);
    const T* base = static_cast<const T*>(p.logits) + b * p.stride_b + i0 * p.stride_s[0] +
                    i1 * p.stride_s[1] + i2 * p.stride_s[2];
    const int64_t* rbase = nullptr;
    if (p.regions != nullptr)
      rbase = p.regions + b * p.region_stride_b + i0 * p.region_stride_s[0] +
              i1 * p.region_stride_s[1] + i2 * p.region_stride_s[2];
    fn(flat, base, rbase, len);
    flat += len;
    i2 += len;
    if (i2 == n2) {
      i2 = 0;
      if (++i1 == n1) {
        i1 = 0;
        ++i0;
      }
    }
  }
}

// Widens [lo, hi] to cover the len region ids at ptr (stride `stride`): the range check of the
// map rides on the forward's own read of it instead of a separate pass.
inline void region_id_range(const int64_t* ptr, int64_t stride, int64_t len, int64_t& lo, int64_t& hi) {
  int64_t l = lo, h = hi;
  if (stride == 1) {
    for (int64_t i = 0; i < len; ++i) {
      l = ptr[i] < l ? ptr[i] : l;
      h = ptr[i] > h ? ptr[i] : h;
    }
  } else {
    for (int64_t i = 0; i < len; ++i) {
      const int64_t id = ptr[i * stride];
      l = id < l ? id : l;
      h = id > h ? id : h;
    }
  }
  lo = l;
  hi = h;
}

template <class V>
std::size_t scratch_bytes_impl(const Problem& p) {
  const int64_t C = p.channels, Rb = p.region_slots();
  // xs, gs, gtab (C each), vector accumulators (C * Rb), scalar accumulators (C * R).
  return sizeof(typename V::F) * static_cast<std::size_t>(3 * C + C * Rb) +
         sizeof(typename V::S) * static_cast<std::size_t>(C * p.num_regions) + 64;
}

// ---- Fast paths: compile-time channel count, rows contiguous along the last spatial axis ----
//
// Everything a vector of positions needs stays in registers: the CT logits, their exponentials,
// the class accumulators. Softmax keeps e = exp(x - max) unnormalised with inv = 1 / sum e, so
// the forward adds e * inv with one FMA and the backward writes
//   p_k (g_k - sum_c p_c g_c) = e_k (inv g_k - inv^2 sum_c e_c g_c)
// with two operations per class. Sigmoid returns e = p, inv = 1.

template <class V, int CT, bool SOFTMAX>
inline void activate(typename V::F (&x)[CT], typename V::F& inv) {
  using F = typename V::F;
  const F one = V::set1(1);
  if constexpr (SOFTMAX) {
    F m = x[0];
#pragma GCC unroll 16
    for (int c = 1; c < CT; ++c) m = V::max(m, x[c]);
    F s = V::zero();
#pragma GCC unroll 16
    for (int c = 0; c < CT; ++c) {
      x[c] = V::exp_nonpos(V::sub(x[c], m));
      s = V::add(s, x[c]);
    }
    inv = V::recip(s);
  } else {
#pragma GCC unroll 16
    for (int c = 0; c < CT; ++c) x[c] = V::div(one, V::add(one, V::exp(V::sub(V::zero(), x[c]))));  // 1 + e may be inf
    inv = one;
  }
}

template <class V, DType DT, int CT>
inline void load_channels(typename V::F (&x)[CT], const typename Storage<DT>::T* ptr, int64_t sc, int n) {
  if (n == V::W) {
#pragma GCC unroll 16
    for (int c = 0; c < CT; ++c) x[c] = V::template load<DT>(ptr + c * sc);
  } else {
#pragma GCC unroll 16
    for (int c = 0; c < CT; ++c) x[c] = load_x<V, DT>(ptr + c * sc, 1, n);
  }
}

// Forward over rows with stride 1 (and region ids with stride 1); R == 0 or R <= kVecRegions.
// RT > 0: R == RT at compile time (region accumulators in registers).
template <class V, DType DT, int CT, bool SOFTMAX, int RT = 0>
void forward_fast(const Problem& p, int64_t b, int64_t begin, int64_t end, double* partial, int64_t* id_range,
                  void* scratch) {
  using F = typename V::F;
  using T = typename Storage<DT>::T;
  const int64_t R = RT > 0 ? RT : p.num_regions, sc = p.stride_c;
  F acc[CT];
#pragma GCC unroll 16
  for (int c = 0; c < CT; ++c) acc[c] = V::zero();
  F local_racc[RT > 0 ? CT * RT : 1];
  F* const racc = RT > 0 ? local_racc : static_cast<F*>(scratch);  // CT * R region accumulators
  for (int64_t i = 0; i < CT * R; ++i) racc[i] = V::zero();
  int64_t id_lo = INT64_MAX, id_hi = INT64_MIN;
  typename V::IdRange vlo = V::set1_id(INT64_MAX), vhi = V::set1_id(INT64_MIN);

  for_each_segment<T>(p, b, begin, end, [&](int64_t, const T* base, const int64_t* rbase, int64_t len) {
    if (R == 0) {
      int64_t j = 0;
      for (; j + V::W <= len; j += V::W) {
        F x[CT], inv;
        load_channels<V, DT, CT>(x, base + j, sc, V::W);
        activate<V, CT, SOFTMAX>(x, inv);
#pragma GCC unroll 16
        for (int c = 0; c < CT; ++c) acc[c] = V::fmadd(x[c], inv, acc[c]);
      }
      if (j < len) {
        const int n = static_cast<int>(len - j);
        F x[CT], inv;
        load_channels<V, DT, CT>(x, base + j, sc, n);
        activate<V, CT, SOFTMAX>(x, inv);
        const typename V::M m = V::tail(n);
#pragma GCC unroll 16
        for (int c = 0; c < CT; ++c) acc[c] = V::mask_fmadd(acc[c], m, x[c], inv);
      }
      return;
    }
    for (int64_t j = 0; j < len; j += V::W) {
      const int n = static_cast<int>(min64(V::W, len - j));
      F x[CT], inv;
      load_channels<V, DT, CT>(x, base + j, sc, n);
      typename V::I ids;
      if (n == V::W) {
        ids = V::load_ids(rbase + j);
        if constexpr (V::kVecIdRange) V::id_range(rbase + j, vlo, vhi);
      } else {
        ids = load_region_ids<V>(rbase + j, 1, n);
      }
      if (!V::kVecIdRange || n != V::W) region_id_range(rbase + j, 1, n, id_lo, id_hi);
      activate<V, CT, SOFTMAX>(x, inv);
#pragma GCC unroll 8
      for (int64_t r = 0; r < R; ++r) {
        const typename V::M m = V::eq(ids, static_cast<int>(r));
#pragma GCC unroll 16
        for (int c = 0; c < CT; ++c) racc[c * R + r] = V::mask_fmadd(racc[c * R + r], m, x[c], inv);
      }
    }
  });

  if (R == 0) {
    for (int c = 0; c < CT; ++c) partial[c] = static_cast<double>(V::hsum(acc[c]));
  } else {
    for (int64_t i = 0; i < CT * R; ++i) partial[i] = static_cast<double>(V::hsum(racc[i]));
    if constexpr (V::kVecIdRange) {
      id_lo = std::min(id_lo, V::reduce_min(vlo));
      id_hi = std::max(id_hi, V::reduce_max(vhi));
    }
  }
  id_range[0] = id_lo;
  id_range[1] = id_hi;
}

// Backward over rows with stride 1 (and region ids with stride 1); R == 0 or R <= V::W. With a
// region map, writes the smallest and largest id read to id_range (as the forward does): full
// vectors only flag ids outside [0, R) (V::flag_bad_ids, about free), and the range is computed
// exactly, by a second walk over the ids, only for a chunk that has such an id.
template <class V, DType DT, int CT, bool SOFTMAX>
void backward_fast(const Problem& p, int64_t b, int64_t begin, int64_t end, int64_t* id_range) {
  using F = typename V::F;
  using S = typename V::S;
  using T = typename Storage<DT>::T;
  const int64_t R = p.num_regions, Rb = p.region_slots(), Sn = p.spatial_numel(), sc = p.stride_c;
  const S* g = static_cast<const S*>(p.grad) + b * CT * Rb;
  F gtab[CT];
  for (int c = 0; c < CT; ++c) {
    if (R == 0) {
      gtab[c] = V::set1(g[c]);
    } else {
      alignas(64) S row[V::W];
      for (int i = 0; i < V::W; ++i) row[i] = i < R ? g[c * R + i] : S(0);
      gtab[c] = V::load_s(row);
    }
  }
  T* const out = static_cast<T*>(p.grad_logits) + b * CT * Sn;
  // Large gradients go around the caches (no read-for-ownership of the destination; measured
  // 15-30 % faster backward here, also for a 9 MiB gradient that fits the L3).
  const bool streaming =
      V::kStream && static_cast<std::size_t>(p.batch * CT * Sn) * sizeof(T) >= kStreamBytes;
  int64_t id_lo = INT64_MAX, id_hi = INT64_MIN;
  typename V::BadIds bad = V::no_bad_ids();

  for_each_segment<T>(p, b, begin, end, [&](int64_t flat, const T* base, const int64_t* rbase, int64_t len) {
    for (int64_t j = 0; j < len; j += V::W) {
      const int n = static_cast<int>(min64(V::W, len - j));
      F x[CT], inv, gs[CT];
      load_channels<V, DT, CT>(x, base + j, sc, n);
      if (R == 0) {
#pragma GCC unroll 16
        for (int c = 0; c < CT; ++c) gs[c] = gtab[c];
      } else {
        const typename V::I ids = n == V::W ? V::load_ids(rbase + j) : load_region_ids<V>(rbase + j, 1, n);
        const typename V::M ok = V::valid(ids, static_cast<int>(R));
        if (n == V::W) {
          bad = V::flag_bad_ids(bad, rbase + j, ok, static_cast<int>(R));
        } else {
          region_id_range(rbase + j, 1, n, id_lo, id_hi);
        }
#pragma GCC unroll 16
        for (int c = 0; c < CT; ++c) gs[c] = V::permute(ids, gtab[c], ok);
      }
      activate<V, CT, SOFTMAX>(x, inv);
      T* o = out + flat + j;
      if constexpr (SOFTMAX) {
        F dot = V::mul(x[0], gs[0]);
#pragma GCC unroll 16
        for (int c = 1; c < CT; ++c) dot = V::fmadd(x[c], gs[c], dot);
        const F d = V::mul(V::mul(dot, inv), inv);
        if (n == V::W) {
#pragma GCC unroll 16
          for (int c = 0; c < CT; ++c) {
            const F v = V::mul(x[c], V::fmsub(inv, gs[c], d));
            if (streaming && (reinterpret_cast<std::uintptr_t>(o + c * Sn) & (sizeof(T) * V::W - 1)) == 0) {
              V::template stream<DT>(o + c * Sn, v);
            } else {
              V::template store<DT>(o + c * Sn, v);
            }
          }
        } else {
          for (int c = 0; c < CT; ++c) store_x<V, DT>(o + c * Sn, V::mul(x[c], V::fmsub(inv, gs[c], d)), n);
        }
      } else {
        if (n == V::W) {
#pragma GCC unroll 16
          for (int c = 0; c < CT; ++c) V::template store<DT>(o + c * Sn, V::mul(gs[c], V::fnmadd(x[c], x[c], x[c])));
        } else {
          for (int c = 0; c < CT; ++c) store_x<V, DT>(o + c * Sn, V::mul(gs[c], V::fnmadd(x[c], x[c], x[c])), n);
        }
      }
    }
  });
  if (streaming) V::stream_fence();
  if (V::any_bad_ids(bad))
    for_each_segment<T>(p, b, begin, end, [&](int64_t, const T*, const int64_t* rbase, int64_t len) {
      region_id_range(rbase, 1, len, id_lo, id_hi);
    });
  id_range[0] = id_lo;
  id_range[1] = id_hi;
}

// CT > 0: the channel count is the compile-time constant CT (loops over channels unroll and the
// per-position vectors stay in registers); CT == 0: p.channels, with vectors in scratch.
template <class V, DType DT, int CT>
void forward_chunk_impl(const Problem& p, int64_t b, int64_t begin, int64_t end, double* partial,
                        int64_t* id_range, void* scratch) {
  if constexpr (CT > 0 && V::W > 1) {
    if (p.stride_s[2] == 1 && (p.num_regions == 0 || (p.num_regions <= kVecRegions && p.region_stride_s[2] == 1))) {
      if (p.activation == Activation::Softmax) {
        switch (p.num_regions) {
          case 2: return forward_fast<V, DT, CT, true, 2>(p, b, begin, end, partial, id_range, scratch);
          case 3: return forward_fast<V, DT, CT, true, 3>(p, b, begin, end, partial, id_range, scratch);
          case 4: return forward_fast<V, DT, CT, true, 4>(p, b, begin, end, partial, id_range, scratch);
          default: return forward_fast<V, DT, CT, true>(p, b, begin, end, partial, id_range, scratch);
        }
      }
      return forward_fast<V, DT, CT, false>(p, b, begin, end, partial, id_range, scratch);
    }
  }
  using F = typename V::F;
  using S = typename V::S;
  using T = typename Storage<DT>::T;
  const int64_t C = CT > 0 ? CT : p.channels, R = p.num_regions, Rb = p.region_slots();
  const bool scatter = R > kVecRegions;
  F local_xs[CT > 0 ? CT : 1];
  F local_acc[CT > 0 ? CT : 1];  // class sums without a region map (acc holds them for CT == 0)
  F* const xs = CT > 0 ? local_xs : static_cast<F*>(scratch);
  F* const acc = static_cast<F*>(scratch) + 3 * C;
  S* sacc = reinterpret_cast<S*>(acc + C * Rb);
  F* const acc0 = CT > 0 ? local_acc : acc;
  for (int64_t c = 0; c < C; ++c) acc0[c] = V::zero();
  for (int64_t i = 0; i < C * Rb; ++i) acc[i] = V::zero();
  if (scatter)
    for (int64_t i = 0; i < C * R; ++i) sacc[i] = S(0);
  const int64_t sc = p.stride_c, s2 = p.stride_s[2], rs2 = p.region_stride_s[2];

  int64_t id_lo = INT64_MAX, id_hi = INT64_MIN;

  for_each_segment<T>(p, b, begin, end, [&](int64_t, const T* base, const int64_t* rbase, int64_t len) {
    if (R > 0) region_id_range(rbase, rs2, len, id_lo, id_hi);
    for (int64_t j = 0; j < len; j += V::W) {
      const int n = static_cast<int>(min64(V::W, len - j));
      for (int64_t c = 0; c < C; ++c) xs[c] = load_x<V, DT>(base + c * sc + j * s2, s2, n);
      probabilities<V>(xs, C, p.activation);
      if (R == 0) {
        if (n == V::W) {
          for (int64_t c = 0; c < C; ++c) acc0[c] = V::add(acc0[c], xs[c]);
        } else {
          const typename V::M m = V::tail(n);
          for (int64_t c = 0; c < C; ++c) acc0[c] = V::mask_add(acc0[c], m, xs[c]);
        }
      } else if (!scatter) {
        const typename V::I ids = load_region_ids<V>(rbase + j * rs2, rs2, n);
        for (int64_t r = 0; r < R; ++r) {
          const typename V::M m = V::eq(ids, static_cast<int>(r));
          for (int64_t c = 0; c < C; ++c) acc[c * R + r] = V::mask_add(acc[c * R + r], m, xs[c]);
        }
      } else {
        alignas(64) S lanes[V::W];
        for (int64_t c = 0; c < C; ++c) {
          V::store_s(lanes, xs[c]);
          for (int i = 0; i < n; ++i) {
            const int64_t id = rbase[(j + i) * rs2];
            if (static_cast<uint64_t>(id) < static_cast<uint64_t>(R)) sacc[c * R + id] += lanes[i];
          }
        }
      }
    }
  });

  if (R == 0) {
    for (int64_t c = 0; c < C; ++c) partial[c] = static_cast<double>(V::hsum(acc0[c]));
  } else {
    for (int64_t i = 0; i < C * Rb; ++i) partial[i] = static_cast<double>(V::hsum(acc[i]));
  }
  if (scatter)
    for (int64_t i = 0; i < C * R; ++i) partial[i] += static_cast<double>(sacc[i]);
  id_range[0] = id_lo;
  id_range[1] = id_hi;
}

template <class V, DType DT, int CT>
void backward_chunk_impl(const Problem& p, int64_t b, int64_t begin, int64_t end, int64_t* id_range,
                         void* scratch) {
  if constexpr (CT > 0 && V::W > 1) {
    if (p.stride_s[2] == 1 && (p.num_regions == 0 || (p.num_regions <= V::W && p.region_stride_s[2] == 1))) {
      if (p.activation == Activation::Softmax) return backward_fast<V, DT, CT, true>(p, b, begin, end, id_range);
      return backward_fast<V, DT, CT, false>(p, b, begin, end, id_range);
    }
  }
  using F = typename V::F;
  using S = typename V::S;
  using T = typename Storage<DT>::T;
  const int64_t C = CT > 0 ? CT : p.channels, R = p.num_regions, Rb = p.region_slots();
  const int64_t Sn = p.spatial_numel();
  F local[CT > 0 ? 3 * CT : 1];
  F* const xs = CT > 0 ? local : static_cast<F*>(scratch);
  F* const gs = xs + C;
  F* const gtab = gs + C;
  const S* g = static_cast<const S*>(p.grad) + b * C * Rb;
  const bool permute = R > 0 && R <= V::W;
  for (int64_t c = 0; c < C; ++c) {
    if (R == 0) {
      gtab[c] = V::set1(g[c]);
    } else if (permute) {
      alignas(64) S row[V::W];
      for (int i = 0; i < V::W; ++i) row[i] = i < R ? g[c * R + i] : S(0);
      gtab[c] = V::load_s(row);
    }
  }
  T* out = static_cast<T*>(p.grad_logits) + b * C * Sn;
  const int64_t sc = p.stride_c, s2 = p.stride_s[2], rs2 = p.region_stride_s[2];
  const bool softmax = p.activation == Activation::Softmax;
  const F one = V::set1(1);
  int64_t id_lo = INT64_MAX, id_hi = INT64_MIN;

  for_each_segment<T>(p, b, begin, end, [&](int64_t flat, const T* base, const int64_t* rbase, int64_t len) {
    if (R > 0) region_id_range(rbase, rs2, len, id_lo, id_hi);
    for (int64_t j = 0; j < len; j += V::W) {
      const int n = static_cast<int>(min64(V::W, len - j));
      for (int64_t c = 0; c < C; ++c) xs[c] = load_x<V, DT>(base + c * sc + j * s2, s2, n);
      probabilities<V>(xs, C, p.activation);
      if (R == 0) {
        for (int64_t c = 0; c < C; ++c) gs[c] = gtab[c];
      } else {
        const typename V::I ids = load_region_ids<V>(rbase + j * rs2, rs2, n);
        const typename V::M ok = V::valid(ids, static_cast<int>(R));
        for (int64_t c = 0; c < C; ++c)
          gs[c] = permute ? V::permute(ids, gtab[c], ok) : V::gather(g + c * R, ids, ok);
      }
      T* o = out + flat + j;
      if (softmax) {
        F dot = V::zero();
        for (int64_t c = 0; c < C; ++c) dot = V::add(dot, V::mul(xs[c], gs[c]));
        for (int64_t c = 0; c < C; ++c) store_x<V, DT>(o + c * Sn, V::mul(xs[c], V::sub(gs[c], dot)), n);
      } else {
        for (int64_t c = 0; c < C; ++c)
          store_x<V, DT>(o + c * Sn, V::mul(gs[c], V::mul(xs[c], V::sub(one, xs[c]))), n);
      }
    }
  });
  id_range[0] = id_lo;
  id_range[1] = id_hi;
}

// Channel counts 2 to 8 get kernels specialised for the count (registers, unrolled loops).
template <class V, DType DT>
void forward_chunk_channels(const Problem& p, int64_t b, int64_t begin, int64_t end, double* partial,
                            int64_t* id_range, void* scratch) {
  switch (p.channels) {
    case 2: return forward_chunk_impl<V, DT, 2>(p, b, begin, end, partial, id_range, scratch);
    case 3: return forward_chunk_impl<V, DT, 3>(p, b, begin, end, partial, id_range, scratch);
    case 4: return forward_chunk_impl<V, DT, 4>(p, b, begin, end, partial, id_range, scratch);
    case 5: return forward_chunk_impl<V, DT, 5>(p, b, begin, end, partial, id_range, scratch);
    case 6: return forward_chunk_impl<V, DT, 6>(p, b, begin, end, partial, id_range, scratch);
    case 7: return forward_chunk_impl<V, DT, 7>(p, b, begin, end, partial, id_range, scratch);
    case 8: return forward_chunk_impl<V, DT, 8>(p, b, begin, end, partial, id_range, scratch);
    default: return forward_chunk_impl<V, DT, 0>(p, b, begin, end, partial, id_range, scratch);
  }
}

template <class V, DType DT>
void backward_chunk_channels(const Problem& p, int64_t b, int64_t begin, int64_t end, int64_t* id_range,
                             void* scratch) {
  switch (p.channels) {
    case 2: return backward_chunk_impl<V, DT, 2>(p, b, begin, end, id_range, scratch);
    case 3: return backward_chunk_impl<V, DT, 3>(p, b, begin, end, id_range, scratch);
    case 4: return backward_chunk_impl<V, DT, 4>(p, b, begin, end, id_range, scratch);
    case 5: return backward_chunk_impl<V, DT, 5>(p, b, begin, end, id_range, scratch);
    case 6: return backward_chunk_impl<V, DT, 6>(p, b, begin, end, id_range, scratch);
    case 7: return backward_chunk_impl<V, DT, 7>(p, b, begin, end, id_range, scratch);
    case 8: return backward_chunk_impl<V, DT, 8>(p, b, begin, end, id_range, scratch);
    default: return backward_chunk_impl<V, DT, 0>(p, b, begin, end, id_range, scratch);
  }
}

template <class V>
void forward_chunk_dispatch(const Problem& p, int64_t b, int64_t begin, int64_t end, double* partial,
                            int64_t* id_range, void* scratch) {
  switch (p.dtype) {
    case DType::Float32: return forward_chunk_channels<V, DType::Float32>(p, b, begin, end, partial, id_range, scratch);
    case DType::Float16: return forward_chunk_channels<V, DType::Float16>(p, b, begin, end, partial, id_range, scratch);
    case DType::BFloat16: return forward_chunk_channels<V, DType::BFloat16>(p, b, begin, end, partial, id_range, scratch);
    default: return;
  }
}

template <class V>
void backward_chunk_dispatch(const Problem& p, int64_t b, int64_t begin, int64_t end, int64_t* id_range,
                             void* scratch) {
  switch (p.dtype) {
    case DType::Float32:
      return backward_chunk_channels<V, DType::Float32>(p, b, begin, end, id_range, scratch);
    case DType::Float16:
      return backward_chunk_channels<V, DType::Float16>(p, b, begin, end, id_range, scratch);
    case DType::BFloat16:
      return backward_chunk_channels<V, DType::BFloat16>(p, b, begin, end, id_range, scratch);
    default: return;
  }
}

// GELU and its derivative for W lanes: a = |x| / sqrt(2), q = 0.5 erfc(a) = Phi(-|x|), so
// Phi(x) = q for x < 0 and 1 - q otherwise (no cancellation in the left tail). Infinite inputs
// give NaN, as torch's GELU does.
template <class V>
inline void gelu_lanes(typename V::F x, typename V::F& y, typename V::F& d) {
  using F = typename V::F;
  const F a = V::mul(V::max(x, V::sub(V::zero(), x)), V::set1(kSqrtHalf));
  const F t = V::recip(V::fmadd(V::set1(kErfP), a, V::set1(1.0f)));
  F poly = V::fmadd(V::set1(kErfA[4]), t, V::set1(kErfA[3]));
  poly = V::fmadd(poly, t, V::set1(kErfA[2]));
  poly = V::fmadd(poly, t, V::set1(kErfA[1]));
  poly = V::fmadd(poly, t, V::set1(kErfA[0]));
  poly = V::mul(poly, t);
  const F e = V::exp_nonpos(V::mul(V::sub(V::zero(), a), a));  // exp(-x^2 / 2)
  const F q = V::mul(V::mul(V::set1(0.5f), poly), e);
  const F cdf = V::select_neg(x, q, V::sub(V::set1(1.0f), q));
  y = V::mul(x, cdf);
  d = V::fmadd(V::mul(x, V::set1(kInvSqrt2Pi)), e, cdf);
}

// dw[o][c..c+W) = sum over the rows of g[m][o] y[m][c..c+W) for NB outputs o0..o0+NB, the NB
// accumulators held in registers across the rows (rows summed in order).
template <class V, int NB>
inline void pointwise_dw_block(const float* g, const float* y, float* dw, int64_t rows, int64_t C, int64_t O,
                               int64_t o0, int64_t c) {
  using F = typename V::F;
  F acc[NB];
  for (int k = 0; k < NB; ++k) acc[k] = V::zero();
  for (int64_t m = 0; m < rows; ++m) {
    const F yv = V::load_s(y + m * C + c);
    const float* gm = g + m * O + o0;
    for (int k = 0; k < NB; ++k) acc[k] = V::fmadd(V::set1(gm[k]), yv, acc[k]);
  }
  for (int k = 0; k < NB; ++k) V::store_s(dw + (o0 + k) * C + c, acc[k]);
}

template <class V>
void gelu_pointwise_backward_impl(const float* g, const float* y, const float* d, const float* w, float* gx,
                                  float* dw, float* db, int64_t rows, int64_t C, int64_t O) {
  using F = typename V::F;
  constexpr int W = V::W;
  constexpr int kBlock = 8;  // outputs per register block of the weight gradient
  const int64_t cv = C / W * W;  // channels in whole vectors; the rest one by one
  // gx = d * (g w): four rows at a time, so that four FMA chains over the outputs run side by side
  // (one row's chain alone waits on each FMA's latency when the channels fill few vectors); each
  // row sums its outputs in order, as the rows left over do one by one
  int64_t m4 = 0;
  for (; m4 + 4 <= rows; m4 += 4) {
    const float* g0 = g + m4 * O;
    for (int64_t c = 0; c < cv; c += W) {
      F s0 = V::zero(), s1 = V::zero(), s2 = V::zero(), s3 = V::zero();
      for (int64_t o = 0; o < O; ++o) {
        const F wv = V::load_s(w + o * C + c);
        s0 = V::fmadd(V::set1(g0[o]), wv, s0);
        s1 = V::fmadd(V::set1(g0[O + o]), wv, s1);
        s2 = V::fmadd(V::set1(g0[2 * O + o]), wv, s2);
        s3 = V::fmadd(V::set1(g0[3 * O + o]), wv, s3);
      }
      const int64_t at = m4 * C + c;
      V::store_s(gx + at, V::mul(V::load_s(d + at), s0));
      V::store_s(gx + at + C, V::mul(V::load_s(d + at + C), s1));
      V::store_s(gx + at + 2 * C, V::mul(V::load_s(d + at + 2 * C), s2));
      V::store_s(gx + at + 3 * C, V::mul(V::load_s(d + at + 3 * C), s3));
    }
  }
  for (int64_t m = m4; m < rows; ++m) {
    const float* gm = g + m * O;
    for (int64_t c = 0; c < cv; c += W) {
      F s = V::zero();
      for (int64_t o = 0; o < O; ++o) s = V::fmadd(V::set1(gm[o]), V::load_s(w + o * C + c), s);
      V::store_s(gx + m * C + c, V::mul(V::load_s(d + m * C + c), s));
    }
  }
  for (int64_t m = 0; m < rows; ++m) {  // channels past the whole vectors, one by one
    const float* gm = g + m * O;
    for (int64_t c = cv; c < C; ++c) {
      float s = 0.0f;
      for (int64_t o = 0; o < O; ++o) s += gm[o] * w[o * C + c];
      gx[m * C + c] = d[m * C + c] * s;
    }
  }
  for (int64_t c = 0; c < cv; c += W) {  // dw over the range's rows, which are still in cache
    for (int64_t o0 = 0; o0 < O; o0 += kBlock) {
      switch (min64(kBlock, O - o0)) {
        case 1: pointwise_dw_block<V, 1>(g, y, dw, rows, C, O, o0, c); break;
        case 2: pointwise_dw_block<V, 2>(g, y, dw, rows, C, O, o0, c); break;
        case 3: pointwise_dw_block<V, 3>(g, y, dw, rows, C, O, o0, c); break;
        case 4: pointwise_dw_block<V, 4>(g, y, dw, rows, C, O, o0, c); break;
        case 5: pointwise_dw_block<V, 5>(g, y, dw, rows, C, O, o0, c); break;
        case 6: pointwise_dw_block<V, 6>(g, y, dw, rows, C, O, o0, c); break;
        case 7: pointwise_dw_block<V, 7>(g, y, dw, rows, C, O, o0, c); break;
        default: pointwise_dw_block<V, kBlock>(g, y, dw, rows, C, O, o0, c); break;
      }
    }
  }
  for (int64_t c = cv; c < C; ++c) {
    for (int64_t o = 0; o < O; ++o) {
      float s = 0.0f;
      for (int64_t m = 0; m < rows; ++m) s += g[m * O + o] * y[m * C + c];
      dw[o * C + c] = s;
    }
  }
  // db[o]: each output's sum over the rows in order, whole vectors of outputs at a time, the rest
  // side by side in one pass over the rows (one output's serial chain of adds at a time waited on
  // each add's latency: a third of a millisecond a call for 64 outputs of 4096 rows)
  const int64_t ov = O / W * W;
  for (int64_t o = 0; o < ov; o += W) {
    F acc = V::zero();
    for (int64_t m = 0; m < rows; ++m) acc = V::add(acc, V::load_s(g + m * O + o));
    V::store_s(db + o, acc);
  }
  if (ov < O) {
    float acc[W > 1 ? W : 1] = {};
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t o = ov; o < O; ++o) acc[o - ov] += g[m * O + o];
    for (int64_t o = ov; o < O; ++o) db[o] = acc[o - ov];
  }
}

// R rows by Q output vectors of pointwise_rows_impl from output o0: R * Q independent
// accumulators, each summing its channels in order, so that the FMAs' latency is hidden.
template <class V, int R, int Q>
inline void pointwise_rows_tile(const float* y, const float* wt, const float* bias, float* out, int64_t C, int64_t O,
                                int64_t OP, int64_t o0) {
  using F = typename V::F;
  constexpr int W = V::W;
  F acc[R][Q];
  for (int q = 0; q < Q; ++q) {
    const F bq = V::load_s(bias + o0 + q * W);
    for (int r = 0; r < R; ++r) acc[r][q] = bq;
  }
  for (int64_t c = 0; c < C; ++c) {
    F wv[Q];
    for (int q = 0; q < Q; ++q) wv[q] = V::load_s(wt + c * OP + o0 + q * W);
    for (int r = 0; r < R; ++r) {
      const F yv = V::set1(y[r * C + c]);
      for (int q = 0; q < Q; ++q) acc[r][q] = V::fmadd(yv, wv[q], acc[r][q]);
    }
  }
  for (int q = 0; q < Q; ++q) {
    const int64_t o = o0 + q * W;
    const int64_t n = min64(W, O - o);  // outputs of this vector that exist
    for (int r = 0; r < R; ++r) {
      if (n == W) {
        V::store_s(out + r * O + o, acc[r][q]);
      } else {
        alignas(64) float lanes[W];
        V::store_s(lanes, acc[r][q]);
        for (int64_t k = 0; k < n; ++k) out[r * O + o + k] = lanes[k];
      }
    }
  }
}

// out[m][o] = bias[o] + sum_c y[m][c] wt[c][o] for `rows` channels-last rows y [rows][C] (out
// [rows][O]), from the weight transposed with its outputs zero-padded, wt [C][OP], and the bias
// padded alike, bias [OP] (OP a multiple of W).
template <class V>
void pointwise_rows_impl(const float* y, const float* wt, const float* bias, float* out, int64_t rows, int64_t C,
                         int64_t O, int64_t OP) {
  constexpr int W = V::W;
  const int64_t ov = (O + W - 1) / W * W;  // outputs in vectors that hold any
  int64_t o0 = 0;
  for (; o0 + 2 * W <= ov; o0 += 2 * W) {  // two output vectors, four rows at a time
    int64_t m = 0;
    for (; m + 4 <= rows; m += 4) pointwise_rows_tile<V, 4, 2>(y + m * C, wt, bias, out + m * O, C, O, OP, o0);
    for (; m < rows; ++m) pointwise_rows_tile<V, 1, 2>(y + m * C, wt, bias, out + m * O, C, O, OP, o0);
  }
  if (o0 < ov) {  // one output vector, eight rows at a time
    int64_t m = 0;
    for (; m + 8 <= rows; m += 8) pointwise_rows_tile<V, 8, 1>(y + m * C, wt, bias, out + m * O, C, O, OP, o0);
    for (; m < rows; ++m) pointwise_rows_tile<V, 1, 1>(y + m * C, wt, bias, out + m * O, C, O, OP, o0);
  }
}

template <class V>
void pointwise_cf_forward_impl(const float* y, const float* w, const float* b, float* out, int64_t S, int64_t C,
                               int64_t O) {
  using F = typename V::F;
  constexpr int W = V::W;
  const int64_t sv = S / W * W;
  for (int64_t o = 0; o < O; ++o) {
    const float* wo = w + o * C;
    float* oo = out + o * S;
    const F bias = V::set1(b != nullptr ? b[o] : 0.0f);
    for (int64_t s = 0; s < sv; s += W) {
      F acc = bias;
      for (int64_t c = 0; c < C; ++c) acc = V::fmadd(V::set1(wo[c]), V::load_s(y + c * S + s), acc);
      V::store_s(oo + s, acc);
    }
    for (int64_t s = sv; s < S; ++s) {
      float acc = b != nullptr ? b[o] : 0.0f;
      for (int64_t c = 0; c < C; ++c) acc += wo[c] * y[c * S + s];
      oo[s] = acc;
    }
  }
}

// out[k * step] = sum over the S positions of g[k * S + s] * y[s] (of g[k * S + s] alone when y is
// null) for NB outputs k, their chains of FMAs side by side (one output's chain at a time waited
// on each FMA's latency); each sums its whole vectors in order, then its scalar tail.
template <class V, int NB>
inline void cf_sums_block(const float* g, const float* y, float* out, int64_t S, int64_t step) {
  using F = typename V::F;
  constexpr int W = V::W;
  const int64_t sv = S / W * W;
  F acc[NB];
  for (int k = 0; k < NB; ++k) acc[k] = V::zero();
  for (int64_t s = 0; s < sv; s += W) {
    if (y != nullptr) {
      const F yv = V::load_s(y + s);
      for (int k = 0; k < NB; ++k) acc[k] = V::fmadd(V::load_s(g + k * S + s), yv, acc[k]);
    } else {
      for (int k = 0; k < NB; ++k) acc[k] = V::add(acc[k], V::load_s(g + k * S + s));
    }
  }
  for (int k = 0; k < NB; ++k) {
    float rest = 0.0f;
    for (int64_t s = sv; s < S; ++s) rest += y != nullptr ? g[k * S + s] * y[s] : g[k * S + s];
    out[k * step] = V::hsum(acc[k]) + rest;
  }
}

template <class V>
void gelu_pointwise_cf_backward_impl(const float* g, const float* y, const float* d, const float* w, float* gx,
                                     float* dw, float* db, int64_t S, int64_t C, int64_t O) {
  using F = typename V::F;
  constexpr int W = V::W;
  const int64_t sv = S / W * W;
  for (int64_t c = 0; c < C; ++c) {  // gx, one channel plane at a time
    const float* yc = y + c * S;
    const float* dc = d + c * S;
    float* gxc = gx + c * S;
    for (int64_t s = 0; s < sv; s += W) {
      F acc = V::zero();
      for (int64_t o = 0; o < O; ++o) acc = V::fmadd(V::set1(w[o * C + c]), V::load_s(g + o * S + s), acc);
      V::store_s(gxc + s, V::mul(V::load_s(dc + s), acc));
    }
    for (int64_t s = sv; s < S; ++s) {
      float acc = 0.0f;
      for (int64_t o = 0; o < O; ++o) acc += w[o * C + c] * g[o * S + s];
      gxc[s] = dc[s] * acc;
    }
    for (int64_t o0 = 0; o0 < O; o0 += 4) {  // dw[o][c]: dot products over the positions
      switch (min64(4, O - o0)) {
        case 1: cf_sums_block<V, 1>(g + o0 * S, yc, dw + o0 * C + c, S, C); break;
        case 2: cf_sums_block<V, 2>(g + o0 * S, yc, dw + o0 * C + c, S, C); break;
        case 3: cf_sums_block<V, 3>(g + o0 * S, yc, dw + o0 * C + c, S, C); break;
        default: cf_sums_block<V, 4>(g + o0 * S, yc, dw + o0 * C + c, S, C); break;
      }
    }
  }
  for (int64_t o0 = 0; o0 < O; o0 += 4) {  // db[o]: sums over the positions
    switch (min64(4, O - o0)) {
      case 1: cf_sums_block<V, 1>(g + o0 * S, nullptr, db + o0, S, 1); break;
      case 2: cf_sums_block<V, 2>(g + o0 * S, nullptr, db + o0, S, 1); break;
      case 3: cf_sums_block<V, 3>(g + o0 * S, nullptr, db + o0, S, 1); break;
      default: cf_sums_block<V, 4>(g + o0 * S, nullptr, db + o0, S, 1); break;
    }
  }
}

// Posterior sample z = q_loc + t exp(q_logscale) eps and KL(q || p) = sum of p_logscale -
// q_logscale + (exp(2 (q_logscale - p_logscale)) + ((q_loc - p_loc) exp(-p_logscale))^2 - 1) / 2
// over one image's positions: post [rows][2Z] (q_loc | q_logscale), prior [rows][P] starting with
// (p_loc | p_logscale), its other P - 2Z channels copied to feat when set; eps and z [rows][Z].
template <class V>
double latent_forward_impl(const float* post, const float* prior, const float* eps, float* z, float* feat,
                           int64_t rows, int64_t Z, int64_t P, float t) {
  using F = typename V::F;
  constexpr int W = V::W;
  const int64_t zv = Z / W * W;  // channels in whole vectors; the rest one by one
  const int64_t nf = P - 2 * Z;
  const F half = V::set1(0.5f), tv = V::set1(t);
  F acc = V::zero();
  double rest = 0.0;
  for (int64_t m = 0; m < rows; ++m) {
    const float* q = post + m * 2 * Z;
    const float* p = prior + m * P;
    for (int64_t c = 0; c < zv; c += W) {
      const F ql = V::load_s(q + c), qs = V::load_s(q + Z + c), pl = V::load_s(p + c), ps = V::load_s(p + Z + c);
      V::store_s(z + m * Z + c, V::add(ql, V::mul(V::mul(tv, V::exp(qs)), V::load_s(eps + m * Z + c))));
      const F r = V::exp(V::sub(qs, ps));
      const F dl = V::mul(V::sub(ql, pl), V::exp(V::sub(V::zero(), ps)));
      acc = V::add(acc, V::add(V::sub(ps, qs), V::mul(half, V::fmadd(r, r, V::mul(dl, dl)))));
    }
    for (int64_t c = zv; c < Z; ++c) {
      const float ql = q[c], qs = q[Z + c], pl = p[c], ps = p[Z + c];
      z[m * Z + c] = ql + t * std::exp(qs) * eps[m * Z + c];
      const float r = std::exp(qs - ps), dl = (ql - pl) * std::exp(-ps);
      rest += ps - qs + 0.5f * (r * r + dl * dl);
    }
    if (feat != nullptr && nf > 0) std::memcpy(feat + m * nf, p + 2 * Z, sizeof(float) * static_cast<std::size_t>(nf));
  }
  return static_cast<double>(V::hsum(acc)) + rest - 0.5 * static_cast<double>(rows * Z);
}

// Gradients of latent_forward for one image from gz [rows][Z] (dL/dz; null: zero), gk (dL/dKL of
// the image) and gfeat [rows][P - 2Z] (dL/dfeat; null: zero): dpost [rows][2Z], dprior [rows][P].
template <class V>
void latent_backward_impl(const float* post, const float* prior, const float* eps, const float* gz, float gk,
                          const float* gfeat, float* dpost, float* dprior, int64_t rows, int64_t Z, int64_t P,
                          float t) {
  using F = typename V::F;
  constexpr int W = V::W;
  const int64_t zv = Z / W * W;
  const int64_t nf = P - 2 * Z;
  const F one = V::set1(1.0f), gkv = V::set1(gk), tv = V::set1(t);
  for (int64_t m = 0; m < rows; ++m) {
    const float* q = post + m * 2 * Z;
    const float* p = prior + m * P;
    float* dq = dpost + m * 2 * Z;
    float* dp = dprior + m * P;
    for (int64_t c = 0; c < zv; c += W) {
      const F ql = V::load_s(q + c), qs = V::load_s(q + Z + c), pl = V::load_s(p + c), ps = V::load_s(p + Z + c);
      const F g = gz != nullptr ? V::load_s(gz + m * Z + c) : V::zero();
      const F ip = V::exp(V::sub(V::zero(), ps));
      const F r = V::exp(V::sub(qs, ps));
      const F dl = V::mul(V::sub(ql, pl), ip);
      const F a = V::mul(gkv, V::mul(dl, ip));  // gk (q_loc - p_loc) / sigma_p^2
      const F r2 = V::mul(r, r);
      V::store_s(dq + c, V::add(g, a));
      V::store_s(dq + Z + c, V::fmadd(gkv, V::sub(r2, one),
                                      V::mul(V::mul(g, V::mul(tv, V::exp(qs))), V::load_s(eps + m * Z + c))));
      V::store_s(dp + c, V::sub(V::zero(), a));
      V::store_s(dp + Z + c, V::mul(gkv, V::sub(V::sub(one, r2), V::mul(dl, dl))));
    }
    for (int64_t c = zv; c < Z; ++c) {
      const float ql = q[c], qs = q[Z + c], pl = p[c], ps = p[Z + c];
      const float g = gz != nullptr ? gz[m * Z + c] : 0.0f;
      const float ip = std::exp(-ps), r = std::exp(qs - ps), dl = (ql - pl) * ip;
      const float a = gk * dl * ip;
      dq[c] = g + a;
      dq[Z + c] = g * t * std::exp(qs) * eps[m * Z + c] + gk * (r * r - 1.0f);
      dp[c] = -a;
      dp[Z + c] = gk * (1.0f - r * r - dl * dl);
    }
    if (nf > 0) {
      if (gfeat != nullptr)
        std::memcpy(dp + 2 * Z, gfeat + m * nf, sizeof(float) * static_cast<std::size_t>(nf));
      else
        std::memset(dp + 2 * Z, 0, sizeof(float) * static_cast<std::size_t>(nf));
    }
  }
}

template <class V>
void gelu_chunk_impl(const float* x, float* y, float* dydx, int64_t n) {
  constexpr int W = V::W;
  int64_t i = 0;
  typename V::F yv, dv;
  for (; i + W <= n; i += W) {
    gelu_lanes<V>(V::template load<DType::Float32>(x + i), yv, dv);
    V::template store<DType::Float32>(y + i, yv);
    V::template store<DType::Float32>(dydx + i, dv);
  }
  if (i < n) {  // the tail through a padded buffer, so it rounds exactly as full vectors do
    float xb[W] = {}, yb[W], db[W];
    for (int64_t k = i; k < n; ++k) xb[k - i] = x[k];
    gelu_lanes<V>(V::template load<DType::Float32>(xb), yv, dv);
    V::template store<DType::Float32>(yb, yv);
    V::template store<DType::Float32>(db, dv);
    for (int64_t k = i; k < n; ++k) {
      y[k] = yb[k - i];
      dydx[k] = db[k - i];
    }
  }
}
