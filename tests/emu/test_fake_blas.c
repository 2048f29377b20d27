/* test_fake_blas.c — the BLAS stand-ins of the CPU emulation (libcublas.so.13
 * and libcublasLt.so.13 in LIB_DIR, opened with dlopen and looked up by the
 * names cublas_v2.h and cublasLt.h give, as the cuda backend does) against
 * naive triple loops in double on random inputs: every function the backend
 * calls, with transposes, strided batches, leading dimensions beyond the
 * rows, beta 0 over a C of NaN (which must not be read) and beta != 0, C = D,
 * bf16 and fp32 operands and results, every epilogue the backend uses with
 * per-batch and shared biases and the aux output; bf16 rounding (nearest
 * even, NaN kept) bit by bit; the statuses of calls that must be refused.
 * Outputs are checked within the rounding error of fp32 (and of bf16 for
 * bf16 results), and every element beside them (between columns, between
 * batches) must keep the NaN bytes it started with. Last, with the stand-in
 * libcuda.so.1 of LIB_DIR loaded: GEMMs of both on a capturing stream do
 * nothing at the call and run at each replay of the graph on the operands of
 * the moment, with the alpha of the call and (cuBLASLt) the descriptor as it
 * was at the call; one on the stream of an invalidated capture fails.
 *
 *   test_fake_blas LIB_DIR */
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda.h>
#include <dlfcn.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------ the libraries */

#define STR_(x) #x
#define XSTR(x) STR_(x) /* the symbol after the header's macros (cublasCreate_v2) */

#define CUBLAS_FUNCS(X)                                                                                                \
  X(cublasCreate)                                                                                                      \
  X(cublasDestroy) X(cublasSetStream) X(cublasSetMathMode) X(cublasSgemm) X(cublasSgemmStridedBatched)                 \
      X(cublasGemmStridedBatchedEx) X(cublasGetStatusString)
#define CUBLASLT_FUNCS(X)                                                                                              \
  X(cublasLtCreate)                                                                                                    \
  X(cublasLtDestroy) X(cublasLtMatmulDescCreate) X(cublasLtMatmulDescDestroy) X(cublasLtMatmulDescSetAttribute)        \
      X(cublasLtMatrixLayoutCreate) X(cublasLtMatrixLayoutDestroy) X(cublasLtMatrixLayoutSetAttribute)                 \
          X(cublasLtMatmulPreferenceCreate) X(cublasLtMatmulPreferenceDestroy) X(cublasLtMatmulPreferenceSetAttribute) \
              X(cublasLtMatmulAlgoGetHeuristic) X(cublasLtMatmul)

#define CUDA_FUNCS(X)                                                                                                  \
  X(cuInit)                                                                                                            \
  X(cuDeviceGet) X(cuDevicePrimaryCtxRetain) X(cuDevicePrimaryCtxRelease) X(cuCtxSetCurrent) X(cuStreamCreate)         \
      X(cuStreamDestroy) X(cuStreamSynchronize) X(cuStreamBeginCapture) X(cuStreamEndCapture) X(cuGraphInstantiate)   \
          X(cuGraphLaunch) X(cuGraphExecDestroy) X(cuGraphDestroy)

#define DECLARE(f) __typeof__(f) *f;
static struct { CUBLAS_FUNCS(DECLARE) } blas;
static struct { CUBLASLT_FUNCS(DECLARE) } lt;
static struct { CUDA_FUNCS(DECLARE) } cu;
#undef DECLARE

#define LOOKUP(f)                                                                                                      \
  if (ok && !(tbl->f = (__typeof__(tbl->f))dlsym(lib, XSTR(f)))) {                                                     \
    fprintf(stderr, "%s: no symbol %s\n", path, XSTR(f));                                                              \
    ok = false;                                                                                                        \
  }

static void *open_lib(const char *dir, const char *name, char *path, size_t size) {
  snprintf(path, size, "%s/%s", dir, name);
  void *lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (!lib) fprintf(stderr, "cannot open %s: %s\n", path, dlerror());
  return lib;
}

static bool load(const char *dir) {
  char path[4096];
  void *lib = open_lib(dir, "libcublas.so.13", path, sizeof path);
  bool ok = lib != NULL;
  {
    __typeof__(blas) *tbl = &blas;
    CUBLAS_FUNCS(LOOKUP)
  }
  lib = ok ? open_lib(dir, "libcublasLt.so.13", path, sizeof path) : NULL;
  ok = ok && lib;
  {
    __typeof__(lt) *tbl = &lt;
    CUBLASLT_FUNCS(LOOKUP)
  }
  return ok;
}

/* The stand-in driver, which the BLAS stand-ins find loaded (stream capture). */
static bool load_cuda(const char *dir) {
  char path[4096];
  void *lib = open_lib(dir, "libcuda.so.1", path, sizeof path);
  bool ok = lib != NULL;
  __typeof__(cu) *tbl = &cu;
  CUDA_FUNCS(LOOKUP)
  return ok;
}
#undef LOOKUP

/* ------------------------------------------------------------ checks */

#include "../check.h"

/* A call that must return the status want. */
#define STATUS(want, call)                                                                                             \
  do {                                                                                                                 \
    cublasStatus_t st_ = (call);                                                                                       \
    CHECK(st_ == (want), "%s: %s (%d), want %s", #call, blas.cublasGetStatusString(st_), (int)st_,                     \
          blas.cublasGetStatusString(want));                                                                           \
  } while (0)

/* ------------------------------------------------------------ test matrices */

static uint64_t g_rng = 0x9e3779b97f4a7c15u;

/* Uniform in [-1, 1). */
static double uniform(void) {
  g_rng ^= g_rng >> 12, g_rng ^= g_rng << 25, g_rng ^= g_rng >> 27;
  return (double)((g_rng * 0x2545f4914f6cdd1du) >> 11) * 0x1p-52 - 1;
}

static float bf16_float(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
}
static uint16_t float_bits_hi(float f) { /* f's top half: f itself when f is a bf16 value */
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return (uint16_t)(u >> 16);
}

/* count batches of rows x cols, column-major (ld, batch stride in elements),
 * of type t, in a buffer whose bytes start as 0xff (NaN in fp32 and bf16). */
typedef struct {
  cudaDataType t;
  int64_t rows, cols, ld, stride, count;
  int64_t len; /* elements in the buffer */
  void *p;
} mat;

static size_t esize(cudaDataType t) { return t == CUDA_R_16BF ? 2 : 4; }

static mat mat_make(cudaDataType t, int64_t rows, int64_t cols, int64_t ld, int64_t stride, int64_t count) {
  mat x = {t, rows, cols, ld, stride, count, (count - 1) * stride + ld * cols + 3, NULL};
  x.p = malloc((size_t)x.len * esize(t));
  if (!x.p) {
    fprintf(stderr, "out of memory\n");
    exit(1);
  }
  memset(x.p, 0xff, (size_t)x.len * esize(t));
  return x;
}

static int64_t at(const mat *x, int64_t z, int64_t i, int64_t j) { return z * x->stride + j * x->ld + i; }

static double get(const mat *x, int64_t z, int64_t i, int64_t j) {
  int64_t e = at(x, z, i, j);
  return x->t == CUDA_R_16BF ? bf16_float(((const uint16_t *)x->p)[e]) : ((const float *)x->p)[e];
}

