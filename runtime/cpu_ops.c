/* cpu_ops.c — the cpu backend's ops (see cpu_ops.h): fp32 data, sums and
 * transcendental functions in double, no allocation. This is the reference
 * every other backend is compared against, so accuracy and clarity come
 * before speed; only the GEMM is tuned (CBLAS when the build found it, else a
 * cache-blocked loop).
 *
 * Kept precision-neutral on purpose: the unit tests build a double twin of
 * this file by renaming the word `float` to `double` (tests/unit/twin.cmake)
 * and check every gradient against finite differences in double. So tensor
 * data (and the GEMM's accumulators, as in BLAS) is typed `float`, everything
 * else `double`, and neither f-suffixed literals nor f-suffixed math
 * functions appear below. */
#include "cpu_ops.h"
#include "cpu_ops_typed.h" /* moert_f32_to_bf16: the optimizers' bf16 copy */

#include <assert.h>
#include <math.h>
#include <string.h>

#if defined(MOERT_HAVE_CBLAS) && !defined(MOERT_NO_CBLAS)
#include <cblas.h>
#include <limits.h>
#define USE_CBLAS 1
#else
#define USE_CBLAS 0
#endif

/* Column reductions (bias and norm-parameter gradients, gate statistics,
 * column norms) walk the rows once per block of this many columns, summing
 * each column in a double on the stack: contiguous reads, exact-enough sums,
 * no scratch from the caller. */
enum { COL_BLOCK = 64 };

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* --- dense --- */

/* Blocked GEMM: op(A) and op(B) blocks are packed row-major into stack
 * buffers (which also removes the transposes), then multiplied in MR x NR
 * register tiles. The packs take (MB + NB) * KB floats, 80 KiB: small enough
 * for any thread's stack. */
enum { GEMM_MR = 4, GEMM_NR = 16, GEMM_MB = 32, GEMM_NB = 128, GEMM_KB = 128 };

/* C = beta * C; beta == 0 writes zeros (BLAS: C is not read, NaN does not
 * survive). */
static void scale_rows(float *c, int64_t m, int64_t n, int64_t ldc, float beta) {
  if (beta == 1) return;
  for (int64_t i = 0; i < m; i++) {
    float *row = c + i * ldc;
    if (beta == 0)
      memset(row, 0, (size_t)n * sizeof *row);
    else
      for (int64_t j = 0; j < n; j++) row[j] *= beta;
  }
}

/* ap[i, p] = op(A)[i0 + i, p0 + p] for an mb x kb block. */
static void pack_a(bool trans, const float *a, int64_t lda, int64_t i0, int64_t p0, int64_t mb,
                   int64_t kb, float *ap) {
  if (!trans) {
    for (int64_t i = 0; i < mb; i++)
      memcpy(ap + i * kb, a + (i0 + i) * lda + p0, (size_t)kb * sizeof *ap);
  } else { /* op(A)[i, p] = A[p, i] */
    for (int64_t p = 0; p < kb; p++) {
      const float *src = a + (p0 + p) * lda + i0;
      for (int64_t i = 0; i < mb; i++) ap[i * kb + p] = src[i];
    }
  }
}

/* bp[p, j] = op(B)[p0 + p, j0 + j] for a kb x nb block. */
static void pack_b(bool trans, const float *b, int64_t ldb, int64_t p0, int64_t j0, int64_t kb,
                   int64_t nb, float *bp) {
  if (!trans) {
    for (int64_t p = 0; p < kb; p++)
      memcpy(bp + p * nb, b + (p0 + p) * ldb + j0, (size_t)nb * sizeof *bp);
  } else { /* op(B)[p, j] = B[j, p] */
    for (int64_t j = 0; j < nb; j++) {
      const float *src = b + (j0 + j) * ldb + p0;
      for (int64_t p = 0; p < kb; p++) bp[p * nb + j] = src[p];
    }
  }
}

/* C[mb, nb] += alpha * ap[mb, kb] @ bp[kb, nb]. */
static void gemm_block(const float *ap, const float *bp, int64_t mb, int64_t nb, int64_t kb,
                       float alpha, float *c, int64_t ldc) {
  for (int64_t i = 0; i < mb; i += GEMM_MR) {
    int64_t mr = min64(GEMM_MR, mb - i);
    const float *a = ap + i * kb;
    for (int64_t j = 0; j < nb; j += GEMM_NR) {
      int64_t nr = min64(GEMM_NR, nb - j);
      float acc[GEMM_MR][GEMM_NR] = {{0}};
      if (mr == GEMM_MR && nr == GEMM_NR) {
        for (int64_t p = 0; p < kb; p++) {
          const float *brow = bp + p * nb + j;
          float a0 = a[p], a1 = a[kb + p], a2 = a[2 * kb + p], a3 = a[3 * kb + p];
          for (int q = 0; q < GEMM_NR; q++) {
            acc[0][q] += a0 * brow[q];
            acc[1][q] += a1 * brow[q];
            acc[2][q] += a2 * brow[q];
            acc[3][q] += a3 * brow[q];
          }
        }
      } else {
        for (int64_t p = 0; p < kb; p++) {
          const float *brow = bp + p * nb + j;
          for (int64_t r = 0; r < mr; r++) {
            float ar = a[r * kb + p];
            for (int64_t q = 0; q < nr; q++) acc[r][q] += ar * brow[q];
          }
        }
      }
      for (int64_t r = 0; r < mr; r++) {
        float *crow = c + (i + r) * ldc + j;
        for (int64_t q = 0; q < nr; q++) crow[q] += alpha * acc[r][q];
      }
    }
  }
}

static void gemm_blocked(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                         const float *a, int64_t lda, const float *b, int64_t ldb, float *c,
                         int64_t ldc) {
  float apack[GEMM_MB * GEMM_KB];
  float bpack[GEMM_KB * GEMM_NB];
  for (int64_t j0 = 0; j0 < n; j0 += GEMM_NB) {
    int64_t nb = min64(GEMM_NB, n - j0);
    for (int64_t p0 = 0; p0 < k; p0 += GEMM_KB) {
      int64_t kb = min64(GEMM_KB, k - p0);
      pack_b(trans_b, b, ldb, p0, j0, kb, nb, bpack);
      for (int64_t i0 = 0; i0 < m; i0 += GEMM_MB) {
        int64_t mb = min64(GEMM_MB, m - i0);
        pack_a(trans_a, a, lda, i0, p0, mb, kb, apack);
        gemm_block(apack, bpack, mb, nb, kb, alpha, c + i0 * ldc + j0, ldc);
      }
    }
  }
}

#if USE_CBLAS
static bool fits_int(int64_t x) { return x >= 0 && x <= INT_MAX; }
#endif

void moert_cpu_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                    const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c,
                    int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0 || alpha == 0) { /* BLAS: A and B are not read */
    scale_rows(c, m, n, ldc, beta);
    return;
  }
#if USE_CBLAS
  if (fits_int(m) && fits_int(n) && fits_int(k) && fits_int(lda) && fits_int(ldb) &&
      fits_int(ldc)) {
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, (int)m, (int)n, (int)k, alpha, a, (int)lda, b,
                (int)ldb, beta, c, (int)ldc);
    return;
  }
