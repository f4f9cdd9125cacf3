// Evaluation tail of a CBAM block on the CPU, float32, channels_last: y = relu(F * a * b + shortcut),
// F = x * s + t (the block's BatchNorm with running statistics), a = Mc (Eq. 2), b = Ms (Eq. 3).
// Loaded by cbam/cpu_tail.py (see there for why it is hand-written); compiled with -fopenmp against
// the libgomp that torch has already loaded, so it shares torch's threads.
//
// Memory layout: x[((n * H + h) * W + w) * C + c]; pointers are contiguous; a null pointer means absent
// (no channel gate, no shortcut, no spatial gate, no conv bias, no spatial BatchNorm); without the block's
// BatchNorm, s = 1 and t = 0.

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

// The max loops below skip NaN (a comparison with NaN is false); torch.amax propagates it. A NaN among a
// channel's values also makes its sum NaN, so where the sum is NaN the max is taken again by this. (The
// spatial descriptor needs no such step: a NaN mean makes the conv's output NaN around it anyway.)
float channel_max_with_nan(const float* x, int64_t hw, int64_t channels, float s, float t) {  // one channel
  float m = -kInf;
  for (int64_t p = 0; p < hw; ++p) {
    const float f = x[p * channels] * s + t;
    if (std::isnan(f)) return f;
    m = std::max(m, f);
  }
  return m;
}

// AvgPool and MaxPool over the hw positions of one image's F = x * s + t. Four positions are combined in
// registers before they meet the per-channel accumulators (1.9x faster than one at a time, which is
// limited by the accumulators' loads and stores); sums go from float to double every 64 positions.
void channel_pool_image(const float* __restrict x, int64_t channels, int64_t hw, const float* __restrict s,
                        const float* __restrict t, float* __restrict avg, float* __restrict mx) {
  std::vector<double> dsum_buf(channels, 0.0);
  std::vector<float> fsum_buf(channels, 0.0f);
  double* __restrict dsum = dsum_buf.data();
  float* __restrict fsum = fsum_buf.data();
  std::fill(mx, mx + channels, -kInf);
  const int64_t c1 = channels, c2 = 2 * channels, c3 = 3 * channels;
  for (int64_t p = 0; p < hw;) {
    const float* __restrict r = x + p * channels;
    if (p + 4 <= hw) {
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        const float f0 = r[c] * s[c] + t[c], f1 = r[c1 + c] * s[c] + t[c];
        const float f2 = r[c2 + c] * s[c] + t[c], f3 = r[c3 + c] * s[c] + t[c];
        fsum[c] += (f0 + f1) + (f2 + f3);
        const float m = std::max(std::max(f0, f1), std::max(f2, f3));
        mx[c] = m > mx[c] ? m : mx[c];
      }
      p += 4;
    } else {
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        const float f = r[c] * s[c] + t[c];
        fsum[c] += f;
        mx[c] = f > mx[c] ? f : mx[c];
      }
      p += 1;
    }
    if (p % 64 == 0 || p == hw) {
#pragma omp simd
      for (int64_t c = 0; c < channels; ++c) {
        dsum[c] += fsum[c];
        fsum[c] = 0.0f;
      }
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    avg[c] = static_cast<float>(dsum[c] / static_cast<double>(hw));
    if (std::isnan(avg[c])) mx[c] = channel_max_with_nan(x + c, hw, channels, s[c], t[c]);
  }
}