/* Sets an element to v, cut to the type (bf16: the top half of its bits). */
static void put(mat *x, int64_t z, int64_t i, int64_t j, float v) {
  int64_t e = at(x, z, i, j);
  if (x->t == CUDA_R_16BF)
    ((uint16_t *)x->p)[e] = float_bits_hi(v);
  else
    ((float *)x->p)[e] = v;
}

/* Random elements in [-1, 1). */
static void mat_random(mat *x) {
  for (int64_t z = 0; z < x->count; z++)
    for (int64_t j = 0; j < x->cols; j++)
      for (int64_t i = 0; i < x->rows; i++) put(x, z, i, j, (float)uniform());
}

static int g_shown; /* mismatch reports printed (the first few failing checks print details) */

/* x against want (and the scale of each element's rounding error, mag),
 * [z][j][i] packed: each element within the error of an fp32 computation
 * rounded once to x's type, and every element of the buffer outside the
 * matrices still NaN bytes. Prints the first mismatches and the largest
 * difference. */
static void check_mat(const char *what, const mat *x, const double *want, const double *mag) {
  int64_t bad = 0, mismatches = 0;
  double worst = 0;
  bool show = g_shown < 8;
  for (int64_t z = 0; z < x->count; z++)
    for (int64_t j = 0; j < x->cols; j++)
      for (int64_t i = 0; i < x->rows; i++) {
        int64_t e = (z * x->cols + j) * x->rows + i;
        double got = get(x, z, i, j), fp32 = 1e-5 * mag[e] + 1e-30;
        double tol = x->t == CUDA_R_16BF ? fp32 + 0x1p-8 * (fabs(want[e]) + fp32) : fp32;
        double diff = fabs(got - want[e]);
        if (!(diff <= tol)) {
          if (show && mismatches < 5)
            fprintf(stderr, "  %s: [z %lld, row %lld, col %lld] = %.9g, want %.9g (tolerance %.3g)\n", what,
                    (long long)z, (long long)i, (long long)j, got, want[e], tol);
          mismatches++;
        }
        if (diff > worst || isnan(diff)) worst = diff;
      }
  bool *inside = calloc((size_t)x->len, sizeof *inside);
  for (int64_t z = 0; z < x->count; z++)
    for (int64_t j = 0; j < x->cols; j++)
      for (int64_t i = 0; i < x->rows; i++) inside[at(x, z, i, j)] = true;
  size_t es = esize(x->t);
  for (int64_t e = 0; e < x->len; e++)
    for (size_t b = 0; !inside[e] && b < es; b++)
      if (((const unsigned char *)x->p)[(size_t)e * es + b] != 0xff) {
        bad++;
        break;
      }
  free(inside);
  if (mismatches || bad) g_shown++;
  CHECK(mismatches == 0, "%s: %lld of %lld elements wrong, largest difference %.3g", what, (long long)mismatches,
        (long long)(x->count * x->rows * x->cols), worst);
  CHECK(bad == 0, "%s: %lld elements beside the matrix written", what, (long long)bad);
}

/* ------------------------------------------------------------ the reference */

typedef enum { ACT_NONE, ACT_RELU, ACT_GELU } act;

/* pre_z = alpha op(A_z) op(B_z) + beta C_z + bias_z, m x n in double (A and B
 * not read when alpha is 0, C when beta is 0; bias m x 1, NULL: none). */
typedef struct {
  bool ta, tb;
  int64_t m, n, k, count;
  double alpha, beta;
  const mat *a, *b, *c, *bias;
} ref_gemm;

/* pre [z][j][i] packed, and mag the sum of the magnitudes of its terms. */
static void reference(const ref_gemm *r, double *pre, double *mag) {
  for (int64_t z = 0; z < r->count; z++)
    for (int64_t j = 0; j < r->n; j++)
      for (int64_t i = 0; i < r->m; i++) {
        double s = 0, sm = 0;
        for (int64_t l = 0; r->alpha != 0 && l < r->k; l++) {
          double p =
              (r->ta ? get(r->a, z, l, i) : get(r->a, z, i, l)) * (r->tb ? get(r->b, z, j, l) : get(r->b, z, l, j));
          s += p, sm += fabs(p);
        }
        double v = r->alpha * s, mg = fabs(r->alpha) * sm;
        if (r->beta != 0) v += r->beta * get(r->c, z, i, j), mg += fabs(r->beta * get(r->c, z, i, j));
        if (r->bias) v += get(r->bias, z, i, 0), mg += fabs(get(r->bias, z, i, 0));
        int64_t e = (z * r->n + j) * r->m + i;
        pre[e] = v, mag[e] = mg;
      }
}

