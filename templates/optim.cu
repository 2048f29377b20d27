// optim.cu — the optimizers, one fused kernel over the whole flat buffer of
// parameters (AdamW, SGD), and the dense element-wise helpers: scale, add,
// axpy, bias add and bias gradient, and C = beta C (a GEMM with nothing to
// multiply). Semantics: runtime/cpu_ops.h and backend.h.
//
// The optimizers take `gscale` and `low`. gscale, when not null: the
// gradient is g * *gscale (the clipping factor moert_k_clip_factor left on
// the device: clipping takes no pass of its own, and the host reads nothing).
// low, when not null: they also store the updated parameters rounded to bf16
// there (the bf16 copy the expert GEMMs read), so the masters are read once a
// step, not twice.
//
// Launch (runtime/backend_cuda.c): 1-D kernels 256 threads, grid-stride,
// float4 when every pointer is 16-byte aligned; bias_add and scale_rows
// blockIdx.x over the columns, blockIdx.y striding over the rows; bias_grad
// column-chunk partials (blockDim (32, 8)) finished by moert_k_colsum_add.

// ---------------------------------------------------------------- kernels

// AdamW (decoupled weight decay) with bias corrections bc1 = 1 - b1^step,
// bc2 = 1 - b2^step (from the host, in double):
// m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr * ((m / bc1) / (sqrt(v / bc2) + eps) + wd * p).
__device__ __forceinline__ void moert_adamw1(float *p, float g, float *m, float *v, float lr,
                                             float b1, float b2, float eps, float wd, float bc1,
                                             float bc2) {
  float mi = b1 * *m + (1.0f - b1) * g;
  float vi = b2 * *v + (1.0f - b2) * g * g;
  *m = mi;
  *v = vi;
  float upd = (mi / bc1) / (sqrtf(vi / bc2) + eps) + wd * *p;
  *p = *p - lr * upd;
}

// Four bf16 values stored as one 8-byte word.
__device__ __forceinline__ void moert_store_bf16x4(moert_bf16 *low, long long i4, float4 v) {
  uint2 w;
  w.x = (unsigned)moert_f2bf(v.x) | (unsigned)moert_f2bf(v.y) << 16;
  w.y = (unsigned)moert_f2bf(v.z) | (unsigned)moert_f2bf(v.w) << 16;
  ((uint2 *)low)[i4] = w;
}

extern "C" __global__ void moert_k_adamw(float *p, const float *g, float *m, float *v,
                                         long long n, float lr, float b1, float b2, float eps,
                                         float wd, float bc1, float bc2, const float *gscale,
                                         moert_bf16 *low) {
  long long i0 = moert_gtid(), step = moert_gstride();
  const float gs = gscale ? *gscale : 1.0f;
  long long n4 = moert_aligned16(p) && moert_aligned16(g) && moert_aligned16(m) &&
                         moert_aligned16(v) && ((unsigned long long)low & 7) == 0
                     ? n / 4
                     : 0;
  for (long long i = i0; i < n4; i += step) {
    float4 pp = ((float4 *)p)[i], gg = ((const float4 *)g)[i];
    float4 mm = ((float4 *)m)[i], vv = ((float4 *)v)[i];
    gg.x *= gs;
    gg.y *= gs;
    gg.z *= gs;
    gg.w *= gs;
    moert_adamw1(&pp.x, gg.x, &mm.x, &vv.x, lr, b1, b2, eps, wd, bc1, bc2);
    moert_adamw1(&pp.y, gg.y, &mm.y, &vv.y, lr, b1, b2, eps, wd, bc1, bc2);
    moert_adamw1(&pp.z, gg.z, &mm.z, &vv.z, lr, b1, b2, eps, wd, bc1, bc2);
    moert_adamw1(&pp.w, gg.w, &mm.w, &vv.w, lr, b1, b2, eps, wd, bc1, bc2);
    ((float4 *)p)[i] = pp;
    ((float4 *)m)[i] = mm;
    ((float4 *)v)[i] = vv;
    if (low) moert_store_bf16x4(low, i, pp);
  }
  for (long long i = n4 * 4 + i0; i < n; i += step) {
    moert_adamw1(p + i, g[i] * gs, m + i, v + i, lr, b1, b2, eps, wd, bc1, bc2);
    if (low) low[i] = moert_f2bf(p[i]);
  }
}