#endif
  scale_rows(c, m, n, ldc, beta);
  gemm_blocked(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, c, ldc);
}

void moert_cpu_gemm_batched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                            float alpha, const float *a, int64_t lda, int64_t stride_a,
                            const float *b, int64_t ldb, int64_t stride_b, float beta, float *c,
                            int64_t ldc, int64_t stride_c, int64_t count) {
  for (int64_t i = 0; i < count; i++)
    moert_cpu_gemm(trans_a, trans_b, m, n, k, alpha, a + i * stride_a, lda, b + i * stride_b, ldb,
                   beta, c + i * stride_c, ldc);
}

void moert_cpu_bias_add(float *y, const float *bias, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; r++) {
    float *row = y + r * cols;
    for (int64_t c = 0; c < cols; c++) row[c] += bias[c];
  }
}

void moert_cpu_bias_grad(float *dbias, const float *dy, int64_t rows, int64_t cols) {
  for (int64_t c0 = 0; c0 < cols; c0 += COL_BLOCK) {
    int64_t w = min64(COL_BLOCK, cols - c0);
    double acc[COL_BLOCK] = {0};
    for (int64_t r = 0; r < rows; r++) {
      const float *row = dy + r * cols + c0;
      for (int64_t c = 0; c < w; c++) acc[c] += row[c];
    }
    for (int64_t c = 0; c < w; c++) dbias[c0 + c] = (float)(dbias[c0 + c] + acc[c]);
  }
}

/* --- activations --- */

static double sigmoid(double x) {
  if (x >= 0) return 1 / (1 + exp(-x));
  double e = exp(x);
  return e / (1 + e);
}

/* gelu, tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))). */
#define GELU_K 0.7978845608028654 /* sqrt(2/pi) */
#define GELU_C 0.044715

static double gelu(double x) { return 0.5 * x * (1 + tanh(GELU_K * (x + GELU_C * x * x * x))); }

static double gelu_grad(double x) {
  double t = tanh(GELU_K * (x + GELU_C * x * x * x));
  return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * GELU_K * (1 + 3 * GELU_C * x * x);
}

static double silu(double x) { return x * sigmoid(x); }

static double silu_grad(double x) {
  double s = sigmoid(x);
  return s * (1 + x * (1 - s));
}

void moert_cpu_act_fwd(moert_act act, const float *h, float *a, int64_t n) {
  assert(act != MOERT_ACT_SWIGLU && "swiglu is not elementwise: moert_cpu_swiglu_fwd");
  for (int64_t i = 0; i < n; i++) {
    double x = h[i];
    switch (act) {
    case MOERT_ACT_RELU: a[i] = (float)(x > 0 ? x : 0); break;
    case MOERT_ACT_GELU: a[i] = (float)gelu(x); break;
    case MOERT_ACT_SILU:
    case MOERT_ACT_SWIGLU: a[i] = (float)silu(x); break;
    case MOERT_ACT_TANH: a[i] = (float)tanh(x); break;
    }
  }
}

void moert_cpu_act_bwd(moert_act act, const float *h, const float *da, float *dh, int64_t n) {
  assert(act != MOERT_ACT_SWIGLU && "swiglu is not elementwise: moert_cpu_swiglu_bwd");
  for (int64_t i = 0; i < n; i++) {
    double x = h[i];
    switch (act) {
    case MOERT_ACT_RELU: dh[i] = x > 0 ? da[i] : 0; break;
    case MOERT_ACT_GELU: dh[i] = (float)(da[i] * gelu_grad(x)); break;
    case MOERT_ACT_SILU:
    case MOERT_ACT_SWIGLU: dh[i] = (float)(da[i] * silu_grad(x)); break;
    case MOERT_ACT_TANH: dh[i] = (float)(da[i] * (1 - tanh(x) * tanh(x))); break;
    }
  }
}

void moert_cpu_swiglu_fwd(const float *h, float *a, int64_t rows, int64_t hid) {
  for (int64_t r = 0; r < rows; r++) {
    const float *gate = h + r * 2 * hid, *up = gate + hid;
    float *out = a + r * hid;
    for (int64_t j = 0; j < hid; j++) out[j] = (float)(silu(gate[j]) * up[j]);
  }
}

void moert_cpu_swiglu_bwd(const float *h, const float *da, float *dh, int64_t rows, int64_t hid) {
  for (int64_t r = 0; r < rows; r++) {
    const float *gate = h + r * 2 * hid, *up = gate + hid, *d = da + r * hid;
    float *dgate = dh + r * 2 * hid, *dup = dgate + hid;
    for (int64_t j = 0; j < hid; j++) {
      double x = gate[j];
      dgate[j] = (float)(d[j] * up[j] * silu_grad(x));
      dup[j] = (float)(d[j] * silu(x));
    }
  }
}

/* --- norms --- */

void moert_cpu_layernorm_fwd(const float *x, const float *g, const float *b, float *y, float *mean,
                             float *rstd, int64_t rows, int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * dim;
    float *yr = y + r * dim;
    double sum = 0;
    for (int64_t i = 0; i < dim; i++) sum += xr[i];
    double mu = sum / (double)dim;
    double var = 0; /* two passes: no cancellation */
    for (int64_t i = 0; i < dim; i++) var += (xr[i] - mu) * (xr[i] - mu);
    double rs = 1 / sqrt(var / (double)dim + eps);
    for (int64_t i = 0; i < dim; i++) yr[i] = (float)((xr[i] - mu) * rs * g[i] + b[i]);
    mean[r] = (float)mu;
    rstd[r] = (float)rs;
  }
}

void moert_cpu_layernorm_bwd(const float *x, const float *g, const float *mean, const float *rstd,
                             const float *dy, float *dx, float *dg, float *db, int64_t rows,
                             int64_t dim) {
  /* xhat = (x - mean) rstd; dxhat = dy g;
   * dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat)). */
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * dim, *dyr = dy + r * dim;
    float *dxr = dx + r * dim;
    double mu = mean[r], rs = rstd[r];
    double s1 = 0, s2 = 0;
    for (int64_t i = 0; i < dim; i++) {
      double xh = (xr[i] - mu) * rs, dxh = (double)dyr[i] * g[i];
      s1 += dxh;
      s2 += dxh * xh;
    }
    s1 /= (double)dim;
    s2 /= (double)dim;
    for (int64_t i = 0; i < dim; i++) {
      double xh = (xr[i] - mu) * rs, dxh = (double)dyr[i] * g[i];
      dxr[i] = (float)(rs * (dxh - s1 - xh * s2));
    }
  }
  /* dg += sum_r dy xhat, db += sum_r dy. */
  for (int64_t c0 = 0; c0 < dim; c0 += COL_BLOCK) {
    int64_t w = min64(COL_BLOCK, dim - c0);
    double accg[COL_BLOCK] = {0}, accb[COL_BLOCK] = {0};
    for (int64_t r = 0; r < rows; r++) {
      const float *xr = x + r * dim + c0, *dyr = dy + r * dim + c0;
      double mu = mean[r], rs = rstd[r];
      for (int64_t c = 0; c < w; c++) {
        accg[c] += dyr[c] * ((xr[c] - mu) * rs);
        accb[c] += dyr[c];
      }
    }
    for (int64_t c = 0; c < w; c++) {
      dg[c0 + c] = (float)(dg[c0 + c] + accg[c]);
      db[c0 + c] = (float)(db[c0 + c] + accb[c]);
    }
  }
}