static double activate(act a, double x) {
  switch (a) {
  case ACT_NONE: break;
  case ACT_RELU: return x > 0 ? x : 0;
  case ACT_GELU: return 0.5 * x * (1 + tanh(sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
  }
  return x;
}

static const char *type_name(cudaDataType t) { return t == CUDA_R_16BF ? "bf16" : "f32"; }
static const char *op_name(cublasOperation_t op) { return op == CUBLAS_OP_N ? "N" : op == CUBLAS_OP_T ? "T" : "C"; }

/* ------------------------------------------------------------ cuBLAS */

static cublasHandle_t g_blas;

typedef enum { SGEMM, SGEMM_BATCHED, GEMM_EX } blas_fn;

/* One cuBLAS GEMM on random operands (m 7, n 5, k 9) against the reference. */
static void blas_case(blas_fn fn, cudaDataType ab, cudaDataType cd, cublasOperation_t opa, cublasOperation_t opb,
                      int count, float alpha, float beta) {
  const int m = 7, n = 5, k = 9;
  bool ta = opa != CUBLAS_OP_N, tb = opb != CUBLAS_OP_N;
  int ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
  int lda = ar + 3, ldb = br + 1, ldc = m + 2;
  long long sa = count > 1 ? lda * ac + 5 : 0, sb = count > 1 ? ldb * bc + 2 : 0, sc = count > 1 ? ldc * n + 4 : 0;
  mat A = mat_make(ab, ar, ac, lda, sa, count), B = mat_make(ab, br, bc, ldb, sb, count);
  mat C = mat_make(cd, m, n, ldc, sc, count);
  mat_random(&A), mat_random(&B);
  if (beta != 0) mat_random(&C);
  double *pre = malloc(sizeof(double) * (size_t)(count * m * n)),
         *mag = malloc(sizeof(double) * (size_t)(count * m * n));
  ref_gemm r = {ta, tb, m, n, k, count, alpha, beta, &A, &B, &C, NULL};
  reference(&r, pre, mag);
  switch (fn) {
  case SGEMM:
    STATUS(CUBLAS_STATUS_SUCCESS,
           blas.cublasSgemm(g_blas, opa, opb, m, n, k, &alpha, A.p, lda, B.p, ldb, &beta, C.p, ldc));
    break;
  case SGEMM_BATCHED:
    STATUS(CUBLAS_STATUS_SUCCESS, blas.cublasSgemmStridedBatched(g_blas, opa, opb, m, n, k, &alpha, A.p, lda, sa, B.p,
                                                                 ldb, sb, &beta, C.p, ldc, sc, count));
    break;
  case GEMM_EX:
    STATUS(CUBLAS_STATUS_SUCCESS,
           blas.cublasGemmStridedBatchedEx(g_blas, opa, opb, m, n, k, &alpha, A.p, ab, lda, sa, B.p, ab, ldb, sb, &beta,
                                           C.p, cd, ldc, sc, count, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    break;
  }
  static const char *const names[] = {"cublasSgemm", "cublasSgemmStridedBatched", "cublasGemmStridedBatchedEx"};
  char what[160];
  snprintf(what, sizeof what, "%s %s->%s op %s%s x%d alpha %g beta %g", names[fn], type_name(ab), type_name(cd),
           op_name(opa), op_name(opb), count, alpha, beta);
  check_mat(what, &C, pre, mag);
  free(pre), free(mag), free(A.p), free(B.p), free(C.p);
}

/* D (1 x 1, bf16) = a b + c through cublasGemmStridedBatchedEx: its bits. */
static uint16_t blas_bf16_1x1(float a, float b, float c) {
  uint16_t ha = float_bits_hi(a), hb = float_bits_hi(b), hc = float_bits_hi(c);
  float one = 1;
  STATUS(CUBLAS_STATUS_SUCCESS,
         blas.cublasGemmStridedBatchedEx(g_blas, CUBLAS_OP_N, CUBLAS_OP_N, 1, 1, 1, &one, &ha, CUDA_R_16BF, 1, 0, &hb,
                                         CUDA_R_16BF, 1, 0, &one, &hc, CUDA_R_16BF, 1, 0, 1, CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT));
  return hc;
}

static void test_cublas(void) {
  STATUS(CUBLAS_STATUS_SUCCESS, blas.cublasCreate(&g_blas));
  STATUS(CUBLAS_STATUS_SUCCESS, blas.cublasSetMathMode(g_blas, CUBLAS_DEFAULT_MATH));
  STATUS(CUBLAS_STATUS_SUCCESS,
         blas.cublasSetMathMode(g_blas, CUBLAS_TF32_TENSOR_OP_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
  STATUS(CUBLAS_STATUS_INVALID_VALUE, blas.cublasSetMathMode(g_blas, (cublasMath_t)12345));
  STATUS(CUBLAS_STATUS_SUCCESS, blas.cublasSetMathMode(g_blas, CUBLAS_DEFAULT_MATH));
  STATUS(CUBLAS_STATUS_SUCCESS, blas.cublasSetStream(g_blas, NULL));
  CHECK(strcmp(blas.cublasGetStatusString(CUBLAS_STATUS_NOT_SUPPORTED), "CUBLAS_STATUS_NOT_SUPPORTED") == 0 &&
            strcmp(blas.cublasGetStatusString(CUBLAS_STATUS_SUCCESS), "CUBLAS_STATUS_SUCCESS") == 0,
        "cublasGetStatusString: %s", blas.cublasGetStatusString(CUBLAS_STATUS_NOT_SUPPORTED));

  static const cublasOperation_t ops[] = {CUBLAS_OP_N, CUBLAS_OP_T, CUBLAS_OP_C};
  static const cudaDataType ex_types[][2] = {
      {CUDA_R_32F, CUDA_R_32F}, {CUDA_R_16BF, CUDA_R_16BF}, {CUDA_R_16BF, CUDA_R_32F}};
  static const float betas[] = {0, 1, -0.5f};
  for (int ia = 0; ia < 3; ia++)
    for (int ib = 0; ib < 3; ib++)
      for (int ibeta = 0; ibeta < 3; ibeta++) {
        float beta = betas[ibeta];
        blas_case(SGEMM, CUDA_R_32F, CUDA_R_32F, ops[ia], ops[ib], 1, 1.25f, beta);
        blas_case(SGEMM_BATCHED, CUDA_R_32F, CUDA_R_32F, ops[ia], ops[ib], 3, -0.75f, beta);
        for (int t = 0; t < 3; t++) {
          blas_case(GEMM_EX, ex_types[t][0], ex_types[t][1], ops[ia], ops[ib], 1, 1, beta);
          blas_case(GEMM_EX, ex_types[t][0], ex_types[t][1], ops[ia], ops[ib], 3, 0.5f, beta);
        }
      }
  /* alpha 0: A and B (NaN) not read */
  {
    float alpha = 0, beta = 2;
    mat A = mat_make(CUDA_R_32F, 4, 4, 4, 0, 1), C = mat_make(CUDA_R_32F, 4, 4, 4, 0, 1);
    mat_random(&C);
    double want[16], mag[16];
    for (int e = 0; e < 16; e++) want[e] = 2 * get(&C, 0, e % 4, e / 4), mag[e] = fabs(want[e]);
    STATUS(CUBLAS_STATUS_SUCCESS,
           blas.cublasSgemm(g_blas, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 4, &alpha, A.p, 4, A.p, 4, &beta, C.p, 4));
    check_mat("cublasSgemm alpha 0 (A, B of NaN)", &C, want, mag);
    /* k 0: C = beta C */
    STATUS(CUBLAS_STATUS_SUCCESS,
           blas.cublasSgemm(g_blas, CUBLAS_OP_N, CUBLAS_OP_N, 4, 4, 0, &beta, A.p, 4, A.p, 1, &beta, C.p, 4));
    for (int e = 0; e < 16; e++) want[e] *= 2, mag[e] *= 2;
    check_mat("cublasSgemm k 0", &C, want, mag);
    free(A.p), free(C.p);
  }

  /* bf16 results: nearest even, NaN kept, overflow to inf */
  CHECK(blas_bf16_1x1(1, 1, 0x1p-8f) == 0x3f80, "1 + 2^-8 (a tie) rounds to 1: %#x", blas_bf16_1x1(1, 1, 0x1p-8f));
  CHECK(blas_bf16_1x1(1, 1 + 0x1p-7f, 0x1p-8f) == 0x3f82, "1 + 2^-7 + 2^-8 (a tie) rounds to 1 + 2^-6: %#x",
        blas_bf16_1x1(1, 1 + 0x1p-7f, 0x1p-8f));
  CHECK(blas_bf16_1x1(1, 1, 0x3p-9f) == 0x3f81, "1 + 3 2^-9 rounds up to 1 + 2^-7: %#x", blas_bf16_1x1(1, 1, 0x3p-9f));
  CHECK(blas_bf16_1x1(-1, 1, -0x1p-8f) == 0xbf80, "-(1 + 2^-8) rounds to -1: %#x", blas_bf16_1x1(-1, 1, -0x1p-8f));
  CHECK(blas_bf16_1x1(0x1.fep127f, 2, 0) == 0x7f80, "overflow: %#x", blas_bf16_1x1(0x1.fep127f, 2, 0));
  uint16_t nan = blas_bf16_1x1(NAN, 1, 0);
  CHECK((nan & 0x7f80) == 0x7f80 && (nan & 0x7f), "NaN stays NaN: %#x", nan);

  /* refusals */
  float one = 1, buf[64] = {0};
  STATUS(CUBLAS_STATUS_NOT_INITIALIZED,
         blas.cublasSgemm(NULL, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, buf, 2, buf, 2, &one, buf, 2));
  STATUS(CUBLAS_STATUS_INVALID_VALUE,
         blas.cublasSgemm(g_blas, CUBLAS_OP_N, CUBLAS_OP_N, -1, 2, 2, &one, buf, 2, buf, 2, &one, buf, 2));
  STATUS(CUBLAS_STATUS_INVALID_VALUE,
         blas.cublasSgemm(g_blas, (cublasOperation_t)9, CUBLAS_OP_N, 2, 2, 2, &one, buf, 2, buf, 2, &one, buf, 2));
  STATUS(CUBLAS_STATUS_INVALID_VALUE, /* lda < k for op T */
         blas.cublasSgemm(g_blas, CUBLAS_OP_T, CUBLAS_OP_N, 2, 2, 3, &one, buf, 2, buf, 3, &one, buf, 2));
  STATUS(CUBLAS_STATUS_INVALID_VALUE, /* ldb < n for op T */
         blas.cublasSgemm(g_blas, CUBLAS_OP_N, CUBLAS_OP_T, 2, 3, 2, &one, buf, 2, buf, 2, &one, buf, 2));
  STATUS(CUBLAS_STATUS_INVALID_VALUE, /* ldc < m */
         blas.cublasSgemm(g_blas, CUBLAS_OP_N, CUBLAS_OP_N, 3, 2, 2, &one, buf, 3, buf, 2, &one, buf, 2));
  STATUS(CUBLAS_STATUS_INVALID_VALUE,
         blas.cublasSgemm(g_blas, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, NULL, buf, 2, buf, 2, &one, buf, 2));
  STATUS(CUBLAS_STATUS_INVALID_VALUE, blas.cublasSgemmStridedBatched(g_blas, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one,
                                                                     buf, 2, 4, buf, 2, 4, &one, buf, 2, 4, -1));
  STATUS(CUBLAS_STATUS_NOT_SUPPORTED, /* fp32 operands into bf16 */
         blas.cublasGemmStridedBatchedEx(g_blas, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, buf, CUDA_R_32F, 2, 4, buf,
                                         CUDA_R_32F, 2, 4, &one, buf, CUDA_R_16BF, 2, 4, 1, CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT));
  STATUS(CUBLAS_STATUS_NOT_SUPPORTED, /* A and B of different types */
         blas.cublasGemmStridedBatchedEx(g_blas, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, buf, CUDA_R_16BF, 2, 4, buf,
                                         CUDA_R_32F, 2, 4, &one, buf, CUDA_R_32F, 2, 4, 1, CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT));
  STATUS(CUBLAS_STATUS_NOT_SUPPORTED,
         blas.cublasGemmStridedBatchedEx(g_blas, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, buf, CUDA_R_32F, 2, 4, buf,
                                         CUDA_R_32F, 2, 4, &one, buf, CUDA_R_32F, 2, 4, 1, CUBLAS_COMPUTE_64F,
                                         CUBLAS_GEMM_DEFAULT));
  STATUS(CUBLAS_STATUS_INVALID_VALUE,
         blas.cublasGemmStridedBatchedEx(g_blas, CUBLAS_OP_N, CUBLAS_OP_N, 2, 2, 2, &one, buf, CUDA_R_32F, 2, 4, buf,
                                         CUDA_R_32F, 2, 4, &one, buf, CUDA_R_32F, 2, 4, 1, CUBLAS_COMPUTE_32F,
                                         (cublasGemmAlgo_t)12345));
  STATUS(CUBLAS_STATUS_SUCCESS, blas.cublasDestroy(g_blas));
}

/* ------------------------------------------------------------ cuBLASLt */

static cublasLtHandle_t g_lt;

/* The epilogues the backend uses, as the test reads cuBLASLt's documentation. */
typedef struct {
  uint32_t epilogue;
  bool bias, aux;
  act act;
  const char *name;
} epi_spec;

static const epi_spec EPIS[] = {
    {CUBLASLT_EPILOGUE_DEFAULT, false, false, ACT_NONE, "DEFAULT"},
    {CUBLASLT_EPILOGUE_BIAS, true, false, ACT_NONE, "BIAS"},
    {CUBLASLT_EPILOGUE_RELU, false, false, ACT_RELU, "RELU"},
    {CUBLASLT_EPILOGUE_RELU_BIAS, true, false, ACT_RELU, "RELU_BIAS"},
    {CUBLASLT_EPILOGUE_GELU, false, false, ACT_GELU, "GELU"},
    {CUBLASLT_EPILOGUE_GELU_BIAS, true, false, ACT_GELU, "GELU_BIAS"},
    {CUBLASLT_EPILOGUE_GELU_AUX, false, true, ACT_GELU, "GELU_AUX"},
    {CUBLASLT_EPILOGUE_GELU_AUX_BIAS, true, true, ACT_GELU, "GELU_AUX_BIAS"},
};

#define LT_SET(fn, obj, attr, val) STATUS(CUBLAS_STATUS_SUCCESS, lt.fn((obj), (attr), &(val), sizeof(val)))

/* x's layout, with its batch count and stride set. */
static cublasLtMatrixLayout_t lt_layout(const mat *x) {
  cublasLtMatrixLayout_t l = NULL;
  int32_t count = (int32_t)x->count;
  int64_t stride = x->stride;
  STATUS(CUBLAS_STATUS_SUCCESS, lt.cublasLtMatrixLayoutCreate(&l, x->t, (uint64_t)x->rows, (uint64_t)x->cols, x->ld));
  LT_SET(cublasLtMatrixLayoutSetAttribute, l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, count);
  LT_SET(cublasLtMatrixLayoutSetAttribute, l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, stride);
  return l;
}

/* The heuristic's status for a matmul, with the preferences the backend sets;
 * *res its first result, *found how many it gave. */
static cublasStatus_t lt_heuristic(cublasLtMatmulDesc_t desc, cublasLtMatrixLayout_t la, cublasLtMatrixLayout_t lb,
                                   cublasLtMatrixLayout_t lc, cublasLtMatrixLayout_t ld,
                                   cublasLtMatmulHeuristicResult_t *res, int *found) {
  cublasLtMatmulPreference_t pref = NULL;
  uint64_t ws = 1 << 20;
  uint32_t align = 16;
  STATUS(CUBLAS_STATUS_SUCCESS, lt.cublasLtMatmulPreferenceCreate(&pref));
  LT_SET(cublasLtMatmulPreferenceSetAttribute, pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, ws);
  LT_SET(cublasLtMatmulPreferenceSetAttribute, pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align);
  LT_SET(cublasLtMatmulPreferenceSetAttribute, pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align);
  LT_SET(cublasLtMatmulPreferenceSetAttribute, pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align);
  LT_SET(cublasLtMatmulPreferenceSetAttribute, pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align);
  memset(res, 0, sizeof *res);
  *found = -1;
  cublasStatus_t st = lt.cublasLtMatmulAlgoGetHeuristic(g_lt, desc, la, lb, lc, ld, pref, 1, res, found);
  STATUS(CUBLAS_STATUS_SUCCESS, lt.cublasLtMatmulPreferenceDestroy(pref));
  return st;
}

/* A matmul's descriptor: fp32 compute, the transposes and the epilogue. */
static cublasLtMatmulDesc_t lt_desc(bool ta, bool tb, uint32_t epilogue) {
  cublasLtMatmulDesc_t desc = NULL;
  int32_t opa = ta ? CUBLAS_OP_T : CUBLAS_OP_N, opb = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
  STATUS(CUBLAS_STATUS_SUCCESS, lt.cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_TRANSA, opa);
  LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_TRANSB, opb);
  LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue);
  return desc;
}

/* One cuBLASLt matmul as the backend makes it (m 13, n 6, k 11): in place
 * (C = D) or not, the bias per batch or shared (batch stride 0), aux with its
 * own ld and batch stride. */
/* The operands of the cuBLASLt cases, op(A) m x k and op(B) k x n with m 13,
 * n 6, k 11, and D, each with a leading dimension past its rows and (batched)
 * a batch stride past its matrix, so that padding is never read or written. */
enum { LT_M = 13, LT_N = 6, LT_K = 11 };
static void lt_operands(cudaDataType ab, cudaDataType cd, bool ta, bool tb, int count, mat *A, mat *B, mat *D) {
  const int m = LT_M, n = LT_N, k = LT_K;
  int ar = ta ? k : m, ac = ta ? m : k, br = tb ? n : k, bc = tb ? k : n;
  int64_t batched = count > 1;
  *A = mat_make(ab, ar, ac, ar + 2, batched * ((ar + 2) * ac + 7), count);
  *B = mat_make(ab, br, bc, br + 1, batched * ((br + 1) * bc + 3), count);
  *D = mat_make(cd, m, n, m + 1, batched * ((m + 1) * n + 5), count);
}

static void lt_case(const epi_spec *e, cudaDataType ab, cudaDataType cd, bool ta, bool tb, int count, float beta,
                    bool in_place, bool shared_bias) {
  const int m = LT_M, n = LT_N, k = LT_K;
  int64_t batched = count > 1;
  mat A, B, D;
  lt_operands(ab, cd, ta, tb, count, &A, &B, &D);
  mat C = in_place ? D : mat_make(cd, m, n, m + 2, batched * ((m + 2) * n + 2), count);
  mat bias = mat_make(cd, m, 1, m, shared_bias ? 0 : m + 3, count);
  mat aux = mat_make(cd, m, n, 16, batched * (16 * n + 8), count);
  mat_random(&A), mat_random(&B), mat_random(&bias);
  if (beta != 0) mat_random(&C);
  size_t len = (size_t)(count * m * n);
  double *pre = malloc(len * sizeof(double)), *mag = malloc(len * sizeof(double)), *want = malloc(len * sizeof(double));
  float alpha = 0.875f;
  ref_gemm r = {ta, tb, m, n, k, count, alpha, beta, &A, &B, &C, e->bias ? &bias : NULL};
  reference(&r, pre, mag);
  for (size_t i = 0; i < len; i++) want[i] = activate(e->act, pre[i]);

  cublasLtMatmulDesc_t desc = lt_desc(ta, tb, e->epilogue);
  if (e->bias) {
    int64_t stride = bias.stride;
    LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias.p);
    LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, stride);
  }
  if (e->aux) {
    int64_t aux_ld = aux.ld, stride = aux.stride;
    LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux.p);
    LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, aux_ld);
    LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, stride);
  }
  cublasLtMatrixLayout_t la = lt_layout(&A), lb = lt_layout(&B), lc = lt_layout(&C), ld = lt_layout(&D);
  cublasLtMatmulHeuristicResult_t res;
  int found;
  STATUS(CUBLAS_STATUS_SUCCESS, lt_heuristic(desc, la, lb, lc, ld, &res, &found));
  CHECK(found == 1 && res.state == CUBLAS_STATUS_SUCCESS && res.workspaceSize == 0,
        "heuristic: %d results, state %d, workspace %zu", found, (int)res.state, res.workspaceSize);
  STATUS(CUBLAS_STATUS_SUCCESS,
         lt.cublasLtMatmul(g_lt, desc, &alpha, A.p, la, B.p, lb, &beta, C.p, lc, D.p, ld, &res.algo, NULL, 0, NULL));

  char what[200];
  snprintf(what, sizeof what, "cublasLtMatmul %s %s->%s op %c%c x%d beta %g%s%s: D", e->name, type_name(ab),
           type_name(cd), ta ? 'T' : 'N', tb ? 'T' : 'N', count, beta, in_place ? " in place" : "",
           e->bias && shared_bias && count > 1 ? " shared bias" : "");
  check_mat(what, &D, want, mag);
  if (e->aux) {
    strcat(what, " aux");
    check_mat(what, &aux, pre, mag);
  } else {
    bool untouched = true;
    for (size_t i = 0; i < (size_t)aux.len * esize(cd); i++)
      untouched = untouched && ((unsigned char *)aux.p)[i] == 0xff;
    CHECK(untouched, "%s: aux written by an epilogue without aux", what);
  }
  lt.cublasLtMatrixLayoutDestroy(la), lt.cublasLtMatrixLayoutDestroy(lb);
  lt.cublasLtMatrixLayoutDestroy(lc), lt.cublasLtMatrixLayoutDestroy(ld);
  lt.cublasLtMatmulDescDestroy(desc);
  free(pre), free(mag), free(want);
  free(A.p), free(B.p), free(D.p), free(bias.p), free(aux.p);
  if (!in_place) free(C.p);
}