// SGD: p -= lr * (g + wd * p); low as for AdamW.
extern "C" __global__ void moert_k_sgd(float *p, const float *g, long long n, float lr,
                                       float wd, const float *gscale, moert_bf16 *low) {
  long long i0 = moert_gtid(), step = moert_gstride();
  const float gs = gscale ? *gscale : 1.0f;
  long long n4 =
      moert_aligned16(p) && moert_aligned16(g) && ((unsigned long long)low & 7) == 0 ? n / 4 : 0;
  for (long long i = i0; i < n4; i += step) {
    float4 pp = ((float4 *)p)[i], gg = ((const float4 *)g)[i];
    gg.x *= gs;
    gg.y *= gs;
    gg.z *= gs;
    gg.w *= gs;
    pp.x -= lr * (gg.x + wd * pp.x);
    pp.y -= lr * (gg.y + wd * pp.y);
    pp.z -= lr * (gg.z + wd * pp.z);
    pp.w -= lr * (gg.w + wd * pp.w);
    ((float4 *)p)[i] = pp;
    if (low) moert_store_bf16x4(low, i, pp);
  }
  for (long long i = n4 * 4 + i0; i < n; i += step) {
    p[i] -= lr * (g[i] * gs + wd * p[i]);
    if (low) low[i] = moert_f2bf(p[i]);
  }
}

// The gradient norm, left on the device (moert_cpu_norm_split,
// moert_cpu_clip_factor): the sum s of part[0..n) as two floats hilo =
// (float)s, (float)(s - hilo[0]), which the float all-reduce carries over
// ranks; then norm = sqrt(sum of part + hilo), factor = clip / norm when
// clip > 0 and norm > clip, else 1. n is a few dozen at most: one thread,
// in order, as the cpu.
extern "C" __global__ void moert_k_norm_split(const double *part, long long n, float *hilo) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double s = 0.0;
  for (long long i = 0; i < n; i++) s += part[i];
  float hi = (float)s;
  hilo[0] = hi;
  hilo[1] = (float)(s - (double)hi);
}

extern "C" __global__ void moert_k_clip_factor(const double *part, long long n, const float *hilo,
                                               double clip, double *norm, float *factor) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double s = 0.0;
  for (long long i = 0; i < n; i++) s += part[i];
  s += (double)hilo[0];
  s += (double)hilo[1];
  double r = sqrt(s);
  *norm = r;
  *factor = clip > 0.0 && r > clip ? (float)(clip / r) : 1.0f;
}

// The cosine gate's temperature where it lives (backend.h's scale_by_exp,
// add_dot_unclamped): t = min(*log_scale, max_log); y = x * (float)exp(t),
// grid-stride; and *acc += (float)(sum of part[0..n)) unless t was clamped,
// one block of 1024 summing moert_k_dot's partials (as moert_k_reduce_sum).
extern "C" __global__ void moert_k_scale_by_exp(float *y, const float *x, long long n,
                                                const float *log_scale, double max_log) {
  double t = (double)*log_scale;
  const float s = (float)exp(t >= max_log ? max_log : t);
  for (long long i = moert_gtid(); i < n; i += moert_gstride()) y[i] = x[i] * s;
}

extern "C" __global__ void moert_k_add_dot_unclamped(const double *part, long long n,
                                                     const float *log_scale, double max_log,
                                                     float *acc) {
  __shared__ double sh[MOERT_MAX_WARPS];
  double s = 0.0;
  for (long long i = threadIdx.x; i < n; i += blockDim.x) s += part[i];
  s = moert_block_sum_d(s, sh);
  if (threadIdx.x == 0 && !((double)*log_scale >= max_log)) *acc += (float)s;
}

