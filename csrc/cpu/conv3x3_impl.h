// 3x3 (2D) and 3x3x3 (3D) convolutions, stride 1, zero padding 1, of one float32 image or volume
// (channels-last or channels-first) with few channels, for W lanes. Included by each instruction
// set's translation unit after its vector type is defined (inside its namespace: std::memset comes
// from kernels.h); see conv3x3_supported in kernels.h for the channel counts.
//
// oneDNN runs these at 2-8 channels far below the FMA peak (its blocked kernels pad the channel
// axis to a vector; a 2-channel 3x3x3 backward ran at 2 GFLOP/s). Here each channel is
// transposed into a zero-padded plane (a stack of planes in 3D), so a vector holds W neighbouring
// pixels of one channel and every FMA lane does useful work: the output of a vector of pixels is
// sum_{c,taps} broadcast(weight) * (the input planes read at the tap's offset).
#pragma once

// Geometry of the padded planes: KD depth taps (1 in 2D, 3 in 3D), slabs of (h + 2) rows of
// `stride` floats, d + KD - 1 slabs per channel.
struct ConvPlanes {
  int64_t d, h, w, stride, kd;
  int64_t slab() const { return (h + 2) * stride; }
  int64_t padded() const { return (d + kd - 1) * slab(); }  // floats per padded channel
  int64_t plain() const { return d * h * stride; }           // floats per unpadded channel
};

inline ConvPlanes conv3x3_planes_of(const Conv3x3& g) {
  return {g.d, g.h, g.w, conv3x3_row_stride(g.w), g.d3 ? 3 : 1};
}

// An image [d][h][w][C] (channels-last) or [C][d][h][w] (channels-first) -> C zero-padded
// channels, voxel (z, y, x) at slab z + (KD - 1) / 2, row y + 1, column x + 1; the borders and the
// columns past w + 1 stay zero.
template <int C>
inline void conv3x3_to_planes(const float* img, bool channels_last, const ConvPlanes& q, float* planes) {
  const int64_t chan = q.padded();
  std::memset(planes, 0, sizeof(float) * static_cast<std::size_t>(C * chan));
  const int64_t z0 = (q.kd - 1) / 2;
  for (int64_t z = 0; z < q.d; ++z)
    for (int64_t y = 0; y < q.h; ++y) {
      float* dst = planes + (z + z0) * q.slab() + (y + 1) * q.stride + 1;
      if (channels_last) {
        const float* src = img + (z * q.h + y) * q.w * C;
        for (int64_t x = 0; x < q.w; ++x)
          for (int c = 0; c < C; ++c) dst[c * chan + x] = src[x * C + c];
      } else {
        for (int c = 0; c < C; ++c)
          std::memcpy(dst + c * chan, img + ((c * q.d + z) * q.h + y) * q.w, sizeof(float) * q.w);
      }
    }
}

// C unpadded channels [C][d][h][stride] -> the image, channels-last or channels-first.
template <int C>
inline void conv3x3_from_planes(const float* planes, bool channels_last, const ConvPlanes& q, float* img) {
  const int64_t chan = q.plain();
  for (int64_t z = 0; z < q.d; ++z)
    for (int64_t y = 0; y < q.h; ++y) {
      const float* src = planes + (z * q.h + y) * q.stride;
      if (channels_last) {
        float* dst = img + (z * q.h + y) * q.w * C;
        for (int64_t x = 0; x < q.w; ++x)
          for (int c = 0; c < C; ++c) dst[x * C + c] = src[c * chan + x];
      } else {
        for (int c = 0; c < C; ++c)
          std::memcpy(img + ((c * q.d + z) * q.h + y) * q.w, src + c * chan, sizeof(float) * q.w);
      }
    }
}