/* The statuses of what a matmul must refuse, on a valid problem (fp32, m 16,
 * n 4, k 8) changed one thing at a time. */
static void lt_refusals(void) {
  mat A = mat_make(CUDA_R_32F, 16, 8, 16, 0, 1), B = mat_make(CUDA_R_32F, 8, 4, 8, 0, 1);
  mat D = mat_make(CUDA_R_32F, 16, 4, 16, 0, 1), Dh = mat_make(CUDA_R_16BF, 16, 4, 16, 0, 1);
  mat A8 = mat_make(CUDA_R_32F, 15, 8, 16, 0, 1);
  cublasLtMatrixLayout_t la = lt_layout(&A), lb = lt_layout(&B), ld = lt_layout(&D), ldh = lt_layout(&Dh);
  cublasLtMatrixLayout_t la_bad = lt_layout(&A8);
  cublasLtMatmulHeuristicResult_t res;
  int found;
  float one = 1, zero = 0;

  /* attributes: a value of the wrong size, none, one not done here */
  cublasLtMatmulDesc_t desc = lt_desc(false, false, CUBLASLT_EPILOGUE_DEFAULT);
  int64_t wide = CUBLAS_OP_T;
  int32_t order = CUBLASLT_ORDER_ROW;
  uint32_t epi;
  STATUS(CUBLAS_STATUS_INVALID_VALUE,
         lt.cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, &wide, sizeof wide));
  STATUS(CUBLAS_STATUS_INVALID_VALUE, lt.cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_TRANSA, NULL, 4));
  STATUS(CUBLAS_STATUS_NOT_SUPPORTED,
         lt.cublasLtMatmulDescSetAttribute(desc, CUBLASLT_MATMUL_DESC_AMAX_D_POINTER, &A.p, sizeof A.p));
  STATUS(CUBLAS_STATUS_NOT_SUPPORTED,
         lt.cublasLtMatrixLayoutSetAttribute(la, CUBLASLT_MATRIX_LAYOUT_PLANE_OFFSET, &wide, sizeof wide));
  STATUS(CUBLAS_STATUS_SUCCESS, lt_heuristic(desc, la, lb, ld, ld, &res, &found));

  /* epilogues not done here: refused by the heuristic and by the matmul */
  static const uint32_t others[] = {
      CUBLASLT_EPILOGUE_RELU_AUX,    CUBLASLT_EPILOGUE_RELU_AUX_BIAS, CUBLASLT_EPILOGUE_DRELU,
      CUBLASLT_EPILOGUE_DRELU_BGRAD, CUBLASLT_EPILOGUE_DGELU,         CUBLASLT_EPILOGUE_DGELU_BGRAD,
      CUBLASLT_EPILOGUE_BGRADB,      12345};
  for (size_t i = 0; i < sizeof others / sizeof others[0]; i++) {
    LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_EPILOGUE, others[i]);
    STATUS(CUBLAS_STATUS_NOT_SUPPORTED, lt_heuristic(desc, la, lb, ld, ld, &res, &found));
    CHECK(found == 0, "epilogue %u: %d results", others[i], found);
    STATUS(CUBLAS_STATUS_NOT_SUPPORTED,
           lt.cublasLtMatmul(g_lt, desc, &one, A.p, la, B.p, lb, &zero, D.p, ld, D.p, ld, NULL, NULL, 0, NULL));
  }
  /* aux: ld below D's rows or not a multiple of 8, batch stride not a multiple of 8 */
  epi = CUBLASLT_EPILOGUE_GELU_AUX;
  LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_EPILOGUE, epi);
  LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, D.p);
  static const int64_t aux_bad[][2] = {{8, 0}, {20, 0}, {16, 12}}; /* {ld, batch stride} */
  for (int i = 0; i < 3; i++) {
    int64_t aux_ld = aux_bad[i][0], aux_stride = aux_bad[i][1];
    LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, aux_ld);
    LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, aux_stride);
    STATUS(CUBLAS_STATUS_INVALID_VALUE, lt_heuristic(desc, la, lb, ld, ld, &res, &found));
  }
  /* bias: no pointer at the matmul; a type other than D's */
  epi = CUBLASLT_EPILOGUE_BIAS;
  LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_EPILOGUE, epi);
  STATUS(CUBLAS_STATUS_SUCCESS, lt_heuristic(desc, la, lb, ld, ld, &res, &found));
  STATUS(CUBLAS_STATUS_INVALID_VALUE,
         lt.cublasLtMatmul(g_lt, desc, &one, A.p, la, B.p, lb, &zero, D.p, ld, D.p, ld, NULL, NULL, 0, NULL));
  int32_t bias_type = CUDA_R_16BF;
  LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE, bias_type);
  STATUS(CUBLAS_STATUS_NOT_SUPPORTED, lt_heuristic(desc, la, lb, ld, ld, &res, &found));
  lt.cublasLtMatmulDescDestroy(desc);

  desc = lt_desc(false, false, CUBLASLT_EPILOGUE_DEFAULT);
  STATUS(CUBLAS_STATUS_INVALID_VALUE, lt_heuristic(desc, la_bad, lb, ld, ld, &res, &found)); /* A's rows */
  STATUS(CUBLAS_STATUS_INVALID_VALUE, lt_heuristic(desc, la, la, ld, ld, &res, &found));     /* B's shape */
  STATUS(CUBLAS_STATUS_NOT_SUPPORTED, lt_heuristic(desc, la, lb, ldh, ldh, &res, &found));   /* fp32 into bf16 */
  STATUS(CUBLAS_STATUS_NOT_SUPPORTED, lt_heuristic(desc, la, lb, ld, ldh, &res, &found));    /* C, D types */
  {
    cublasLtMatmulPreference_t pref;
    STATUS(CUBLAS_STATUS_SUCCESS, lt.cublasLtMatmulPreferenceCreate(&pref));
    STATUS(CUBLAS_STATUS_INVALID_VALUE,
           lt.cublasLtMatmulAlgoGetHeuristic(g_lt, desc, la, lb, ld, ld, pref, 0, &res, &found));
    STATUS(CUBLAS_STATUS_INVALID_VALUE, lt.cublasLtMatmulPreferenceSetAttribute(
                                            pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &order, sizeof order));
    lt.cublasLtMatmulPreferenceDestroy(pref);
  }
  lt.cublasLtMatmulDescDestroy(desc);
  STATUS(CUBLAS_STATUS_SUCCESS, lt.cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_64F, CUDA_R_64F));
  STATUS(CUBLAS_STATUS_NOT_SUPPORTED, lt_heuristic(desc, la, lb, ld, ld, &res, &found)); /* fp64 compute */
  lt.cublasLtMatmulDescDestroy(desc);
  desc = lt_desc(false, false, CUBLASLT_EPILOGUE_DEFAULT);
  LT_SET(cublasLtMatrixLayoutSetAttribute, ld, CUBLASLT_MATRIX_LAYOUT_ORDER, order); /* row-major D */
  STATUS(CUBLAS_STATUS_NOT_SUPPORTED, lt_heuristic(desc, la, lb, ld, ld, &res, &found));
  lt.cublasLtMatmulDescDestroy(desc);

  lt.cublasLtMatrixLayoutDestroy(la), lt.cublasLtMatrixLayoutDestroy(lb), lt.cublasLtMatrixLayoutDestroy(ld);
  lt.cublasLtMatrixLayoutDestroy(ldh), lt.cublasLtMatrixLayoutDestroy(la_bad);
  free(A.p), free(B.p), free(D.p), free(Dh.p), free(A8.p);
}