void moert_cpu_rmsnorm_fwd(const float *x, const float *g, float *y, float *rstd, int64_t rows,
                           int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * dim;
    float *yr = y + r * dim;
    double ss = 0;
    for (int64_t i = 0; i < dim; i++) ss += (double)xr[i] * xr[i];
    double rs = 1 / sqrt(ss / (double)dim + eps);
    for (int64_t i = 0; i < dim; i++) yr[i] = (float)(xr[i] * rs * g[i]);
    rstd[r] = (float)rs;
  }
}

void moert_cpu_rmsnorm_bwd(const float *x, const float *g, const float *rstd, const float *dy,
                           float *dx, float *dg, int64_t rows, int64_t dim) {
  /* dx = rstd dy g - x rstd^3 mean(dy g x). */
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * dim, *dyr = dy + r * dim;
    float *dxr = dx + r * dim;
    double rs = rstd[r], s = 0;
    for (int64_t i = 0; i < dim; i++) s += (double)dyr[i] * g[i] * xr[i];
    double c = rs * rs * rs * s / (double)dim;
    for (int64_t i = 0; i < dim; i++) dxr[i] = (float)(rs * dyr[i] * g[i] - xr[i] * c);
  }
  for (int64_t c0 = 0; c0 < dim; c0 += COL_BLOCK) {
    int64_t w = min64(COL_BLOCK, dim - c0);
    double acc[COL_BLOCK] = {0};
    for (int64_t r = 0; r < rows; r++) {
      const float *xr = x + r * dim + c0, *dyr = dy + r * dim + c0;
      double rs = rstd[r];
      for (int64_t c = 0; c < w; c++) acc[c] += (double)dyr[c] * xr[c] * rs;
    }
    for (int64_t c = 0; c < w; c++) dg[c0 + c] = (float)(dg[c0 + c] + acc[c]);
  }
}

/* --- gating --- */

/* The floor of the L2 norm (Tutel's F.normalize eps): below it the division
 * is by the constant, and the norm gets no gradient. */
#define L2_FLOOR 1e-12

void moert_cpu_l2norm_rows_fwd(const float *x, float *y, float *norm, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * cols;
    float *yr = y + r * cols;
    double ss = 0;
    for (int64_t c = 0; c < cols; c++) ss += (double)xr[c] * xr[c];
    double n = sqrt(ss), d = n > L2_FLOOR ? n : L2_FLOOR;
    for (int64_t c = 0; c < cols; c++) yr[c] = (float)(xr[c] / d);
    norm[r] = (float)n;
  }
}

void moert_cpu_l2norm_rows_bwd(const float *x, const float *norm, const float *dy, float *dx,
                               int64_t rows, int64_t cols) {
  /* y = x / n: dx = dy / n - x <dy, x> / n^3. */
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * cols, *dyr = dy + r * cols;
    float *dxr = dx + r * cols;
    double n = norm[r];
    if (!(n > L2_FLOOR)) {
      for (int64_t c = 0; c < cols; c++) dxr[c] = (float)(dyr[c] / L2_FLOOR);
      continue;
    }
    double dot = 0;
    for (int64_t c = 0; c < cols; c++) dot += (double)dyr[c] * xr[c];
    double k = dot / (n * n * n);
    for (int64_t c = 0; c < cols; c++) dxr[c] = (float)(dyr[c] / n - xr[c] * k);
  }
}

void moert_cpu_l2norm_cols_fwd(const float *x, float *y, float *norm, int64_t rows, int64_t cols) {
  for (int64_t c0 = 0; c0 < cols; c0 += COL_BLOCK) {
    int64_t w = min64(COL_BLOCK, cols - c0);
    double ss[COL_BLOCK] = {0}, inv[COL_BLOCK];
    for (int64_t r = 0; r < rows; r++) {
      const float *xr = x + r * cols + c0;
      for (int64_t c = 0; c < w; c++) ss[c] += (double)xr[c] * xr[c];
    }
    for (int64_t c = 0; c < w; c++) {
      double n = sqrt(ss[c]);
      norm[c0 + c] = (float)n;
      inv[c] = 1 / (n > L2_FLOOR ? n : L2_FLOOR);
    }
    for (int64_t r = 0; r < rows; r++) {
      const float *xr = x + r * cols + c0;
      float *yr = y + r * cols + c0;
      for (int64_t c = 0; c < w; c++) yr[c] = (float)(xr[c] * inv[c]);
    }
  }
}

void moert_cpu_l2norm_cols_bwd(const float *x, const float *norm, const float *dy, float *dx,
                               int64_t rows, int64_t cols) {
  for (int64_t c0 = 0; c0 < cols; c0 += COL_BLOCK) {
    int64_t w = min64(COL_BLOCK, cols - c0);
    double dot[COL_BLOCK] = {0}, inv[COL_BLOCK], k[COL_BLOCK];
    for (int64_t r = 0; r < rows; r++) {
      const float *xr = x + r * cols + c0, *dyr = dy + r * cols + c0;
      for (int64_t c = 0; c < w; c++) dot[c] += (double)dyr[c] * xr[c];
    }
    for (int64_t c = 0; c < w; c++) {
      double n = norm[c0 + c];
      bool live = n > L2_FLOOR;
      inv[c] = 1 / (live ? n : L2_FLOOR);
      k[c] = live ? dot[c] / (n * n * n) : 0;
    }
    for (int64_t r = 0; r < rows; r++) {
      const float *xr = x + r * cols + c0, *dyr = dy + r * cols + c0;
      float *dxr = dx + r * cols + c0;
      for (int64_t c = 0; c < w; c++) dxr[c] = (float)(dyr[c] * inv[c] - xr[c] * k[c]);
    }
  }
}

/* True when score sa of a ranks before score sb of b: larger first; equal
 * scores by the lower index; NaN after every number, so that top-k and the
 * priority order stay permutations whatever the input. */
static bool ranks_before(float sa, int64_t a, float sb, int64_t b) {
  bool na = isnan(sa), nb = isnan(sb);
  if (na != nb) return nb;
  if (!na && sa != sb) return sa > sb;
  return a < b;
}

/* The floor of the sum of the top-k scores when they are normalized. */
#define GATE_SUM_FLOOR 1e-9

void moert_cpu_gate_normalize(const float *topv, float *gate, int64_t tokens, int64_t top_k,
                              bool normalize) {
  for (int64_t t = 0; t < tokens; t++) {
    const float *v = topv + t * top_k;
    float *g = gate + t * top_k;
    double d = 1;
    if (normalize) {
      double s = 0;
      for (int64_t j = 0; j < top_k; j++) s += v[j];
      d = s > GATE_SUM_FLOOR ? s : GATE_SUM_FLOOR;
    }
    for (int64_t j = 0; j < top_k; j++) g[j] = (float)(v[j] / d);
  }
}

/* One token of the normalization's backward: g_i = v_i / s, so dv_i = dg_i / s
 * - sum_j dg_j v_j / s^2 (dg_i / floor where s is under it). */
typedef struct norm_bwd {
  double s, dot;
  bool normalize;
} norm_bwd;

