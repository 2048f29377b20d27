/* cuda_blas.c — the cuda backend's GEMMs. gemm and gemm_batched (fp32,
 * TF32 off) through cuBLAS. gemm_ex, every GEMM of the expert path, is one
 * strided-batched cublasLtMatmul, the bias and relu or gelu (with its
 * pre-activation) in the epilogue. Its descriptors and algorithm (the
 * heuristic's first) are made on the first call of a (shape, types,
 * epilogue, alignment) and kept, up to MAX_LT_PLANS: after a step's first
 * calls nothing is created. cuBLAS (with the backend's kernels for the
 * epilogue) runs what cuBLASLt cannot: no library, no algorithm, a full plan
 * table, MOEC_CUBLASLT=0.
 *
 * The GEMMs run on the backend's stream and record a failure in its sticky
 * status (backend_cuda_impl.h); the handles, plans and counts are this
 * file's. */
#include "backend.h"

#include <inttypes.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>

#ifndef MOERT_HAVE_CUDA_HEADERS

bool moert_backend_cuda_set_cublaslt(moert_backend *b, bool on) {
  (void)b, (void)on;
  return false;
}
void moert_backend_cuda_gemm_counts(const moert_backend *b, int64_t *lt, int64_t *blas, int *plans) {
  (void)b;
  *lt = *blas = 0;
  *plans = 0;
}

#else

#include "backend_cuda_impl.h"

#ifdef MOERT_HAVE_CUBLASLT
/* cuBLASLt plans kept (distinct GEMM shapes of a run: six per layer,
 * variant and capacity); beyond them a new shape runs on cuBLAS rather than
 * create descriptors inside every step (no eviction: a full table keeps the
 * shapes seen first). The workspace its algorithms may use, allocated
 * once at create. */
enum { MAX_LT_PLANS = 256 };
#define LT_WORKSPACE ((size_t)32 << 20)

/* What a plan depends on: the GEMM's shape, types, epilogue and the
 * alignment of its operands (the heuristic picks algorithms for it). */
typedef struct lt_key {
  int64_t m, n, k, count, lda, ldb, ldc, stride_a, stride_b, stride_c, stride_bias;
  int32_t trans_a, trans_b, ab_type, c_type, epilogue;
  int32_t align_a, align_b, align_c, align_bias, align_aux; /* bytes, at most 256 */
} lt_key;

/* A GEMM shape's descriptors and algorithm; ok false: cuBLASLt has none for
 * it (it runs on cuBLAS, without asking again). */
typedef struct lt_plan {
  lt_key key;
  bool ok;
  cublasLtMatmulDesc_t desc;
  cublasLtMatrixLayout_t la, lb, lc; /* cuBLAS's A (our B), B (our A), C and D (our C) */
  cublasLtMatmulAlgo_t algo;
} lt_plan;
#endif

/* The GEMMs' state, from moert_cuda_blas_setup to moert_cuda_blas_release. */
static struct {
  cuda_state *s;            /* the backend: its stream and sticky status */
  cublasHandle_t blas;
#ifdef MOERT_HAVE_CUBLASLT
  cublasLtHandle_t lt;      /* NULL: no cuBLASLt */
  CUdeviceptr lt_ws;
  int nplans;
  lt_plan plans[MAX_LT_PLANS];
#endif
  bool lt_on;               /* gemm_ex through cuBLASLt (else cuBLAS and kernels) */
  int64_t lt_gemms, blas_gemms; /* gemm_ex calls run by each */
} B;

static bool fits_int(int64_t x) { return x >= 0 && x <= INT_MAX; }

static cudaDataType cuda_type(moert_dt t) { return t == MOERT_BF16 ? CUDA_R_16BF : CUDA_R_32F; }

/* ------------------------------------------------------------ dense */

/* Row-major C = A B is column-major C^T = B^T A^T: cuBLAS gets B first, the
 * sizes swapped, and the same leading dimensions. */