/* bf16 through the BIAS epilogue (D = 1 1 + bias, 1 x 1): the bits of D. */
static uint16_t lt_bf16_1x1(float bias) {
  mat A = mat_make(CUDA_R_16BF, 1, 1, 1, 0, 1), D = mat_make(CUDA_R_16BF, 1, 1, 1, 0, 1);
  mat b = mat_make(CUDA_R_16BF, 1, 1, 1, 0, 1);
  put(&A, 0, 0, 0, 1), put(&b, 0, 0, 0, bias);
  cublasLtMatmulDesc_t desc = lt_desc(false, false, CUBLASLT_EPILOGUE_BIAS);
  LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, b.p);
  cublasLtMatrixLayout_t l = lt_layout(&A);
  float one = 1, zero = 0;
  STATUS(CUBLAS_STATUS_SUCCESS,
         lt.cublasLtMatmul(g_lt, desc, &one, A.p, l, A.p, l, &zero, D.p, l, D.p, l, NULL, NULL, 0, NULL));
  uint16_t bits = *(uint16_t *)D.p;
  lt.cublasLtMatrixLayoutDestroy(l), lt.cublasLtMatmulDescDestroy(desc);
  free(A.p), free(D.p), free(b.p);
  return bits;
}

/* BGRADA (the backend's weight gradients with their biases'): D as DEFAULT's,
 * and through the bias pointer (D's type, BIAS_BATCH_STRIDE apart) op(A)
 * summed over k, one value per row of D, of A as it is (alpha not applied). */