static norm_bwd norm_bwd_of(const float *v, const float *dg, int64_t top_k, bool normalize) {
  norm_bwd n = {0, 0, normalize};
  if (normalize)
    for (int64_t j = 0; j < top_k; j++) {
      n.s += v[j];
      n.dot += (double)dg[j] * v[j];
    }
  return n;
}

static float norm_bwd_dv(const norm_bwd *n, float dg) {
  if (!n->normalize) return dg;
  return n->s > GATE_SUM_FLOOR ? (float)(dg / n->s - n->dot / (n->s * n->s)) : (float)(dg / GATE_SUM_FLOOR);
}

void moert_cpu_gate_normalize_bwd(const float *topv, const float *dgate, float *dtopv,
                                  int64_t tokens, int64_t top_k, bool normalize) {
  for (int64_t t = 0; t < tokens; t++) {
    const float *dg = dgate + t * top_k;
    norm_bwd n = norm_bwd_of(topv + t * top_k, dg, top_k, normalize);
    for (int64_t j = 0; j < top_k; j++) dtopv[t * top_k + j] = norm_bwd_dv(&n, dg[j]);
  }
}

void moert_cpu_gate_locations(const int32_t *idx, const int32_t *order, int32_t *loc,
                              int32_t *counts, int64_t tokens, int64_t experts, int64_t top_k) {
  for (int64_t e = 0; e < experts; e++) counts[e] = 0;
  for (int64_t j = 0; j < top_k; j++)
    for (int64_t i = 0; i < tokens; i++) {
      int64_t t = order ? order[i] : i, tj = t * top_k + j;
      int32_t e = idx[tj];
      loc[tj] = e >= 0 && e < experts ? counts[e]++ : -1;
    }
}

/* Heap sort on the order (topv[t*k] descending, t ascending): a total order,
 * so the result is the stable sort's, without a merge buffer. */
static void order_sift(int32_t *h, int64_t root, int64_t n, const float *topv, int64_t top_k) {
  for (;;) {
    int64_t child = 2 * root + 1;
    if (child >= n) return;
    if (child + 1 < n &&
        ranks_before(topv[h[child] * top_k], h[child], topv[h[child + 1] * top_k], h[child + 1]))
      child++;
    if (!ranks_before(topv[h[root] * top_k], h[root], topv[h[child] * top_k], h[child])) return;
    int32_t tmp = h[root];
    h[root] = h[child];
    h[child] = tmp;
    root = child;
  }
}

void moert_cpu_gate_priority_order(const float *topv, int32_t *order, int64_t tokens,
                                   int64_t top_k) {
  for (int64_t t = 0; t < tokens; t++) order[t] = (int32_t)t;
  for (int64_t i = tokens / 2 - 1; i >= 0; i--) order_sift(order, i, tokens, topv, top_k);
  for (int64_t end = tokens - 1; end > 0; end--) {
    int32_t tmp = order[0];
    order[0] = order[end];
    order[end] = tmp;
    order_sift(order, 0, end, topv, top_k);
  }
}

void moert_cpu_gate_stats(const float *scores, const int32_t *idx, float *score_sum,
                          float *top1_count, int64_t tokens, int64_t experts, int64_t top_k) {
  for (int64_t e0 = 0; e0 < experts; e0 += COL_BLOCK) {
    int64_t w = min64(COL_BLOCK, experts - e0);
    double acc[COL_BLOCK] = {0};
    int64_t cnt[COL_BLOCK] = {0};
    for (int64_t t = 0; t < tokens; t++) {
      const float *s = scores + t * experts + e0;
      for (int64_t e = 0; e < w; e++) acc[e] += s[e];
      int64_t top = (int64_t)idx[t * top_k] - e0;
      if (top >= 0 && top < w) cnt[top]++;
    }
    for (int64_t e = 0; e < w; e++) {
      score_sum[e0 + e] = (float)(score_sum[e0 + e] + acc[e]);
      top1_count[e0 + e] = (float)(top1_count[e0 + e] + (double)cnt[e]);
    }
  }
}

float moert_cpu_aux_loss(const float *score_sum, const float *top1_count, float *dscore_coef,
                         int64_t experts, double global_tokens) {
  double n = global_tokens > 0 ? global_tokens : 1, loss = 0;
  for (int64_t e = 0; e < experts; e++) {
    double me = score_sum[e] / n, ce = top1_count[e] / n;
    loss += me * ce;
    if (dscore_coef) dscore_coef[e] = (float)((double)experts * ce / n);
  }
  return (float)((double)experts * loss);
}

void moert_cpu_gate_scores_bwd(const int32_t *idx, const float *dtopv, const float *dscore_coef,
                               float weight, float *dscores, int64_t tokens, int64_t experts,
                               int64_t top_k) {
  for (int64_t t = 0; t < tokens; t++) {
    float *ds = dscores + t * experts;
    if (dscore_coef)
      for (int64_t e = 0; e < experts; e++)
        ds[e] = (float)(ds[e] + (double)weight * dscore_coef[e]);
    if (dtopv)
      for (int64_t j = 0; j < top_k; j++) {
        int32_t e = idx[t * top_k + j];
        if (e >= 0 && e < experts) ds[e] += dtopv[t * top_k + j];
      }
  }
}

void moert_cpu_softmax_bwd(const float *scores, const float *dscores, float *dlogits, int64_t rows,
                           int64_t cols) {
  for (int64_t r = 0; r < rows; r++) {
    const float *s = scores + r * cols, *ds = dscores + r * cols;
    float *dl = dlogits + r * cols;
    double dot = 0;
    for (int64_t c = 0; c < cols; c++) dot += (double)ds[c] * s[c];
    for (int64_t c = 0; c < cols; c++) dl[c] = (float)(s[c] * (ds[c] - dot));
  }
}

/* --- today's routers (cpu_ops.h's moert_cpu_gate_io) --- */

/* The most experts a routed gate takes (its masks live on the stack). */
#define ROUTER_MAX_EXPERTS 4096

static bool plain_gate(const moert_cpu_gate_io *g) {
  return !g->sigmoid && !g->bias && g->groups <= 1 && g->ec_capacity <= 0 && !g->z_sum && !g->entropy_sum &&
         (g->route_scale == 0 || g->route_scale == 1);
}

static float route_scale_of(float rs) { return rs == 0 ? 1.0f : rs; }

/* One token's scores: softmax or sigmoid of logits + noise. */
static void token_scores(const float *l, const float *nz, float *s, int64_t experts, bool sigmoid) {
  if (sigmoid) {
    for (int64_t e = 0; e < experts; e++) s[e] = (float)(1 / (1 + exp(-((double)l[e] + (nz ? nz[e] : 0)))));
    return;
  }
  double mx = -INFINITY, sum = 0;
  for (int64_t e = 0; e < experts; e++) {
    double v = (double)l[e] + (nz ? nz[e] : 0);
    if (v > mx) mx = v;
  }
  for (int64_t e = 0; e < experts; e++) {
    double p = exp((double)l[e] + (nz ? nz[e] : 0) - mx);
    s[e] = (float)p;
    sum += p;
  }
  for (int64_t e = 0; e < experts; e++) s[e] = (float)(s[e] / sum);
}