void moert_cuda_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                     const float *a, int64_t lda, const float *b, int64_t ldb, float beta,
                     float *c, int64_t ldc) {
  if (!cuda_healthy(B.s) || m <= 0 || n <= 0) return;
  if (k <= 0 || alpha == 0) { /* BLAS: A and B are not read */
    moert_cuda_scale_rows(c, m, n, ldc, beta);
    return;
  }
  if (!fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(lda) || !fits_int(ldb) ||
      !fits_int(ldc)) {
    MOERT_FAIL(&B.s->err, "a GEMM of %" PRId64 "x%" PRId64 "x%" PRId64 " exceeds cuBLAS's 32-bit sizes",
               m, n, k);
    return;
  }
  CUBLASOK(&B.s->err, cublasSgemm,
           (B.blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
            (int)n, (int)m, (int)k, &alpha, b, (int)ldb, a, (int)lda, &beta, c, (int)ldc));
}

void moert_cuda_gemm_batched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                             float alpha, const float *a, int64_t lda, int64_t stride_a,
                             const float *b, int64_t ldb, int64_t stride_b, float beta, float *c,
                             int64_t ldc, int64_t stride_c, int64_t count) {
  if (!cuda_healthy(B.s) || m <= 0 || n <= 0 || count <= 0) return;
  if (k <= 0 || alpha == 0) {
    for (int64_t i = 0; i < count; i++) moert_cuda_scale_rows(c + i * stride_c, m, n, ldc, beta);
    return;
  }
  if (!fits_int(m) || !fits_int(n) || !fits_int(k) || !fits_int(lda) || !fits_int(ldb) ||
      !fits_int(ldc) || !fits_int(count)) {
    MOERT_FAIL(&B.s->err, "a batched GEMM of %" PRId64 " x %" PRId64 "x%" PRId64 "x%" PRId64
               " exceeds cuBLAS's 32-bit sizes", count, m, n, k);
    return;
  }
  CUBLASOK(&B.s->err, cublasSgemmStridedBatched,
           (B.blas, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
            (int)n, (int)m, (int)k, &alpha, b, (int)ldb, (long long)stride_b, a, (int)lda,
            (long long)stride_a, &beta, c, (int)ldc, (long long)stride_c, (int)count));
}

/* ------------------------------------------------------------ the expert GEMMs (gemm_ex) */

/* gemm_ex without cuBLASLt: fp32 through cublasSgemmStridedBatched (as
 * moert_cuda_gemm_batched, TF32 off), bf16 operands through
 * cublasGemmStridedBatchedEx with fp32 accumulation and C in fp32 or bf16;
 * then the bias, aux and activation by kernels (C holds the pre-activation,
 * rounded, between them: the activation of a bf16 C is of the rounded value,
 * within the tolerance of the cpu's single rounding). */
