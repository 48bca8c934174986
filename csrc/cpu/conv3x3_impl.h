// 3x3 convolutions (stride 1, zero padding 1) of one channels-last float32 image with few
// channels, for W lanes. Included by each instruction set's translation unit after its vector
// type is defined; see conv3x3_supported in kernels.h for the channel counts.
//
// oneDNN runs these at 4-16 channels far below the FMA peak (its blocked kernels pad the channel
// axis to a vector). Here each channel is transposed into a zero-padded plane, so a vector holds
// W neighbouring pixels of one channel and every FMA lane does useful work: the output of a
// vector of pixels is sum_{c,dy,dx} broadcast(weight) * (the input plane read at offset dy,dx).
// Included inside the translation unit's namespace: std::memset comes from kernels.h.
#pragma once

// Channels-last image [h][w][C] -> C zero-padded planes [C][h + 2][stride], pixel (y, x) at
// plane row y + 1, column x + 1; the border and the columns past w + 1 stay zero.
template <int C>
inline void conv3x3_to_planes(const float* img, int64_t h, int64_t w, int64_t stride, float* planes) {
  const int64_t plane = (h + 2) * stride;
  std::memset(planes, 0, sizeof(float) * static_cast<std::size_t>(C * plane));
  for (int64_t y = 0; y < h; ++y) {
    const float* src = img + y * w * C;
    float* dst = planes + (y + 1) * stride + 1;
    for (int64_t x = 0; x < w; ++x)
      for (int c = 0; c < C; ++c) dst[c * plane + x] = src[x * C + c];
  }
}

// out[c] rows of C planes laid out as conv3x3_to_planes's interior (row y at plane row y, no
// border: the output planes are not padded) -> channels-last image [h][w][C].
template <int C>
inline void conv3x3_from_planes(const float* planes, int64_t h, int64_t w, int64_t stride, float* img) {
  const int64_t plane = h * stride;
  for (int64_t y = 0; y < h; ++y) {
    const float* src = planes + y * stride;
    float* dst = img + y * w * C;
    for (int64_t x = 0; x < w; ++x)
      for (int c = 0; c < C; ++c) dst[x * C + c] = src[c * plane + x];
  }
}

// out planes [CO][h][stride] = bias + 3x3 correlation of the padded input planes [CI][h+2][stride]
// with wt [CO][CI][3][3]; columns w..roundup(w, 2 W) hold values nobody reads. Two vectors of
// pixels and up to 8 (4 with 16 registers) output channels per pass: independent FMA chains
// enough to cover the FMA latency.
template <class V, int CI, int CO>
void conv3x3_planes(const float* in, const float* wt, const float* bias, int64_t h, int64_t w, int64_t stride,
                    float* out) {
  using F = typename V::F;
  constexpr int OB = V::W >= 16 ? (CO < 8 ? CO : 8) : (CO < 4 ? CO : 4);
  constexpr int L = V::W;
  const int64_t in_plane = (h + 2) * stride, out_plane = h * stride;
  for (int ob = 0; ob < CO; ob += OB) {
    for (int64_t y = 0; y < h; ++y) {
      for (int64_t x0 = 0; x0 < w; x0 += 2 * L) {
        F acc[OB], acc2[OB];
        for (int o = 0; o < OB; ++o) acc[o] = acc2[o] = V::set1(bias != nullptr ? bias[ob + o] : 0.0f);
        for (int c = 0; c < CI; ++c) {
          for (int dy = 0; dy < 3; ++dy) {
            const float* row = in + c * in_plane + (y + dy) * stride + x0;
            const F a = V::load_s(row), b = V::load_s(row + 1), d = V::load_s(row + 2);
            const F a2 = V::load_s(row + L), b2 = V::load_s(row + L + 1), d2 = V::load_s(row + L + 2);
            const float* k = wt + ((ob * CI) + c) * 9 + dy * 3;
            for (int o = 0; o < OB; ++o) {
              const float* ko = k + o * CI * 9;
              const F k0 = V::set1(ko[0]), k1 = V::set1(ko[1]), k2 = V::set1(ko[2]);
              acc[o] = V::fmadd(k0, a, acc[o]);
              acc2[o] = V::fmadd(k0, a2, acc2[o]);
              acc[o] = V::fmadd(k1, b, acc[o]);
              acc2[o] = V::fmadd(k1, b2, acc2[o]);
              acc[o] = V::fmadd(k2, d, acc[o]);
              acc2[o] = V::fmadd(k2, d2, acc2[o]);
            }
          }
        }
        for (int o = 0; o < OB; ++o) {
          float* dst = out + (ob + o) * out_plane + y * stride + x0;
          V::store_s(dst, acc[o]);
          V::store_s(dst + L, acc2[o]);
        }
      }
    }
  }
}