/* logsumexp of one token's logits + noise. */
static double token_lse(const float *l, const float *nz, int64_t experts) {
  double mx = -INFINITY, sum = 0;
  for (int64_t e = 0; e < experts; e++) {
    double v = (double)l[e] + (nz ? nz[e] : 0);
    if (v > mx) mx = v;
  }
  for (int64_t e = 0; e < experts; e++) sum += exp((double)l[e] + (nz ? nz[e] : 0) - mx);
  return mx + log(sum);
}

/* The sum of one token's scores as the statistics see them: 1 for softmax
 * scores, the sigmoid scores' sum (floored) otherwise. */
static double score_norm(const float *s, int64_t experts, bool sigmoid) {
  if (!sigmoid) return 1;
  double sum = 0;
  for (int64_t e = 0; e < experts; e++) sum += s[e];
  return sum > GATE_SUM_FLOOR ? sum : GATE_SUM_FLOOR;
}

/* The first of v[0..n) in ranking order after prev (-1: the best), among
 * those `allowed` (NULL: all); -1 when none is left. The j-th choice of a
 * top-k is the next after choice j-1: O(k n), no scratch. */
static int64_t next_ranked(const float *v, int64_t n, int64_t prev, const uint64_t *allowed) {
  int64_t best = -1;
  for (int64_t i = 0; i < n; i++) {
    if (allowed && !(allowed[i / 64] >> (i % 64) & 1)) continue;
    if (prev >= 0 && !ranks_before(v[prev], prev, v[i], i)) continue;
    if (best < 0 || ranks_before(v[i], i, v[best], best)) best = i;
  }
  return best;
}

/* One token's top-k on its selection keys (scores + bias, fp32), within the
 * top_groups best groups when groups > 1; topv takes the scores. */
static void token_topk(const float *s, const float *bias, int64_t groups, int64_t top_groups, int32_t *idx,
                       float *topv, int64_t experts, int64_t top_k) {
  float key[ROUTER_MAX_EXPERTS];
  for (int64_t e = 0; e < experts; e++) key[e] = bias ? s[e] + bias[e] : s[e];
  uint64_t allowed[ROUTER_MAX_EXPERTS / 64];
  if (groups > 1) {
    assert(top_groups <= groups && experts % groups == 0);
    int64_t gs = experts / groups;
    float gscore[ROUTER_MAX_EXPERTS];
    for (int64_t q = 0; q < groups; q++) { /* the sum of the group's two best keys */
      int64_t b1 = q * gs + next_ranked(key + q * gs, gs, -1, NULL);
      int64_t b2 = gs > 1 ? q * gs + next_ranked(key + q * gs, gs, b1 - q * gs, NULL) : -1;
      gscore[q] = b2 >= 0 ? key[b1] + key[b2] : key[b1];
    }
    for (int64_t w = 0; w < (experts + 63) / 64; w++) allowed[w] = 0;
    for (int64_t j = 0, q = -1; j < top_groups; j++) {
      q = next_ranked(gscore, groups, q, NULL);
      for (int64_t e = q * gs; e < (q + 1) * gs; e++) allowed[e / 64] |= 1ull << (e % 64);
    }
  }
  for (int64_t j = 0, e = -1; j < top_k; j++) {
    e = next_ranked(key, experts, e, groups > 1 ? allowed : NULL);
    idx[j] = (int32_t)e; /* -1 only when fewer experts are allowed than top_k */
    topv[j] = e >= 0 ? s[e] : 0;
  }
}

void moert_cpu_gate_topk(const float *logits, const float *noise, float *scores, int32_t *idx,
                         float *topv, int64_t tokens, int64_t experts, int64_t top_k) {
  assert(top_k <= experts && experts <= ROUTER_MAX_EXPERTS);
  for (int64_t t = 0; t < tokens; t++) {
    token_scores(logits + t * experts, noise ? noise + t * experts : NULL, scores + t * experts, experts, false);
    token_topk(scores + t * experts, NULL, 1, 1, idx + t * top_k, topv + t * top_k, experts, top_k);
  }
}

/* Expert choice: each expert's min(C, tokens) best tokens, by rank (the
 * priority order's heap sort on the expert's column; order is its scratch). */
static void expert_choice(const moert_cpu_gate_io *g, int64_t tokens, int64_t experts) {
  int64_t C = g->ec_capacity < tokens ? g->ec_capacity : tokens;
  for (int64_t e = 0; e < experts; e++) {
    moert_cpu_gate_priority_order(g->scores + e, g->order, tokens, experts);
    for (int64_t t = 0; t < tokens; t++) g->loc[t * experts + e] = -1;
    for (int64_t r = 0; r < C; r++) g->loc[(int64_t)g->order[r] * experts + e] = (int32_t)r;
    g->counts[e] = (int32_t)C;
  }
  float rs = route_scale_of(g->route_scale);
  for (int64_t t = 0; t < tokens; t++)
    for (int64_t e = 0; e < experts; e++) {
      int64_t te = t * experts + e;
      g->idx[te] = (int32_t)e;
      g->topv[te] = g->scores[te];
      g->gate[te] = g->scores[te] * rs;
    }
}

/* The statistics of the routed gate: score sums (normalized sigmoid scores),
 * top-1 counts, and the z and entropy sums. */
static void router_stats(const moert_cpu_gate_io *g, int64_t tokens, int64_t experts, int64_t top_k) {
  static _Thread_local double acc[ROUTER_MAX_EXPERTS]; /* the sums, exact; nothing allocates */
  static _Thread_local int64_t cnt[ROUTER_MAX_EXPERTS];
  for (int64_t e = 0; e < experts; e++) acc[e] = 0, cnt[e] = 0;
  double z = 0, ent = 0;
  for (int64_t t = 0; t < tokens; t++) {
    const float *s = g->scores + t * experts;
    double norm = score_norm(s, experts, g->sigmoid);
    int64_t top = -1;
    for (int64_t e = 0; e < experts; e++) {
      double p = s[e] / norm;
      acc[e] += p;
      if (p > 0) ent -= p * log(p);
      if (g->ec_capacity > 0 && (top < 0 || ranks_before(s[e], e, s[top], top))) top = e;
    }
    if (g->ec_capacity <= 0) top = g->idx[t * top_k];
    if (top >= 0 && top < experts) cnt[top]++;
    if (g->z_sum) {
      double lse = token_lse(g->logits + t * experts, g->noise ? g->noise + t * experts : NULL, experts);
      z += lse * lse;
    }
  }
  for (int64_t e = 0; e < experts; e++) {
    g->score_sum[e] = (float)acc[e];
    g->top1_count[e] = (float)cnt[e];
  }
  if (g->z_sum) *g->z_sum = (float)z;
  if (g->entropy_sum) *g->entropy_sum = (float)ent;
}