// The descriptor [max; mean] over C of v = x * ds + dt at `count` consecutive positions (at most 4) of
// rows: four positions reduced side by side give four independent chains of vector operations.
void descriptor(const float* __restrict rows, int64_t channels, int64_t count, const float* __restrict ds,
                const float* __restrict dt, float* dmax, float* dmean) {
  const float inv_c = 1.0f / static_cast<float>(channels);
  if (count == 4) {
    const float *r0 = rows, *r1 = rows + channels, *r2 = rows + 2 * channels, *r3 = rows + 3 * channels;
    float m0 = -kInf, m1 = -kInf, m2 = -kInf, m3 = -kInf, s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
#pragma omp simd reduction(max : m0, m1, m2, m3) reduction(+ : s0, s1, s2, s3)
    for (int64_t c = 0; c < channels; ++c) {
      const float v0 = r0[c] * ds[c] + dt[c], v1 = r1[c] * ds[c] + dt[c];
      const float v2 = r2[c] * ds[c] + dt[c], v3 = r3[c] * ds[c] + dt[c];
      m0 = v0 > m0 ? v0 : m0;
      m1 = v1 > m1 ? v1 : m1;
      m2 = v2 > m2 ? v2 : m2;
      m3 = v3 > m3 ? v3 : m3;
      s0 += v0;
      s1 += v1;
      s2 += v2;
      s3 += v3;
    }
    dmax[0] = m0, dmax[1] = m1, dmax[2] = m2, dmax[3] = m3;
    dmean[0] = s0 * inv_c, dmean[1] = s1 * inv_c, dmean[2] = s2 * inv_c, dmean[3] = s3 * inv_c;
    return;
  }
  for (int64_t k = 0; k < count; ++k) {
    const float* __restrict r = rows + k * channels;
    float m = -kInf, sum = 0.0f;
#pragma omp simd reduction(max : m) reduction(+ : sum)
    for (int64_t c = 0; c < channels; ++c) {
      const float v = r[c] * ds[c] + dt[c];
      m = v > m ? v : m;
      sum += v;
    }
    dmax[k] = m;
    dmean[k] = sum * inv_c;
  }
}

// The spatial gate's k x k conv (2 input maps) and what follows it, z * scale + shift (its bias and BN).
struct SpatialConv {
  const float* weight;
  int64_t ksize;
  float scale, shift;
};

// Eq. (3) for output row o of a height x width map: conv_kxk([max; mean]) with zero padding, then BN (as
// scale, shift), sigmoid. dmax and dmean hold rows of width + 2 * pad with zeros at both ends, so the
// conv is a sum of shifted rows, vectorised along w.
void spatial_gate_row(const float* dmax, const float* dmean, int64_t o, int64_t height, int64_t width,
                      const SpatialConv& conv, float* __restrict z) {
  const float* weight = conv.weight;
  const int64_t ksize = conv.ksize, pad = ksize / 2, stride = width + 2 * pad;
  std::fill(z, z + width, 0.0f);
  for (int64_t i = 0; i < ksize; ++i) {
    const int64_t hh = o + i - pad;
    if (hh < 0 || hh >= height) continue;
    for (int64_t j = 0; j < ksize; ++j) {
      const float w_max = weight[i * ksize + j], w_mean = weight[(ksize + i) * ksize + j];
      const float* __restrict pmax = dmax + hh * stride + j;
      const float* __restrict pmean = dmean + hh * stride + j;
#pragma omp simd
      for (int64_t w = 0; w < width; ++w) z[w] += w_max * pmax[w] + w_mean * pmean[w];
    }
  }
  for (int64_t w = 0; w < width; ++w) z[w] = 1.0f / (1.0f + std::exp(-(z[w] * conv.scale + conv.shift)));
}

}  // namespace

extern "C" {

// cbam_spatial_output's arguments (mirrored by cpu_tail.py's SpatialOutputArgs): the block's conv output
// x and the result out (N, H, W, C memory), the shortcut (null: none), F = x * s + t per channel, the
// channel gate a (N, C; null: none), whether the spatial descriptor pools F * a (desc_gated) or F, and
// the spatial gate's conv (weight null: no spatial gate), bias (null: none) and BatchNorm (null: none).
struct SpatialOutputArgs {
  const float* x;
  float* out;
  const float* shortcut;
  int64_t n_img, channels, height, width;
  const float *s, *t, *a;
  int64_t desc_gated;
  const float *weight, *bias;
  int64_t ksize;
  const float *sbn_gamma, *sbn_beta, *sbn_mean, *sbn_var;
  double sbn_eps;
};

// Pass 1: AvgPool and MaxPool over H, W of F (the channel gate's descriptors) into avg and max (N, C),
// one image per task.
void cbam_channel_pool(const float* x, int64_t n_img, int64_t channels, int64_t hw, const float* s,
                       const float* t, float* avg, float* max) {
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < n_img; ++n) {
    channel_pool_image(x + n * hw * channels, channels, hw, s, t, avg + n * channels, max + n * channels);
  }
}