// dw [CO][CI][3][3] = sum over pixels of grad (padded planes [CO][h+2][stride], zero past column
// w) times the padded input planes shifted by (dy, dx); db [CO] = sum of grad. Overwritten.
template <class V, int CI, int CO>
void conv3x3_weight_grad(const float* in, const float* grad, int64_t h, int64_t w, int64_t stride, float* dw,
                         float* db) {
  using F = typename V::F;
  constexpr int OB = V::W >= 16 ? (CO < 8 ? CO : 8) : (CO < 4 ? CO : 4);
  const int64_t plane = (h + 2) * stride;
  for (int ob = 0; ob < CO; ob += OB) {
    for (int c = 0; c < CI; ++c) {
      for (int dy = 0; dy < 3; ++dy) {
        F acc[OB][3];
        for (int o = 0; o < OB; ++o) acc[o][0] = acc[o][1] = acc[o][2] = V::zero();
        for (int64_t y = 0; y < h; ++y) {
          const float* xr = in + c * plane + (y + dy) * stride;
          const float* gr = grad + ob * plane + (y + 1) * stride + 1;
          for (int64_t x0 = 0; x0 < w; x0 += V::W) {
            const F a = V::load_s(xr + x0), b = V::load_s(xr + x0 + 1), d = V::load_s(xr + x0 + 2);
            for (int o = 0; o < OB; ++o) {
              const F g = V::load_s(gr + o * plane + x0);
              acc[o][0] = V::fmadd(g, a, acc[o][0]);
              acc[o][1] = V::fmadd(g, b, acc[o][1]);
              acc[o][2] = V::fmadd(g, d, acc[o][2]);
            }
          }
        }
        for (int o = 0; o < OB; ++o)
          for (int dx = 0; dx < 3; ++dx) dw[((ob + o) * CI + c) * 9 + dy * 3 + dx] = V::hsum(acc[o][dx]);
      }
    }
  }
  for (int o = 0; o < CO; ++o) {
    F acc = V::zero();
    for (int64_t y = 0; y < h; ++y) {
      const float* gr = grad + o * plane + (y + 1) * stride + 1;
      for (int64_t x0 = 0; x0 < w; x0 += V::W) acc = V::add(acc, V::load_s(gr + x0));
    }
    db[o] = V::hsum(acc);
  }
}

template <class V, int CI, int CO>
void conv3x3_forward_t(const Conv3x3& g, const float* x, const float* wt, const float* bias, float* y,
                       void* scratch) {
  const int64_t stride = conv3x3_row_stride(g.w);
  float* xp = static_cast<float*>(scratch);
  float* yp = xp + CI * (g.h + 2) * stride;
  conv3x3_to_planes<CI>(x, g.h, g.w, stride, xp);
  conv3x3_planes<V, CI, CO>(xp, wt, bias, g.h, g.w, stride, yp);
  conv3x3_from_planes<CO>(yp, g.h, g.w, stride, y);
}

// The input gradient is the correlation of the padded output gradient with the weight flipped in
// space and transposed in channels: gx[c] = sum_{o,dy,dx} w[o][c][2-dy][2-dx] gy_pad[o](y+dy, x+dx).
template <class V, int CI, int CO>
void conv3x3_backward_t(const Conv3x3& g, const float* x, const float* wt, const float* gy, float* gx, float* dw,
                        float* db, void* scratch) {
  const int64_t stride = conv3x3_row_stride(g.w);
  const int64_t plane = (g.h + 2) * stride;
  float* xp = static_cast<float*>(scratch);
  float* gp = xp + CI * plane;
  float* gxp = gp + CO * plane;
  conv3x3_to_planes<CI>(x, g.h, g.w, stride, xp);
  conv3x3_to_planes<CO>(gy, g.h, g.w, stride, gp);
  conv3x3_weight_grad<V, CI, CO>(xp, gp, g.h, g.w, stride, dw, db);
  if (gx != nullptr) {
    float flipped[CI * CO * 9];
    for (int o = 0; o < CO; ++o)
      for (int c = 0; c < CI; ++c)
        for (int k = 0; k < 9; ++k) flipped[(c * CO + o) * 9 + k] = wt[(o * CI + c) * 9 + (8 - k)];
    conv3x3_planes<V, CO, CI>(gp, flipped, nullptr, g.h, g.w, stride, gxp);
    conv3x3_from_planes<CI>(gxp, g.h, g.w, stride, gx);
  }
}

template <class V>
bool conv3x3_forward_impl(const Conv3x3& g, const float* x, const float* wt, const float* bias, float* y,
                          void* scratch) {
  if (g.ci == 4 && g.co == 4) return conv3x3_forward_t<V, 4, 4>(g, x, wt, bias, y, scratch), true;
  if (g.ci == 8 && g.co == 8) return conv3x3_forward_t<V, 8, 8>(g, x, wt, bias, y, scratch), true;
  return false;
}

template <class V>
bool conv3x3_backward_impl(const Conv3x3& g, const float* x, const float* wt, const float* gy, float* gx, float* dw,
                           float* db, void* scratch) {
  if (g.ci == 4 && g.co == 4) return conv3x3_backward_t<V, 4, 4>(g, x, wt, gy, gx, dw, db, scratch), true;
  if (g.ci == 8 && g.co == 8) return conv3x3_backward_t<V, 8, 8>(g, x, wt, gy, gx, dw, db, scratch), true;
  return false;
}