void moert_cpu_gate_fwd(const moert_cpu_gate_io *g, int64_t tokens, int64_t experts, int64_t top_k) {
  if (plain_gate(g)) { /* softmax top-k: the pieces, as Tutel */
    moert_cpu_gate_topk(g->logits, g->noise, g->scores, g->idx, g->topv, tokens, experts, top_k);
    moert_cpu_gate_normalize(g->topv, g->gate, tokens, top_k, g->normalize);
    if (g->order) moert_cpu_gate_priority_order(g->topv, g->order, tokens, top_k);
    moert_cpu_gate_locations(g->idx, g->order, g->loc, g->counts, tokens, experts, top_k);
    for (int64_t e = 0; e < experts; e++) g->score_sum[e] = g->top1_count[e] = 0;
    moert_cpu_gate_stats(g->scores, g->idx, g->score_sum, g->top1_count, tokens, experts, top_k);
  } else {
    assert(experts <= ROUTER_MAX_EXPERTS);
    for (int64_t t = 0; t < tokens; t++)
      token_scores(g->logits + t * experts, g->noise ? g->noise + t * experts : NULL, g->scores + t * experts,
                   experts, g->sigmoid);
    if (g->ec_capacity > 0) {
      assert(top_k == experts && g->order);
      expert_choice(g, tokens, experts);
    } else {
      for (int64_t t = 0; t < tokens; t++)
        token_topk(g->scores + t * experts, g->bias, g->groups, g->top_groups, g->idx + t * top_k,
                   g->topv + t * top_k, experts, top_k);
      moert_cpu_gate_normalize(g->topv, g->gate, tokens, top_k, g->normalize);
      float rs = route_scale_of(g->route_scale);
      if (rs != 1)
        for (int64_t i = 0; i < tokens * top_k; i++) g->gate[i] *= rs;
      if (g->order) moert_cpu_gate_priority_order(g->topv, g->order, tokens, top_k);
      moert_cpu_gate_locations(g->idx, g->order, g->loc, g->counts, tokens, experts, top_k);
    }
    router_stats(g, tokens, experts, top_k);
  }
  if (g->aux_out)
    *g->aux_out = moert_cpu_aux_loss(g->score_sum, g->top1_count, g->dscore_coef, experts, g->global_tokens);
}

/* A token at a time, the row of dlogits holding its dscores first (the
 * softmax backward reads each element before writing it): the pieces'
 * arithmetic exactly, without their [tokens, experts] scratch. */
void moert_cpu_gate_bwd(const moert_cpu_gate_bwd_io *g, int64_t tokens, int64_t experts, int64_t top_k) {
  const float *scores = g->scores, *topv = g->topv, *dgate = g->dgate, *dscore_coef = g->dscore_coef;
  const int32_t *idx = g->idx;
  float weight = g->weight, *dlogits = g->dlogits, rs = route_scale_of(g->route_scale);
  bool normalize = g->normalize && g->ec_capacity <= 0;
  for (int64_t t = 0; t < tokens; t++) {
    const float *s = scores + t * experts;
    float *ds = dlogits + t * experts;
    for (int64_t e = 0; e < experts; e++) ds[e] = 0;
    if (dscore_coef && !g->sigmoid)
      for (int64_t e = 0; e < experts; e++) ds[e] = (float)(ds[e] + (double)weight * dscore_coef[e]);
    if (dscore_coef && g->sigmoid) { /* through p = s / sum(s) */
      double norm = score_norm(s, experts, true), dot = 0;
      for (int64_t e = 0; e < experts; e++) dot += (double)weight * dscore_coef[e] * (s[e] / norm);
      for (int64_t e = 0; e < experts; e++) ds[e] = (float)(((double)weight * dscore_coef[e] - dot) / norm);
    }
    if (g->ec_capacity > 0) {
      for (int64_t e = 0; e < experts; e++) ds[e] += rs * dgate[t * experts + e];
    } else {
      float dgs[ROUTER_MAX_EXPERTS];
      const float *dg = dgate + t * top_k;
      if (rs != 1) {
        for (int64_t j = 0; j < top_k; j++) dgs[j] = rs * dg[j];
        dg = dgs;
      }
      norm_bwd n = norm_bwd_of(topv + t * top_k, dg, top_k, normalize);
      for (int64_t j = 0; j < top_k; j++) {
        int32_t e = idx[t * top_k + j];
        if (e >= 0 && e < experts) ds[e] += norm_bwd_dv(&n, dg[j]);
      }
    }
    if (g->sigmoid)
      for (int64_t e = 0; e < experts; e++) ds[e] = (float)((double)ds[e] * s[e] * (1 - (double)s[e]));
    else
      moert_cpu_softmax_bwd(s, ds, ds, 1, experts);
    if (g->z_weight > 0) { /* d/dv of w lse^2 / N: 2 w lse softmax(v) / N */
      const float *l = g->logits + t * experts, *nz = g->noise ? g->noise + t * experts : NULL;
      double lse = token_lse(l, nz, experts), k = 2 * (double)g->z_weight * lse / g->global_tokens;
      for (int64_t e = 0; e < experts; e++)
        ds[e] = (float)(ds[e] + k * exp((double)l[e] + (nz ? nz[e] : 0) - lse));
    }
  }
}

/* --- dispatch and combine --- */

/* The offset of choice tj's slot in the [experts, capacity, dim] buffer, or
 * -1 when the choice was dropped (loc >= capacity) or is not a valid claim. */
static int64_t slot_of(const int32_t *idx, const int32_t *loc, int64_t tj, int64_t experts,
                       int64_t capacity, int64_t dim) {
  int64_t e = idx[tj], c = loc[tj];
  if (e < 0 || e >= experts || c < 0 || c >= capacity) return -1;
  return (e * capacity + c) * dim;
}

void moert_cpu_dispatch(const float *x, const int32_t *idx, const int32_t *loc, float *buf,
                        int64_t tokens, int64_t top_k, int64_t experts, int64_t capacity,
                        int64_t dim) {
  for (int64_t i = 0; i < experts * capacity * dim; i++) buf[i] = 0;
  for (int64_t t = 0; t < tokens; t++)
    for (int64_t j = 0; j < top_k; j++) {
      int64_t at = slot_of(idx, loc, t * top_k + j, experts, capacity, dim);
      if (at >= 0)
        for (int64_t i = 0; i < dim; i++) buf[at + i] = x[t * dim + i];
    }
}

void moert_cpu_dispatch_bwd(const float *dbuf, const int32_t *idx, const int32_t *loc, float *dx,
                            int64_t tokens, int64_t top_k, int64_t experts, int64_t capacity,
                            int64_t dim) {
  for (int64_t t = 0; t < tokens; t++) {
    float *d = dx + t * dim;
    for (int64_t i = 0; i < dim; i++) d[i] = 0;
    for (int64_t j = 0; j < top_k; j++) {
      int64_t at = slot_of(idx, loc, t * top_k + j, experts, capacity, dim);
      if (at >= 0)
        for (int64_t i = 0; i < dim; i++) d[i] += dbuf[at + i];
    }
  }
}

void moert_cpu_combine(const float *buf, const int32_t *idx, const int32_t *loc, const float *gate,
                       float *y, int64_t tokens, int64_t top_k, int64_t experts, int64_t capacity,
                       int64_t dim) {
  for (int64_t t = 0; t < tokens; t++) {
    float *yt = y + t * dim;
    for (int64_t i = 0; i < dim; i++) yt[i] = 0;
    for (int64_t j = 0; j < top_k; j++) {
      int64_t at = slot_of(idx, loc, t * top_k + j, experts, capacity, dim);
      if (at < 0) continue;
      const float *slot = buf + at;
      float g = gate[t * top_k + j];
      for (int64_t i = 0; i < dim; i++) yt[i] += g * slot[i];
    }
  }
}