static void lt_bgrad_case(cudaDataType ab, cudaDataType cd, bool ta, bool tb, int count) {
  const int m = LT_M, n = LT_N, k = LT_K;
  mat A, B, D;
  lt_operands(ab, cd, ta, tb, count, &A, &B, &D);
  mat sums = mat_make(cd, m, 1, m, m + 3, count);
  mat_random(&A), mat_random(&B);
  memset(sums.p, 0xff, (size_t)sums.len * esize(cd));
  float alpha = 0.875f, beta = 0;
  size_t len = (size_t)(count * m * n);
  double *pre = malloc(len * sizeof(double)), *mag = malloc(len * sizeof(double));
  double *want = malloc((size_t)(count * m) * sizeof(double)), *wmag = malloc((size_t)(count * m) * sizeof(double));
  ref_gemm r = {ta, tb, m, n, k, count, alpha, beta, &A, &B, &D, NULL};
  reference(&r, pre, mag);
  for (int64_t z = 0; z < count; z++)
    for (int64_t i = 0; i < m; i++) {
      double s = 0, sm = 0;
      for (int64_t l = 0; l < k; l++) {
        double a = ta ? get(&A, z, l, i) : get(&A, z, i, l);
        s += a, sm += fabs(a);
      }
      want[z * m + i] = s, wmag[z * m + i] = sm;
    }
  cublasLtMatmulDesc_t desc = lt_desc(ta, tb, CUBLASLT_EPILOGUE_BGRADA);
  int64_t stride = sums.stride;
  LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, sums.p);
  LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, stride);
  cublasLtMatrixLayout_t la = lt_layout(&A), lb = lt_layout(&B), ld = lt_layout(&D);
  cublasLtMatmulHeuristicResult_t res;
  int found;
  STATUS(CUBLAS_STATUS_SUCCESS, lt_heuristic(desc, la, lb, ld, ld, &res, &found));
  STATUS(CUBLAS_STATUS_SUCCESS,
         lt.cublasLtMatmul(g_lt, desc, &alpha, A.p, la, B.p, lb, &beta, D.p, ld, D.p, ld, &res.algo, NULL, 0, NULL));
  char what[160];
  snprintf(what, sizeof what, "cublasLtMatmul BGRADA %s->%s op %c%c x%d", type_name(ab), type_name(cd),
           ta ? 'T' : 'N', tb ? 'T' : 'N', count);
  check_mat(what, &D, pre, mag);
  strcat(what, ": the sums");
  check_mat(what, &sums, want, wmag);
  lt.cublasLtMatrixLayoutDestroy(la), lt.cublasLtMatrixLayoutDestroy(lb), lt.cublasLtMatrixLayoutDestroy(ld);
  lt.cublasLtMatmulDescDestroy(desc);
  free(pre), free(mag), free(want), free(wmag);
  free(A.p), free(B.p), free(D.p), free(sums.p);
}