// x *= s.
extern "C" __global__ void moert_k_scale(float *x, long long n, float s) {
  long long i0 = moert_gtid(), step = moert_gstride();
  long long n4 = moert_aligned16(x) ? n / 4 : 0;
  for (long long i = i0; i < n4; i += step) {
    float4 v = ((float4 *)x)[i];
    v.x *= s;
    v.y *= s;
    v.z *= s;
    v.w *= s;
    ((float4 *)x)[i] = v;
  }
  for (long long i = n4 * 4 + i0; i < n; i += step) x[i] *= s;
}

// y = a + b.
extern "C" __global__ void moert_k_add(float *y, const float *a, const float *b, long long n) {
  long long i0 = moert_gtid(), step = moert_gstride();
  long long n4 = moert_aligned16(y) && moert_aligned16(a) && moert_aligned16(b) ? n / 4 : 0;
  for (long long i = i0; i < n4; i += step) {
    float4 u = ((const float4 *)a)[i], v = ((const float4 *)b)[i];
    ((float4 *)y)[i] = make_float4(u.x + v.x, u.y + v.y, u.z + v.z, u.w + v.w);
  }
  for (long long i = n4 * 4 + i0; i < n; i += step) y[i] = a[i] + b[i];
}

// y += alpha x.
extern "C" __global__ void moert_k_axpy(float *y, const float *x, float alpha, long long n) {
  long long i0 = moert_gtid(), step = moert_gstride();
  long long n4 = moert_aligned16(y) && moert_aligned16(x) ? n / 4 : 0;
  for (long long i = i0; i < n4; i += step) {
    float4 u = ((float4 *)y)[i], v = ((const float4 *)x)[i];
    u.x += alpha * v.x;
    u.y += alpha * v.y;
    u.z += alpha * v.z;
    u.w += alpha * v.w;
    ((float4 *)y)[i] = u;
  }
  for (long long i = n4 * 4 + i0; i < n; i += step) y[i] += alpha * x[i];
}

// y[r, :] += bias; y is [rows, cols].
extern "C" __global__ void moert_k_bias_add(float *y, const float *bias, long long rows,
                                            long long cols) {
  bool v4 = cols % 4 == 0 && moert_aligned16(y) && moert_aligned16(bias);
  long long w = v4 ? cols / 4 : cols;
  for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
    float *yr = y + r * cols;
    for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < w;
         c += (long long)gridDim.x * blockDim.x) {
      if (v4) {
        float4 u = ((float4 *)yr)[c], b = ((const float4 *)bias)[c];
        ((float4 *)yr)[c] = make_float4(u.x + b.x, u.y + b.y, u.z + b.z, u.w + b.w);
      } else {
        yr[c] += bias[c];
      }
    }
  }
}

// Partials of dbias (sum over the rows of dy), for moert_k_colsum_add.
extern "C" __global__ void moert_k_bias_grad_part(const float *dy, long long rows, long long ld,
                                                  long long w, long long rpc, double *part) {
  moert_colsum_part<1>([&](long long r, long long c, double *acc) { acc[0] += dy[r * ld + c]; },
                       rows, w, rpc, part, (double *)0);
}

// C = beta C over m rows of n columns with row stride ldc; beta == 0 writes
// zeros (C is not read, as BLAS).
extern "C" __global__ void moert_k_scale_rows(float *c, long long m, long long n, long long ldc,
                                              float beta) {
  for (long long r = blockIdx.y; r < m; r += gridDim.y)
    for (long long j = (long long)blockIdx.x * blockDim.x + threadIdx.x; j < n;
         j += (long long)gridDim.x * blockDim.x)
      c[r * ldc + j] = beta == 0.0f ? 0.0f : c[r * ldc + j] * beta;
}