void moert_cpu_combine_bwd(const float *dy, const float *buf, const int32_t *idx,
                           const int32_t *loc, const float *gate, float *dbuf, float *dgate,
                           int64_t tokens, int64_t top_k, int64_t experts, int64_t capacity,
                           int64_t dim) {
  for (int64_t i = 0; i < experts * capacity * dim; i++) dbuf[i] = 0;
  for (int64_t t = 0; t < tokens; t++) {
    const float *dyt = dy + t * dim;
    for (int64_t j = 0; j < top_k; j++) {
      int64_t tj = t * top_k + j;
      int64_t at = slot_of(idx, loc, tj, experts, capacity, dim);
      if (at < 0) {
        dgate[tj] = 0;
        continue;
      }
      const float *slot = buf + at;
      float *dslot = dbuf + at;
      float g = gate[tj];
      double dot = 0;
      for (int64_t i = 0; i < dim; i++) {
        dslot[i] += g * dyt[i];
        dot += (double)dyt[i] * slot[i];
      }
      dgate[tj] = (float)dot;
    }
  }
}

/* --- embedding, losses --- */

void moert_cpu_embed_fwd(const float *table, const int32_t *win, float *x, int64_t tokens,
                         int64_t context, int64_t vocab, int64_t dim) {
  for (int64_t t = 0; t < tokens; t++) {
    float *xt = x + t * dim;
    for (int64_t i = 0; i < dim; i++) xt[i] = 0;
    for (int64_t c = 0; c < context; c++) {
      int64_t w = win[t * context + c];
      if (w < 0 || w >= vocab) continue; /* -1: before the start of the text */
      const float *row = table + (c * vocab + w) * dim;
      for (int64_t i = 0; i < dim; i++) xt[i] += row[i];
    }
  }
}

void moert_cpu_embed_bwd(const float *dx, const int32_t *win, float *dtable, int64_t tokens,
                         int64_t context, int64_t vocab, int64_t dim) {
  for (int64_t t = 0; t < tokens; t++) {
    const float *dxt = dx + t * dim;
    for (int64_t c = 0; c < context; c++) {
      int64_t w = win[t * context + c];
      if (w < 0 || w >= vocab) continue;
      float *row = dtable + (c * vocab + w) * dim;
      for (int64_t i = 0; i < dim; i++) row[i] += dxt[i];
    }
  }
}

double moert_cpu_xent(const float *logits, const int32_t *target, float *dlogits, int64_t rows,
                      int64_t vocab, float scale, float smoothing) {
  double total = 0, on = 1 - (double)smoothing, spread = (double)smoothing / (double)vocab;
  for (int64_t r = 0; r < rows; r++) {
    const float *l = logits + r * vocab;
    int64_t tgt = target[r];
    bool valid = tgt >= 0 && tgt < vocab; /* anything else: the row is ignored */
    double mx = -INFINITY;
    for (int64_t v = 0; v < vocab; v++)
      if (l[v] > mx) mx = l[v];
    double sum = 0;
    for (int64_t v = 0; v < vocab; v++) sum += exp(l[v] - mx);
    if (valid) total += mx + log(sum) - l[tgt];
    if (!dlogits) continue;
    float *d = dlogits + r * vocab;
    for (int64_t v = 0; v < vocab; v++)
      d[v] = valid ? (float)(scale * (exp(l[v] - mx) / sum - (v == tgt ? on + spread : spread))) : 0;
  }
  return total;
}

double moert_cpu_mse(const float *yhat, const float *y, float *dyhat, int64_t n, float scale) {
  double total = 0;
  for (int64_t i = 0; i < n; i++) {
    double d = (double)yhat[i] - y[i];
    total += d * d;
    if (dyhat) dyhat[i] = (float)(scale * 2 * d);
  }
  return total;
}

/* --- attention --- */

void moert_cpu_rope(float *qkv, int64_t tokens, int64_t seq, int64_t pos0, int64_t heads, int64_t kv_heads,
                    int64_t head_dim, double base, bool inverse) {
  int64_t W = (heads + 2 * kv_heads) * head_dim, half = head_dim / 2;
  for (int64_t t = 0; t < tokens; t++) {
    double pos = (double)(pos0 + t % seq);
    for (int64_t i = 0; i < half; i++) {
      double ang = pos * pow(base, -2.0 * (double)i / (double)head_dim);
      double c = (float)cos(ang), s = (float)sin(ang);
      if (inverse) s = -s;
      for (int64_t h = 0; h < heads + kv_heads; h++) { /* the query heads, then the key heads */
        float *x = qkv + t * W + h * head_dim;
        double a = x[i], b = x[i + half];
        x[i] = (float)(a * c - b * s);
        x[i + half] = (float)(a * s + b * c);
      }
    }
  }
}

static double attn_dot(const float *a, const float *b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; i++) s += (double)a[i] * b[i];
  return s;
}

/* The rows of sequence s's heads: query head h of token i, and key and value
 * head g of token j. */
#define ATTN_Q(i, h) (qkv + (s * seq + (i)) * W + (h) * D)
#define ATTN_K(j, g) (qkv + (s * seq + (j)) * W + (heads + (g)) * D)
#define ATTN_V(j, g) (qkv + (s * seq + (j)) * W + (heads + kv_heads + (g)) * D)

void moert_cpu_attn_fwd(const float *qkv, float *o, float *lse, int64_t nseq, int64_t seq, int64_t heads,
                        int64_t kv_heads, int64_t head_dim, bool causal) {
  int64_t D = head_dim, W = (heads + 2 * kv_heads) * D, group = heads / kv_heads;
  double scale = 1 / sqrt((double)D), acc[MOERT_MAX_HEAD_DIM];
  assert(D <= MOERT_MAX_HEAD_DIM);
  for (int64_t s = 0; s < nseq; s++)
    for (int64_t h = 0; h < heads; h++)
      for (int64_t i = 0; i < seq; i++) {
        const float *q = ATTN_Q(i, h);
        int64_t g = h / group, last = causal ? i : seq - 1;
        double mx = -INFINITY, sum = 0; /* the softmax's max and sum, online */
        for (int64_t j = 0; j <= last; j++) {
          double x = attn_dot(q, ATTN_K(j, g), D) * scale;
          if (x > mx) sum = sum * exp(mx - x) + 1, mx = x;
          else sum += exp(x - mx);
        }
        double l = mx + log(sum);
        for (int64_t d = 0; d < D; d++) acc[d] = 0;
        for (int64_t j = 0; j <= last; j++) {
          double p = exp(attn_dot(q, ATTN_K(j, g), D) * scale - l);
          const float *v = ATTN_V(j, g);
          for (int64_t d = 0; d < D; d++) acc[d] += p * v[d];
        }
        float *orow = o + (s * seq + i) * heads * D + h * D;
        for (int64_t d = 0; d < D; d++) orow[d] = (float)acc[d];
        lse[(s * heads + h) * seq + i] = (float)l;
      }
}