static void test_cublaslt(void) {
  STATUS(CUBLAS_STATUS_SUCCESS, lt.cublasLtCreate(&g_lt));
  static const cudaDataType types[][2] = {
      {CUDA_R_32F, CUDA_R_32F}, {CUDA_R_16BF, CUDA_R_16BF}, {CUDA_R_16BF, CUDA_R_32F}};
  for (size_t ie = 0; ie < sizeof EPIS / sizeof EPIS[0]; ie++)
    for (int t = 0; t < 3; t++)
      for (int tr = 0; tr < 4; tr++)
        for (int v = 0; v < 16; v++) {
          int count = v & 1 ? 3 : 1;
          float beta = v & 2 ? 1 : 0;
          bool in_place = v & 4, shared_bias = v & 8;
          lt_case(&EPIS[ie], types[t][0], types[t][1], tr & 1, tr & 2, count, beta, in_place, shared_bias);
        }
  for (int t = 0; t < 3; t++)
    for (int tr = 0; tr < 4; tr++) {
      lt_bgrad_case(types[t][0], types[t][1], tr & 1, tr & 2, 1);
      lt_bgrad_case(types[t][0], types[t][1], tr & 1, tr & 2, 3);
    }
  lt_refusals();
  CHECK(lt_bf16_1x1(0x1p-8f) == 0x3f80, "cuBLASLt: 1 + 2^-8 (a tie) rounds to 1: %#x", lt_bf16_1x1(0x1p-8f));
  CHECK(lt_bf16_1x1(0x3p-9f) == 0x3f81, "cuBLASLt: 1 + 3 2^-9 rounds to 1 + 2^-7: %#x", lt_bf16_1x1(0x3p-9f));
  STATUS(CUBLAS_STATUS_SUCCESS, lt.cublasLtDestroy(g_lt));
}

/* ------------------------------------------------------------ stream capture */