// Pass 2, one image per task. Row r's spatial descriptor [max; mean] over C of v = x * ds + dt (F * a
// when desc_gated, else F); then, k // 2 rows behind, row o = r - k // 2's spatial gate b and output
// relu((x * os + ot) * b + shortcut) with x * os + ot = F * a. The row being written was read k // 2 rows
// ago, so it comes from L2 rather than memory. out may be x itself: a row is overwritten only after
// every descriptor row that reads it. Without a spatial gate (weight null) b = 1.
void cbam_spatial_output(const SpatialOutputArgs* args) {
  const float* x = args->x;
  float* out = args->out;
  const float* shortcut = args->shortcut;
  const int64_t n_img = args->n_img, channels = args->channels, height = args->height, width = args->width;
  const float *s = args->s, *t = args->t, *a = args->a, *weight = args->weight;
  const bool desc_gated = args->desc_gated != 0;
  const int64_t pad = weight ? args->ksize / 2 : 0;
  SpatialConv conv{weight, args->ksize, 1.0f, args->bias ? args->bias[0] : 0.0f};
  if (args->sbn_gamma) {  // BN(z + bias) = (z + bias - mean) * gamma / sqrt(var + eps) + beta
    const double var = static_cast<double>(args->sbn_var[0]);
    const float invstd = static_cast<float>(1.0 / std::sqrt(var + args->sbn_eps));
    conv.scale = invstd * args->sbn_gamma[0];
    conv.shift = (conv.shift - args->sbn_mean[0]) * conv.scale + args->sbn_beta[0];
  }
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < n_img; ++n) {
    // Per-channel coefficients of this image: F * a = x * (s * a) + t * a.
    std::vector<float> coef(4 * channels);
    float *__restrict os = coef.data(), *__restrict ot = os + channels;
    float *__restrict ds = ot + channels, *__restrict dt = ds + channels;
    for (int64_t c = 0; c < channels; ++c) {
      const float ac = a ? a[n * channels + c] : 1.0f;
      os[c] = s[c] * ac;
      ot[c] = t[c] * ac;
      ds[c] = desc_gated ? os[c] : s[c];
      dt[c] = desc_gated ? ot[c] : t[c];
    }
    const int64_t stride = width + 2 * pad;  // descriptor rows with zero padding at both ends
    std::vector<float> dmax(weight ? height * stride : 0, 0.0f), dmean(weight ? height * stride : 0, 0.0f);
    std::vector<float> b(width, 1.0f);
    for (int64_t r = 0; r < height + pad; ++r) {
      if (weight && r < height) {
        for (int64_t w = 0; w < width; w += 4) {
          const float* rows = x + ((n * height + r) * width + w) * channels;
          const int64_t at = r * stride + pad + w;
          descriptor(rows, channels, std::min<int64_t>(4, width - w), ds, dt, dmax.data() + at, dmean.data() + at);
        }
      }
      const int64_t o = r - pad;
      if (o < 0) continue;
      if (weight) spatial_gate_row(dmax.data(), dmean.data(), o, height, width, conv, b.data());
      for (int64_t w = 0; w < width; ++w) {
        const int64_t offset = ((n * height + o) * width + w) * channels;
        const float* row = x + offset;
        float* dst = out + offset;  // may be row: each element is read before it is written
        const float bw = b[w];
        if (shortcut) {
          const float* __restrict sc = shortcut + offset;
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) dst[c] = std::max((row[c] * os[c] + ot[c]) * bw + sc[c], 0.0f);
        } else {
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) dst[c] = (row[c] * os[c] + ot[c]) * bw;
        }
      }
    }
  }
}

}  // extern "C"