void moert_cpu_attn_bwd(const float *qkv, const float *o, const float *lse, const float *dout, float *dqkv,
                        float *scratch, int64_t nseq, int64_t seq, int64_t heads, int64_t kv_heads,
                        int64_t head_dim, bool causal) {
  int64_t D = head_dim, W = (heads + 2 * kv_heads) * D, HD = heads * D, group = heads / kv_heads;
  double scale = 1 / sqrt((double)D), acc[MOERT_MAX_HEAD_DIM], acc2[MOERT_MAX_HEAD_DIM];
  assert(D <= MOERT_MAX_HEAD_DIM);
  /* delta = sum(dO * O) per query and head, in scratch as lse is laid out */
  float *delta = scratch;
  for (int64_t s = 0; s < nseq; s++)
    for (int64_t h = 0; h < heads; h++)
      for (int64_t i = 0; i < seq; i++) {
        int64_t t = s * seq + i;
        delta[(s * heads + h) * seq + i] = (float)attn_dot(dout + t * HD + h * D, o + t * HD + h * D, D);
      }
  /* With p = exp(score - lse) and dS = p (dO . v - delta): dQ_i = scale
   * sum_j dS_ij k_j; dK_j = scale sum_{h, i} dS_ij q_i; dV_j = sum_{h, i}
   * p_ij dO_i. Each is summed whole in double and written once (the scores
   * are recomputed for each pass). */
  for (int64_t s = 0; s < nseq; s++) {
    for (int64_t h = 0; h < heads; h++)
      for (int64_t i = 0; i < seq; i++) {
        int64_t t = s * seq + i, g = h / group, last = causal ? i : seq - 1, r = (s * heads + h) * seq + i;
        const float *q = ATTN_Q(i, h), *dq_o = dout + t * HD + h * D;
        for (int64_t d = 0; d < D; d++) acc[d] = 0;
        for (int64_t j = 0; j <= last; j++) {
          const float *k = ATTN_K(j, g);
          double p = exp(attn_dot(q, k, D) * scale - lse[r]);
          double ds = p * (attn_dot(dq_o, ATTN_V(j, g), D) - delta[r]);
          for (int64_t d = 0; d < D; d++) acc[d] += ds * k[d];
        }
        float *dq = dqkv + t * W + h * D;
        for (int64_t d = 0; d < D; d++) dq[d] = (float)(acc[d] * scale);
      }
    for (int64_t g = 0; g < kv_heads; g++)
      for (int64_t j = 0; j < seq; j++) {
        const float *k = ATTN_K(j, g), *v = ATTN_V(j, g);
        for (int64_t d = 0; d < D; d++) acc[d] = 0, acc2[d] = 0;
        for (int64_t h = g * group; h < (g + 1) * group; h++)
          for (int64_t i = causal ? j : 0; i < seq; i++) {
            int64_t t = s * seq + i, r = (s * heads + h) * seq + i;
            const float *q = ATTN_Q(i, h), *dq_o = dout + t * HD + h * D;
            double p = exp(attn_dot(q, k, D) * scale - lse[r]);
            double ds = p * (attn_dot(dq_o, v, D) - delta[r]);
            for (int64_t d = 0; d < D; d++) acc[d] += ds * q[d], acc2[d] += p * dq_o[d];
          }
        float *dk = dqkv + (s * seq + j) * W + (heads + g) * D;
        float *dv = dqkv + (s * seq + j) * W + (heads + kv_heads + g) * D;
        for (int64_t d = 0; d < D; d++) dk[d] = (float)(acc[d] * scale), dv[d] = (float)acc2[d];
      }
  }
}

#undef ATTN_Q
#undef ATTN_K
#undef ATTN_V

void moert_cpu_attn_decode(const float *q, const float *cache, float *o, int64_t len, int64_t heads,
                           int64_t kv_heads, int64_t head_dim) {
  int64_t D = head_dim, W = (heads + 2 * kv_heads) * D, group = heads / kv_heads;
  double scale = 1 / sqrt((double)D), acc[MOERT_MAX_HEAD_DIM];
  assert(D <= MOERT_MAX_HEAD_DIM);
  for (int64_t h = 0; h < heads; h++) {
    const float *qh = q + h * D;
    int64_t g = h / group;
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < len; j++) {
      double x = attn_dot(qh, cache + j * W + (heads + g) * D, D) * scale;
      if (x > mx) sum = sum * exp(mx - x) + 1, mx = x;
      else sum += exp(x - mx);
    }
    double l = mx + log(sum);
    for (int64_t d = 0; d < D; d++) acc[d] = 0;
    for (int64_t j = 0; j < len; j++) {
      double p = exp(attn_dot(qh, cache + j * W + (heads + g) * D, D) * scale - l);
      const float *v = cache + j * W + (heads + kv_heads + g) * D;
      for (int64_t d = 0; d < D; d++) acc[d] += p * v[d];
    }
    for (int64_t d = 0; d < D; d++) o[h * D + d] = (float)acc[d];
  }
}

/* --- optimizers --- */

double moert_cpu_sumsq(const float *x, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; i++) s += (double)x[i] * x[i];
  return s;
}

void moert_cpu_scale(float *x, int64_t n, float s) {
  for (int64_t i = 0; i < n; i++) x[i] *= s;
}

void moert_cpu_adamw(float *p, const float *g, float *m, float *v, int64_t n, float lr, float b1,
                     float b2, float eps, float wd, int64_t step, const float *gscale, uint16_t *low) {
  assert(step >= 1);
  double t = (double)(step >= 1 ? step : 1);
  double bc1 = 1 - pow(b1, t), bc2 = 1 - pow(b2, t);
  for (int64_t i = 0; i < n; i++) {
    double gi = gscale ? (double)(float)(g[i] * (double)*gscale) : g[i];
    double mi = b1 * (double)m[i] + (1 - (double)b1) * gi;
    double vi = b2 * (double)v[i] + (1 - (double)b2) * gi * gi;
    m[i] = (float)mi;
    v[i] = (float)vi;
    double upd = (mi / bc1) / (sqrt(vi / bc2) + eps) + (double)wd * p[i];
    p[i] = (float)(p[i] - lr * upd);
    if (low) low[i] = moert_f32_to_bf16(p[i]);
  }
}

void moert_cpu_sgd(float *p, const float *g, int64_t n, float lr, float wd, const float *gscale,
                   uint16_t *low) {
  for (int64_t i = 0; i < n; i++) {
    double gi = gscale ? (double)(float)(g[i] * (double)*gscale) : g[i];
    p[i] = (float)(p[i] - (double)lr * (gi + (double)wd * p[i]));
    if (low) low[i] = moert_f32_to_bf16(p[i]);
  }
}

void moert_cpu_sumsq_to(const float *x, int64_t n, double *out) { *out = moert_cpu_sumsq(x, n); }

void moert_cpu_norm_split(const double *part, int64_t n, float *hilo) {
  double s = 0;
  for (int64_t i = 0; i < n; i++) s += part[i];
  hilo[0] = (float)s;
  hilo[1] = (float)(s - (double)hilo[0]);
}

void moert_cpu_clip_factor(const double *part, int64_t n, const float *hilo, double clip, double *norm,
                           float *factor) {
  double s = 0;
  for (int64_t i = 0; i < n; i++) s += part[i];
  s += (double)hilo[0];
  s += (double)hilo[1];
  *norm = sqrt(s);
  *factor = clip > 0 && *norm > clip ? (float)(clip / *norm) : 1;
}