#define CU_OK(call)                                                                                                    \
  do {                                                                                                                 \
    CUresult r_ = (call);                                                                                              \
    CHECK(r_ == CUDA_SUCCESS, "%s: CUresult %d", #call, (int)r_);                                                      \
  } while (0)

/* Whether every byte of x's buffer is still 0xff (nothing wrote it). */
static bool untouched(const mat *x) {
  for (size_t i = 0; i < (size_t)x->len * esize(x->t); i++)
    if (((const unsigned char *)x->p)[i] != 0xff) return false;
  return true;
}

/* Ends the capture on s into an executable graph (the graph itself destroyed). */
static CUgraphExec end_exec(CUstream s) {
  CUgraph g = NULL;
  CUgraphExec x = NULL;
  CU_OK(cu.cuStreamEndCapture(s, &g));
  if (g) CU_OK(cu.cuGraphInstantiate(&x, g, 0));
  if (g) CU_OK(cu.cuGraphDestroy(g));
  return x;
}

/* A reference's results, [z][j][i] packed. */
typedef struct {
  double *pre, *mag;
} want;
static want want_make(size_t len) {
  want w = {malloc(len * sizeof(double)), malloc(len * sizeof(double))};
  return w;
}

/* cuBLAS on a capturing stream: a plain GEMM (C of NaN, beta 0) and a batched
 * bf16 one that accumulates (beta 1: each replay adds to what the last one
 * left), replayed on new operands. */
static void capture_cublas(CUstream s) {
  const int m = 7, n = 5, k = 9, count = 2;
  mat A = mat_make(CUDA_R_32F, m, k, m + 1, 0, 1), B = mat_make(CUDA_R_32F, n, k, n, 0, 1);
  mat C = mat_make(CUDA_R_32F, m, n, m + 2, 0, 1);
  mat A2 = mat_make(CUDA_R_16BF, k, m, k, k * m + 3, count), B2 = mat_make(CUDA_R_16BF, k, n, k, k * n, count);
  mat C2 = mat_make(CUDA_R_32F, m, n, m, m * n + 1, count);
  mat_random(&C2);
  STATUS(CUBLAS_STATUS_SUCCESS, blas.cublasCreate(&g_blas));
  STATUS(CUBLAS_STATUS_SUCCESS, blas.cublasSetStream(g_blas, s));
  float alpha = 1.5f, beta = 0, one = 1, half = 0.5f;
  CU_OK(cu.cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  STATUS(CUBLAS_STATUS_SUCCESS, blas.cublasSgemm(g_blas, CUBLAS_OP_N, CUBLAS_OP_T, m, n, k, &alpha, A.p, (int)A.ld, B.p,
                                                 (int)B.ld, &beta, C.p, (int)C.ld));
  STATUS(CUBLAS_STATUS_SUCCESS,
         blas.cublasGemmStridedBatchedEx(g_blas, CUBLAS_OP_T, CUBLAS_OP_N, m, n, k, &half, A2.p, CUDA_R_16BF,
                                         (int)A2.ld, A2.stride, B2.p, CUDA_R_16BF, (int)B2.ld, B2.stride, &one, C2.p,
                                         CUDA_R_32F, (int)C2.ld, C2.stride, count, CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT));
  alpha = 99, half = 99; /* read at the call: changing them now changes nothing */
  CUgraphExec gemms = end_exec(s);
  CHECK(untouched(&C), "cuBLAS: a captured GEMM ran at the call");
  want w1 = want_make((size_t)(m * n)), w2 = want_make((size_t)(m * n * count));
  for (int rep = 0; rep < 2 && gemms; rep++) {
    mat_random(&A), mat_random(&B), mat_random(&A2), mat_random(&B2);
    ref_gemm r1 = {false, true, m, n, k, 1, 1.5, 0, &A, &B, &C, NULL};
    ref_gemm r2 = {true, false, m, n, k, count, 0.5, 1, &A2, &B2, &C2, NULL};
    reference(&r1, w1.pre, w1.mag);
    reference(&r2, w2.pre, w2.mag); /* on the C2 the graph will read */
    CU_OK(cu.cuGraphLaunch(gemms, s));
    char what[96];
    snprintf(what, sizeof what, "cuBLAS in a graph, replay %d: cublasSgemm", rep);
    check_mat(what, &C, w1.pre, w1.mag);
    snprintf(what, sizeof what, "cuBLAS in a graph, replay %d: cublasGemmStridedBatchedEx", rep);
    check_mat(what, &C2, w2.pre, w2.mag);
  }
  if (gemms) CU_OK(cu.cuGraphExecDestroy(gemms));

  /* on the stream of an invalidated capture: refused */
  CU_OK(cu.cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  CHECK(cu.cuStreamSynchronize(s) == CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED, "cuStreamSynchronize in capture");
  STATUS(CUBLAS_STATUS_EXECUTION_FAILED, blas.cublasSgemm(g_blas, CUBLAS_OP_N, CUBLAS_OP_T, m, n, k, &alpha, A.p,
                                                          (int)A.ld, B.p, (int)B.ld, &beta, C.p, (int)C.ld));
  CUgraph g = NULL;
  CHECK(cu.cuStreamEndCapture(s, &g) == CUDA_ERROR_STREAM_CAPTURE_INVALIDATED && !g, "an invalidated capture ended");
  STATUS(CUBLAS_STATUS_SUCCESS, blas.cublasDestroy(g_blas));
  free(w1.pre), free(w1.mag), free(w2.pre), free(w2.mag);
  free(A.p), free(B.p), free(C.p), free(A2.p), free(B2.p), free(C2.p);
}

/* cuBLASLt on a capturing stream: a matmul with a bias, replayed on new
 * operands; after the capture its descriptor is changed (another epilogue,
 * another bias) and its alpha, which the graph must not see. */
static void capture_cublaslt(CUstream s) {
  const int m = 13, n = 6, k = 11;
  mat A = mat_make(CUDA_R_16BF, m, k, m, 0, 1), B = mat_make(CUDA_R_16BF, k, n, k + 1, 0, 1);
  mat D = mat_make(CUDA_R_32F, m, n, m + 3, 0, 1), bias = mat_make(CUDA_R_32F, m, 1, m, 0, 1);
  mat other = mat_make(CUDA_R_32F, m, 1, m, 0, 1);
  mat_random(&other);
  STATUS(CUBLAS_STATUS_SUCCESS, lt.cublasLtCreate(&g_lt));
  cublasLtMatmulDesc_t desc = lt_desc(false, false, CUBLASLT_EPILOGUE_BIAS);
  LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias.p);
  cublasLtMatrixLayout_t la = lt_layout(&A), lb = lt_layout(&B), ld = lt_layout(&D);
  float alpha = 0.75f, beta = 0;
  CU_OK(cu.cuStreamBeginCapture(s, CU_STREAM_CAPTURE_MODE_THREAD_LOCAL));
  STATUS(CUBLAS_STATUS_SUCCESS,
         lt.cublasLtMatmul(g_lt, desc, &alpha, A.p, la, B.p, lb, &beta, D.p, ld, D.p, ld, NULL, NULL, 0, s));
  CUgraphExec matmul = end_exec(s);
  uint32_t relu = CUBLASLT_EPILOGUE_RELU_BIAS;
  alpha = 99;
  LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_EPILOGUE, relu);
  LT_SET(cublasLtMatmulDescSetAttribute, desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, other.p);
  CHECK(untouched(&D), "cuBLASLt: a captured matmul ran at the call");
  want w = want_make((size_t)(m * n));
  for (int rep = 0; rep < 2 && matmul; rep++) {
    mat_random(&A), mat_random(&B), mat_random(&bias);
    ref_gemm r = {false, false, m, n, k, 1, 0.75, 0, &A, &B, &D, &bias};
    reference(&r, w.pre, w.mag);
    CU_OK(cu.cuGraphLaunch(matmul, s));
    char what[96];
    snprintf(what, sizeof what, "cuBLASLt in a graph, replay %d: BIAS bf16->f32", rep);
    check_mat(what, &D, w.pre, w.mag);
  }
  if (matmul) CU_OK(cu.cuGraphExecDestroy(matmul));
  lt.cublasLtMatrixLayoutDestroy(la), lt.cublasLtMatrixLayoutDestroy(lb), lt.cublasLtMatrixLayoutDestroy(ld);
  lt.cublasLtMatmulDescDestroy(desc);
  STATUS(CUBLAS_STATUS_SUCCESS, lt.cublasLtDestroy(g_lt));
  free(w.pre), free(w.mag);
  free(A.p), free(B.p), free(D.p), free(bias.p), free(other.p);
}

static void test_capture(const char *dir) {
  if (!load_cuda(dir)) {
    CHECK(false, "cannot load the stand-in libcuda.so.1 from %s", dir);
    return;
  }
  CUdevice dev;
  CUcontext ctx;
  CUstream s;
  CU_OK(cu.cuInit(0));
  CU_OK(cu.cuDeviceGet(&dev, 0));
  CU_OK(cu.cuDevicePrimaryCtxRetain(&ctx, dev));
  CU_OK(cu.cuCtxSetCurrent(ctx));
  CU_OK(cu.cuStreamCreate(&s, CU_STREAM_DEFAULT));
  capture_cublas(s);
  capture_cublaslt(s);
  CU_OK(cu.cuStreamDestroy(s));
  CU_OK(cu.cuDevicePrimaryCtxRelease(dev));
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: %s LIB_DIR (the folder of the stand-in libcublas.so.13 and libcublasLt.so.13)\n", argv[0]);
    return 2;
  }
  if (!load(argv[1])) return 1;
  test_cublas();
  test_cublaslt();
  test_capture(argv[1]);
  printf("fake_blas: %d checks passed, %d failed\n", g_pass, g_fail);
  return g_fail ? 1 : 0;
}