// out [CO] unpadded channels = bias + correlation of the CI padded input channels with
// wt [CO][CI][KD][3][3]; columns w..roundup(w, PX W) hold values nobody reads. PX vectors of
// pixels and up to 8 (4 with 16 registers) output channels per pass: independent FMA chains
// enough to cover the FMA latency.
template <class V, int CI, int CO, int PX>
void conv3x3_planes(const float* in, const float* wt, const float* bias, const ConvPlanes& q, float* out) {
  using F = typename V::F;
  constexpr int OB = V::W >= 16 ? (CO < 8 ? CO : 8) : (CO < 4 ? CO : 4);
  constexpr int L = V::W;
  const int64_t in_chan = q.padded(), out_chan = q.plain(), slab = q.slab(), taps = q.kd * 9;
  for (int ob = 0; ob < CO; ob += OB)
    for (int64_t z = 0; z < q.d; ++z)
      for (int64_t y = 0; y < q.h; ++y)
        for (int64_t x0 = 0; x0 < q.w; x0 += PX * L) {
          F acc[PX][OB];
          for (int o = 0; o < OB; ++o)
            for (int p = 0; p < PX; ++p) acc[p][o] = V::set1(bias != nullptr ? bias[ob + o] : 0.0f);
          for (int c = 0; c < CI; ++c)
            for (int64_t dz = 0; dz < q.kd; ++dz)
              for (int dy = 0; dy < 3; ++dy) {
                const float* row = in + c * in_chan + (z + dz) * slab + (y + dy) * q.stride + x0;
                F v[PX][3];
                for (int p = 0; p < PX; ++p)
                  for (int dx = 0; dx < 3; ++dx) v[p][dx] = V::load_s(row + p * L + dx);
                const float* k = wt + (ob * CI + c) * taps + (dz * 3 + dy) * 3;
                for (int o = 0; o < OB; ++o) {
                  const float* ko = k + o * CI * taps;
                  for (int dx = 0; dx < 3; ++dx) {
                    const F kv = V::set1(ko[dx]);
                    for (int p = 0; p < PX; ++p) acc[p][o] = V::fmadd(kv, v[p][dx], acc[p][o]);
                  }
                }
              }
          for (int o = 0; o < OB; ++o) {
            float* dst = out + (ob + o) * out_chan + (z * q.h + y) * q.stride + x0;
            for (int p = 0; p < PX; ++p) V::store_s(dst + p * L, acc[p][o]);
          }
        }
}

// dw [CO][CI][KD][3][3] = sum over voxels of grad (CO padded channels, zero past column w) times
// the CI padded input channels shifted by the tap; db [CO] = sum of grad. Overwritten.
template <class V, int CI, int CO>
void conv3x3_weight_grad(const float* in, const float* grad, const ConvPlanes& q, float* dw, float* db) {
  using F = typename V::F;
  constexpr int OB = V::W >= 16 ? (CO < 8 ? CO : 8) : (CO < 4 ? CO : 4);
  const int64_t chan = q.padded(), slab = q.slab(), taps = q.kd * 9, z0 = (q.kd - 1) / 2;
  for (int ob = 0; ob < CO; ob += OB)
    for (int c = 0; c < CI; ++c)
      for (int64_t dz = 0; dz < q.kd; ++dz)
        for (int dy = 0; dy < 3; ++dy) {
          F acc[OB][3];
          for (int o = 0; o < OB; ++o) acc[o][0] = acc[o][1] = acc[o][2] = V::zero();
          for (int64_t z = 0; z < q.d; ++z)
            for (int64_t y = 0; y < q.h; ++y) {
              const float* xr = in + c * chan + (z + dz) * slab + (y + dy) * q.stride;
              const float* gr = grad + ob * chan + (z + z0) * slab + (y + 1) * q.stride + 1;
              for (int64_t x0 = 0; x0 < q.w; x0 += V::W) {
                const F a = V::load_s(xr + x0), b = V::load_s(xr + x0 + 1), e = V::load_s(xr + x0 + 2);
                for (int o = 0; o < OB; ++o) {
                  const F g = V::load_s(gr + o * chan + x0);
                  acc[o][0] = V::fmadd(g, a, acc[o][0]);
                  acc[o][1] = V::fmadd(g, b, acc[o][1]);
                  acc[o][2] = V::fmadd(g, e, acc[o][2]);
                }
              }
            }
          for (int o = 0; o < OB; ++o)
            for (int dx = 0; dx < 3; ++dx)
              dw[((ob + o) * CI + c) * taps + (dz * 3 + dy) * 3 + dx] = V::hsum(acc[o][dx]);
        }
  for (int o = 0; o < CO; ++o) {
    F acc = V::zero();
    for (int64_t z = 0; z < q.d; ++z)
      for (int64_t y = 0; y < q.h; ++y) {
        const float* gr = grad + o * chan + (z + z0) * slab + (y + 1) * q.stride + 1;
        for (int64_t x0 = 0; x0 < q.w; x0 += V::W) acc = V::add(acc, V::load_s(gr + x0));
      }
    db[o] = V::hsum(acc);
  }
}