static void blas_gemm_ex(const moert_gemm *g) {
  const moert_backend *ops = &B.s->b; /* the epilogue's kernels: the backend's ops */
  if (g->ab_type == MOERT_F32 && g->c_type == MOERT_F32) {
    moert_cuda_gemm_batched(g->trans_a, g->trans_b, g->m, g->n, g->k, g->alpha, g->a, g->lda, g->stride_a,
                            g->b, g->ldb, g->stride_b, g->beta, g->c, g->ldc, g->stride_c, g->count);
  } else if (g->k <= 0 || g->alpha == 0) {
    MOERT_FAIL(&B.s->err, "a bf16 GEMM with k = 0 or alpha = 0 (not supported)");
    return;
  } else if (!fits_int(g->m) || !fits_int(g->n) || !fits_int(g->k) || !fits_int(g->lda) ||
             !fits_int(g->ldb) || !fits_int(g->ldc) || !fits_int(g->count)) {
    MOERT_FAIL(&B.s->err, "a batched GEMM of %" PRId64 " x %" PRId64 "x%" PRId64 "x%" PRId64
               " exceeds cuBLAS's 32-bit sizes", g->count, g->m, g->n, g->k);
    return;
  } else {
    float alpha = g->alpha, beta = g->beta;
    CUBLASOK(&B.s->err, cublasGemmStridedBatchedEx,
             (B.blas, g->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, g->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N,
              (int)g->n, (int)g->m, (int)g->k, &alpha, g->b, CUDA_R_16BF, (int)g->ldb, (long long)g->stride_b,
              g->a, CUDA_R_16BF, (int)g->lda, (long long)g->stride_a, &beta, g->c, cuda_type(g->c_type),
              (int)g->ldc, (long long)g->stride_c, (int)g->count, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  int64_t cs = moert_dt_size(g->c_type);
  bool packed = g->ldc == g->n, flat = packed && g->stride_c == g->m * g->n;
  if ((g->bias || g->act != MOERT_EPI_NONE) && !packed) {
    MOERT_FAIL(&B.s->err, "a GEMM with a bias or an activation needs packed rows of C (or cuBLASLt)");
    return;
  }
  if (g->bias) {
    if (flat) ops->bias_add_t(g->c_type, g->c, g->bias, g->count, g->m, g->n);
    else
      for (int64_t z = 0; z < g->count; z++)
        ops->bias_add_t(g->c_type, (char *)g->c + z * g->stride_c * cs,
                        (const char *)g->bias + z * g->stride_bias * cs, 1, g->m, g->n);
  }
  if (g->aux) {
    if (flat) ops->convert(g->aux, g->c_type, g->c, g->c_type, g->count * g->m * g->n);
    else
      for (int64_t z = 0; z < g->count; z++)
        ops->copy_blocks_t(g->c_type, (char *)g->aux + z * g->stride_c * cs, g->ldc,
                           (const char *)g->c + z * g->stride_c * cs, g->ldc, g->m, g->n, false);
  }
  if (g->act != MOERT_EPI_NONE) {
    moert_act act = g->act == MOERT_EPI_RELU ? MOERT_ACT_RELU : MOERT_ACT_GELU;
    if (flat) ops->act_fwd_t(g->c_type, act, g->c, g->c, g->count * g->m * g->n);
    else
      for (int64_t z = 0; z < g->count; z++) {
        void *cz = (char *)g->c + z * g->stride_c * cs;
        ops->act_fwd_t(g->c_type, act, cz, cz, g->m * g->n);
      }
  }
}

#ifdef MOERT_HAVE_CUBLASLT
/* cuBLASLt: row-major C = A B is column-major C^T = B^T A^T, as for cuBLAS:
 * cuBLASLt's A is our B, its B our A, its D (= C) our C seen as [n, m]. So
 * the bias (a row of n) is a vector over D's rows, what its BIAS epilogues
 * broadcast, and aux has C's layout. Epilogues: BIAS, RELU(_BIAS),
 * GELU(_BIAS), GELU_AUX(_BIAS): D = act(alpha A B + beta C + bias), aux the
 * pre-activation, computed in fp32 and rounded once to D's type (bias and
 * aux of D's type: the default of BIAS_DATA_TYPE and EPILOGUE_AUX_DATA_TYPE
 * for bf16 and fp32 outputs). cuBLASLt's GELU is taken to be the tanh form,
 * as the cpu's (PyTorch's _addmm_activation assumes it too; the header does
 * not say): it is used for bf16 results only, where even the erf form (at
 * most 5e-4 away) is below the rounding; fp32 results get the kernel's gelu.
 * CUBLAS_COMPUTE_32F: fp32 operands are computed in fp32 (no TF32), bf16
 * ones accumulated in fp32. BGRADA (a weight gradient's bias gradient): its
 * A (our B) summed over k, our column sums of B, fp32 through the bias
 * pointer; where cuBLASLt has no algorithm for it, the GEMM runs without it
 * and the bias_grad kernel sums (moert_cuda_gemm_ex). */

/* The largest power of two, at most 256, dividing the address of every
 * batch's operand. */
static int32_t align_of(const void *p, int64_t stride_bytes, int64_t count) {
  uint64_t x = (uint64_t)(uintptr_t)p | 256u;
  if (count > 1) x |= (uint64_t)stride_bytes;
  return (int32_t)(x & (~x + 1));
}

/* cuBLASLt's epilogue for g; -1 when it has none (relu with aux: its RELU_AUX
 * is a bit mask, not the pre-activation) or g's aux breaks its rules (ld and
 * batch stride multiples of 8). */
static int lt_epilogue(const moert_gemm *g) {
  bool b = g->bias != NULL;
  if (g->bias_grad) /* our B's column sums: cuBLASLt's A reduced over k */
    return !b && !g->aux && g->act == MOERT_EPI_NONE ? CUBLASLT_EPILOGUE_BGRADA : -1;
  if (g->aux && (g->act != MOERT_EPI_GELU || g->ldc % 8 || (g->count > 1 && g->stride_c % 8))) return -1;
  switch (g->act) {
  case MOERT_EPI_NONE: return b ? CUBLASLT_EPILOGUE_BIAS : CUBLASLT_EPILOGUE_DEFAULT;
  case MOERT_EPI_RELU: return b ? CUBLASLT_EPILOGUE_RELU_BIAS : CUBLASLT_EPILOGUE_RELU;
  case MOERT_EPI_GELU:
    if (g->aux) return b ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX;
    return b ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU;
  }
  return -1;
}

#define LTOK(call) ((call) == CUBLAS_STATUS_SUCCESS)
#define LT_SET(fn, obj, attr, val) LTOK(moert_cublaslt.fn((obj), (attr), &(val), sizeof(val)))

static bool lt_layout(cublasLtMatrixLayout_t *l, moert_dt t, int64_t rows, int64_t cols, int64_t ld,
                      int64_t count, int64_t stride) {
  int32_t n = (int32_t)count;
  return LTOK(moert_cublaslt.cublasLtMatrixLayoutCreate(l, cuda_type(t), (uint64_t)rows, (uint64_t)cols,
                                                        ld)) &&
         LT_SET(cublasLtMatrixLayoutSetAttribute, *l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, n) &&
         LT_SET(cublasLtMatrixLayoutSetAttribute, *l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, stride);
}

static void lt_plan_free(lt_plan *p) {
  if (p->desc) moert_cublaslt.cublasLtMatmulDescDestroy(p->desc);
  if (p->la) moert_cublaslt.cublasLtMatrixLayoutDestroy(p->la);
  if (p->lb) moert_cublaslt.cublasLtMatrixLayoutDestroy(p->lb);
  if (p->lc) moert_cublaslt.cublasLtMatrixLayoutDestroy(p->lc);
  p->desc = NULL, p->la = p->lb = p->lc = NULL;
}

/* Sets the pointers the epilogue reads or writes on p's descriptor (the
 * heuristic reads their alignment; each call sets its own). */
static bool lt_pointers(lt_plan *p, const moert_gemm *g) {
  const void *bias = g->bias ? g->bias : g->bias_grad; /* BGRADA writes through the bias pointer */
  void *aux = g->aux;
  return (!bias || LT_SET(cublasLtMatmulDescSetAttribute, p->desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias)) &&
         (!aux || LT_SET(cublasLtMatmulDescSetAttribute, p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux));
}

/* Creates p's descriptors for g and asks the heuristic for its best
 * algorithm; false when something is not supported (p then holds nothing). */
static bool lt_plan_make(lt_plan *p, const moert_gemm *g, int epi) {
  int32_t opa = g->trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, opb = g->trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  uint32_t e = (uint32_t)epi;
  bool ok = LTOK(moert_cublaslt.cublasLtMatmulDescCreate(&p->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F)) &&
            LT_SET(cublasLtMatmulDescSetAttribute, p->desc, CUBLASLT_MATMUL_DESC_TRANSA, opa) &&
            LT_SET(cublasLtMatmulDescSetAttribute, p->desc, CUBLASLT_MATMUL_DESC_TRANSB, opb) &&
            LT_SET(cublasLtMatmulDescSetAttribute, p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, e) &&
            lt_pointers(p, g);
  if (ok && g->bias && g->count > 1)
    ok = LT_SET(cublasLtMatmulDescSetAttribute, p->desc, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, g->stride_bias);
  if (ok && g->bias_grad && g->count > 1) { /* [count, n] in D's type, fp32 (BIAS_DATA_TYPE's default) */
    int64_t stride = g->n;
    ok = LT_SET(cublasLtMatmulDescSetAttribute, p->desc, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, stride);
  }
  if (ok && g->aux)
    ok = LT_SET(cublasLtMatmulDescSetAttribute, p->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, g->ldc) &&
         (g->count == 1 || LT_SET(cublasLtMatmulDescSetAttribute, p->desc,
                                  CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, g->stride_c));
  /* stored shapes, column-major: our B [k, n] (or [n, k]) is [n, k] (or [k, n]) */
  ok = ok && lt_layout(&p->la, g->ab_type, g->trans_b ? g->k : g->n, g->trans_b ? g->n : g->k, g->ldb, g->count,
                       g->stride_b);
  ok = ok && lt_layout(&p->lb, g->ab_type, g->trans_a ? g->m : g->k, g->trans_a ? g->k : g->m, g->lda, g->count,
                       g->stride_a);
  ok = ok && lt_layout(&p->lc, g->c_type, g->n, g->m, g->ldc, g->count, g->stride_c);
  cublasLtMatmulPreference_t pref = NULL;
  uint64_t ws = LT_WORKSPACE;
  uint32_t aa = (uint32_t)p->key.align_b, ab = (uint32_t)p->key.align_a, ac = (uint32_t)p->key.align_c;
  ok = ok && LTOK(moert_cublaslt.cublasLtMatmulPreferenceCreate(&pref)) &&
       LT_SET(cublasLtMatmulPreferenceSetAttribute, pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, ws) &&
       LT_SET(cublasLtMatmulPreferenceSetAttribute, pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, aa) &&
       LT_SET(cublasLtMatmulPreferenceSetAttribute, pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, ab) &&
       LT_SET(cublasLtMatmulPreferenceSetAttribute, pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, ac) &&
       LT_SET(cublasLtMatmulPreferenceSetAttribute, pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, ac);
  cublasLtMatmulHeuristicResult_t res;
  int found = 0;
  memset(&res, 0, sizeof res);
  ok = ok && LTOK(moert_cublaslt.cublasLtMatmulAlgoGetHeuristic(B.lt, p->desc, p->la, p->lb, p->lc, p->lc, pref, 1,
                                                                &res, &found)) &&
       found > 0 && res.state == CUBLAS_STATUS_SUCCESS;
  if (pref) moert_cublaslt.cublasLtMatmulPreferenceDestroy(pref);
  if (ok) p->algo = res.algo;
  else lt_plan_free(p);
  return ok;
}

/* g's plan, D at d (C's layout): found, or made on the first call of its
 * shape; NULL when the table is full (g then runs on cuBLAS). */
static lt_plan *lt_plan_for(const moert_gemm *g, const void *d, int epi) {
  lt_key k;
  memset(&k, 0, sizeof k); /* the padding too: keys compare by memcmp */
  int64_t es = moert_dt_size(g->ab_type), cs = moert_dt_size(g->c_type);
  k.m = g->m, k.n = g->n, k.k = g->k, k.count = g->count;
  k.lda = g->lda, k.ldb = g->ldb, k.ldc = g->ldc;
  k.stride_a = g->stride_a, k.stride_b = g->stride_b, k.stride_c = g->stride_c;
  k.stride_bias = g->bias ? g->stride_bias : g->bias_grad ? g->n : 0;
  k.trans_a = g->trans_a, k.trans_b = g->trans_b, k.ab_type = g->ab_type, k.c_type = g->c_type, k.epilogue = epi;
  k.align_a = align_of(g->a, g->stride_a * es, g->count);
  k.align_b = align_of(g->b, g->stride_b * es, g->count);
  int32_t align_c = align_of(g->c, g->stride_c * cs, g->count), align_d = align_of(d, g->stride_c * cs, g->count);
  k.align_c = align_c < align_d ? align_c : align_d;
  k.align_bias = g->bias       ? align_of(g->bias, g->stride_bias * cs, g->count)
                 : g->bias_grad ? align_of(g->bias_grad, g->n * 4, g->count)
                                : 0;
  k.align_aux = g->aux ? align_of(g->aux, g->stride_c * cs, g->count) : 0;
  for (int i = 0; i < B.nplans; i++)
    if (memcmp(&B.plans[i].key, &k, sizeof k) == 0) return &B.plans[i];
  if (B.nplans == MAX_LT_PLANS) return NULL;
  lt_plan *p = &B.plans[B.nplans++];
  memset(p, 0, sizeof *p);
  p->key = k;
  p->ok = lt_plan_make(p, g, epi);
  return p;
}

/* g through cuBLASLt; false when it cannot run g (nothing was run). gelu
 * into fp32 is split: the GEMM and bias through cuBLASLt into aux (or C),
 * then the gelu kernel into C, so fp32 stays as close to the cpu as fp32
 * GEMMs are (the epilogue's tanh need not be correctly rounded, which bf16
 * results do not see). */
static bool lt_gemm_ex(const moert_gemm *g) {
  if (!B.lt_on || g->k <= 0 || g->alpha == 0) return false;
  moert_gemm h = *g;
  bool split = g->act == MOERT_EPI_GELU && g->c_type == MOERT_F32;
  if (split) {
    if (g->ldc != g->n) return false;
    h.act = MOERT_EPI_NONE, h.aux = NULL;
  }
  int epi = lt_epilogue(&h);
  if (epi < 0) return false;
  void *d = split && g->aux ? g->aux : g->c;
  lt_plan *p = lt_plan_for(&h, d, epi);
  if (!p || !p->ok || !lt_pointers(p, &h)) return false;
  float alpha = g->alpha, beta = g->beta;
  cublasStatus_t r = moert_cublaslt.cublasLtMatmul(B.lt, p->desc, &alpha, g->b, p->la, g->a, p->lb, &beta, g->c,
                                                   p->lc, d, p->lc, &p->algo, (void *)(uintptr_t)B.lt_ws,
                                                   LT_WORKSPACE, B.s->stream);
  if (r == CUBLAS_STATUS_NOT_SUPPORTED || r == CUBLAS_STATUS_INVALID_VALUE) {
    /* refused before it ran (an operand the algorithm cannot take): cuBLAS from now on */
    lt_plan_free(p);
    p->ok = false;
    return false;
  }
  if (!moert_cublas_check(r, "cublasLtMatmul", __FILE__, __LINE__, &B.s->err)) return true;
  if (split) { /* the gelu kernel: the backend's act_fwd_t */
    const moert_backend *ops = &B.s->b;
    int64_t cs = moert_dt_size(g->c_type);
    if (g->stride_c == g->m * g->n) {
      ops->act_fwd_t(g->c_type, MOERT_ACT_GELU, d, g->c, g->count * g->m * g->n);
    } else {
      for (int64_t z = 0; z < g->count; z++)
        ops->act_fwd_t(g->c_type, MOERT_ACT_GELU, (char *)d + z * g->stride_c * cs, (char *)g->c + z * g->stride_c * cs,
                       g->m * g->n);
    }
  }
  return true;
}

/* cuBLASLt at create: its handle and workspace; quietly none when the
 * library is missing, it fails to start, or MOEC_CUBLASLT=0. */
static void lt_setup(void) {
  const char *env = getenv("MOEC_CUBLASLT");
  if ((env && strcmp(env, "0") == 0) || !moert_cublaslt_load()) return;
  if (!LTOK(moert_cublaslt.cublasLtCreate(&B.lt))) {
    B.lt = NULL;
    return;
  }
  if (moert_cu.cuMemAlloc(&B.lt_ws, LT_WORKSPACE) != CUDA_SUCCESS) {
    moert_cublaslt.cublasLtDestroy(B.lt);
    B.lt = NULL, B.lt_ws = 0;
    return;
  }
  B.lt_on = true;
}

static void lt_release(void) {
  for (int i = 0; i < B.nplans; i++) lt_plan_free(&B.plans[i]);
  B.nplans = 0;
  if (B.lt) moert_cublaslt.cublasLtDestroy(B.lt);
  if (B.lt_ws) moert_cu.cuMemFree(B.lt_ws);
  B.lt = NULL, B.lt_ws = 0, B.lt_on = false;
}
#else
static bool lt_gemm_ex(const moert_gemm *g) {
  (void)g;
  return false;
}
static void lt_setup(void) {}
static void lt_release(void) {}
#endif

/* Every GEMM of the expert path: through cuBLASLt, the bias and relu or gelu
 * in its epilogue, when it is loaded and has an algorithm for the shape;
 * else through cuBLAS, the epilogue by kernels. */
void moert_cuda_gemm_ex(const moert_gemm *g) {
  if (!cuda_healthy(B.s) || g->m <= 0 || g->n <= 0 || g->count <= 0) return;
  if (g->ab_type != MOERT_BF16 && g->c_type == MOERT_BF16) {
    MOERT_FAIL(&B.s->err, "a GEMM of fp32 operands into a bf16 result (not supported)");
    return;
  }
  if (g->bias_grad && (g->c_type != MOERT_F32 || g->bias || g->aux || g->act != MOERT_EPI_NONE || g->trans_b ||
                       g->ldb != g->n || (g->count > 1 && g->stride_b != g->k * g->n))) {
    MOERT_FAIL(&B.s->err, "a GEMM's bias gradient needs C fp32, no other epilogue, and B packed, not transposed");
    return;
  }
  if (lt_gemm_ex(g)) { /* the bias gradient too, in the BGRADA epilogue */
    B.lt_gemms++;
    return;
  }
  moert_gemm h = *g;
  h.bias_grad = NULL;
  if (lt_gemm_ex(&h)) {
    B.lt_gemms++;
  } else {
    B.blas_gemms++;
    blas_gemm_ex(&h);
  }
  if (g->bias_grad) { /* no epilogue for it: the bias_grad kernel's column sums of B, written */
    const moert_backend *ops = &B.s->b;
    ops->zero(g->bias_grad, sizeof(float) * (size_t)(g->count * g->n));
    ops->bias_grad_t(g->ab_type, g->bias_grad, g->b, g->count, g->k, g->n);
  }
}

/* ------------------------------------------------------------ setup */

bool moert_cuda_blas_setup(cuda_state *s, moert_status *st) {
  B.s = s;
  if (!CUBLASOK(st, cublasCreate, (&B.blas))) return MOERT_UP(st);
  /* fp32 GEMMs as fp32 (no TF32), close to the cpu's */
  if (!CUBLASOK(st, cublasSetMathMode, (B.blas, CUBLAS_DEFAULT_MATH)) ||
      !CUBLASOK(st, cublasSetStream, (B.blas, s->stream)))
    return MOERT_UP(st);
  lt_setup();
  return true;
}

void moert_cuda_blas_release(void) {
  lt_release();
  if (B.blas) moert_cublas.cublasDestroy(B.blas);
  memset(&B, 0, sizeof B);
}

/* b is the live cuda backend whose GEMMs these are. */
static bool mine(const moert_backend *b) { return b && B.s && b == &B.s->b && B.s->live; }

bool moert_backend_cuda_set_cublaslt(moert_backend *b, bool on) {
  if (!mine(b)) return false;
#ifdef MOERT_HAVE_CUBLASLT
  B.lt_on = on && B.lt != NULL;
#else
  (void)on;
#endif
  return B.lt_on;
}

void moert_backend_cuda_gemm_counts(const moert_backend *b, int64_t *lt, int64_t *blas, int *plans) {
  bool live = mine(b);
  *lt = live ? B.lt_gemms : 0;
  *blas = live ? B.blas_gemms : 0;
#ifdef MOERT_HAVE_CUBLASLT
  *plans = live ? B.nplans : 0;
#else
  *plans = 0;
#endif
}

#endif /* MOERT_HAVE_CUDA_HEADERS */