// Two vectors of pixels per pass where a row holds more than one.
template <class V, int CI, int CO>
void conv3x3_planes_px(const float* in, const float* wt, const float* bias, const ConvPlanes& q, float* out) {
  if (q.w > V::W)
    conv3x3_planes<V, CI, CO, 2>(in, wt, bias, q, out);
  else
    conv3x3_planes<V, CI, CO, 1>(in, wt, bias, q, out);
}

template <class V, int C>
void conv3x3_forward_t(const Conv3x3& g, const float* x, const float* wt, const float* bias, float* y,
                       void* scratch) {
  const ConvPlanes q = conv3x3_planes_of(g);
  float* xp = static_cast<float*>(scratch);
  float* yp = xp + C * q.padded();
  conv3x3_to_planes<C>(x, g.channels_last, q, xp);
  conv3x3_planes_px<V, C, C>(xp, wt, bias, q, yp);
  conv3x3_from_planes<C>(yp, g.channels_last, q, y);
}

// The input gradient is the correlation of the padded output gradient with the weight flipped in
// space and transposed in channels: gx[c] = sum_{o,tap} w[o][c][last - tap] gy_pad[o](voxel + tap).
template <class V, int C>
void conv3x3_backward_t(const Conv3x3& g, const float* x, const float* wt, const float* gy, float* gx, float* dw,
                        float* db, void* scratch) {
  const ConvPlanes q = conv3x3_planes_of(g);
  float* xp = static_cast<float*>(scratch);
  float* gp = xp + C * q.padded();
  float* gxp = gp + C * q.padded();
  conv3x3_to_planes<C>(x, g.channels_last, q, xp);
  conv3x3_to_planes<C>(gy, g.channels_last, q, gp);
  conv3x3_weight_grad<V, C, C>(xp, gp, q, dw, db);
  if (gx != nullptr) {
    const int64_t taps = q.kd * 9;
    float flipped[C * C * 27];
    for (int o = 0; o < C; ++o)
      for (int c = 0; c < C; ++c)
        for (int64_t k = 0; k < taps; ++k) flipped[(c * C + o) * taps + k] = wt[(o * C + c) * taps + (taps - 1 - k)];
    conv3x3_planes_px<V, C, C>(gp, flipped, nullptr, q, gxp);
    conv3x3_from_planes<C>(gxp, g.channels_last, q, gx);
  }
}

template <class V>
bool conv3x3_forward_impl(const Conv3x3& g, const float* x, const float* wt, const float* bias, float* y,
                          void* scratch) {
  if (g.ci != g.co) return false;
  switch (g.ci) {
    case 2: return conv3x3_forward_t<V, 2>(g, x, wt, bias, y, scratch), true;
    case 4: return conv3x3_forward_t<V, 4>(g, x, wt, bias, y, scratch), true;
    case 8: return conv3x3_forward_t<V, 8>(g, x, wt, bias, y, scratch), true;
    default: return false;
  }
}

template <class V>
bool conv3x3_backward_impl(const Conv3x3& g, const float* x, const float* wt, const float* gy, float* gx, float* dw,
                           float* db, void* scratch) {
  if (g.ci != g.co) return false;
  switch (g.ci) {
    case 2: return conv3x3_backward_t<V, 2>(g, x, wt, gy, gx, dw, db, scratch), true;
    case 4: return conv3x3_backward_t<V, 4>(g, x, wt, gy, gx, dw, db, scratch), true;
    case 8: return conv3x3_backward_t<V, 8>(g, x, wt, gy, gx, dw, db, scratch), true;
    default: return false;
  }
}
