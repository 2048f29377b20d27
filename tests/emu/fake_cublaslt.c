/* fake_cublaslt.c — libcublasLt.so.13 of the CPU emulation (tests/emu): the
 * functions the cuda backend looks up (CUBLASLT_FUNCS in
 * runtime/cuda_lib.h), with cuBLASLt's semantics on host memory (a
 * "device" pointer of the emulation is a host pointer):
 *   D = epilogue(alpha op(A) op(B) + beta C)
 * column-major (CUBLASLT_ORDER_COL), strided batches, C not read when beta
 * is 0, D = C or apart. Types: fp32 compute and scale (CUBLAS_COMPUTE_32F,
 * CUDA_R_32F); A and B fp32 with C and D fp32, or A and B bf16 with C and D
 * bf16 or fp32. Epilogues: DEFAULT, BIAS, RELU(_BIAS), GELU(_BIAS),
 * GELU_AUX(_BIAS): the bias (in D's type, one value per row of D, broadcast
 * over its columns, BIAS_BATCH_STRIDE apart) is added before the activation;
 * GELU is the tanh form 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)));
 * the AUX ones also store the activation's input, in D's type, at
 * EPILOGUE_AUX_POINTER (EPILOGUE_AUX_LD, EPILOGUE_AUX_BATCH_STRIDE); BGRADA
 * stores op(A) summed over k (one value per row of D) through BIAS_POINTER, in
 * D's type, BIAS_BATCH_STRIDE apart. All in fp32, each result rounded once to
 * its type.
 * It is not: fast; reduced precision (no TF32); asynchronous (each call has
 * finished when it returns; the workspace goes unused); a choice of
 * algorithms (the heuristic offers one, needing no workspace). What it does
 * not do (another epilogue, type, order or attribute) is refused with
 * CUBLAS_STATUS_NOT_SUPPORTED, an inconsistent call with
 * CUBLAS_STATUS_INVALID_VALUE.
 *
 * Stream capture: when the matmul's stream is capturing (emu_capture.h), the
 * call is checked, then recorded rather than run: its pointers, the values of
 * alpha and beta (host pointers, read at the call) and a copy of its
 * descriptor (the epilogue, the bias and aux pointers and strides: a later
 * change to the descriptor does not change the graph) go into a host node
 * that runs it at each replay, on the memory as it is then. */
#include <cublasLt.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fake_blas.h"

struct cublasLtContext {
  int unused; /* a handle holds nothing here (C has no empty struct) */
};

/* What a cublasLtMatrixLayout_t points at; the fields have the attributes'
 * types. */
typedef struct {
  uint32_t type; /* cudaDataType */
  int32_t order;
  uint64_t rows, cols;
  int64_t ld;
  int32_t batch_count;
  int64_t batch_stride;
} lt_layout;

/* What a cublasLtMatmulDesc_t points at; the fields have the attributes'
 * types. */
typedef struct {
  int32_t compute_type, scale_type, transa, transb, transc;
  uint32_t epilogue;
  const void *bias;
  int64_t bias_stride;
  int32_t bias_type; /* -1: D's type */
  void *aux;
  int64_t aux_ld, aux_stride;
  int32_t aux_type; /* -1: D's type */
} lt_desc;

/* What a cublasLtMatmulPreference_t points at: kept, but no value matters to
 * the one algorithm here (no workspace, any alignment). */
typedef struct {
  uint32_t search_mode, reduction_mask;
  uint64_t max_workspace, impl_mask;
  uint32_t align_a, align_b, align_c, align_d;
  float max_waves;
} lt_pref;

typedef enum { ACT_NONE, ACT_RELU, ACT_GELU } act;

/* The epilogues run here: D = act(alpha op(A) op(B) + beta C + bias), aux
 * the input of act. */
typedef struct {
  uint32_t epilogue;
  bool bias, aux;
  act act;
  bool bgrad_a; /* writes op(A)'s sums over k through the bias pointer */
} epilogue_info;

static const epilogue_info EPILOGUES[] = {
    {CUBLASLT_EPILOGUE_BGRADA, false, false, ACT_NONE, true},
    {CUBLASLT_EPILOGUE_DEFAULT, false, false, ACT_NONE, false},
    {CUBLASLT_EPILOGUE_BIAS, true, false, ACT_NONE, false},
    {CUBLASLT_EPILOGUE_RELU, false, false, ACT_RELU, false},
    {CUBLASLT_EPILOGUE_RELU_BIAS, true, false, ACT_RELU, false},
    {CUBLASLT_EPILOGUE_GELU, false, false, ACT_GELU, false},
    {CUBLASLT_EPILOGUE_GELU_BIAS, true, false, ACT_GELU, false},
    {CUBLASLT_EPILOGUE_GELU_AUX, false, true, ACT_GELU, false},
    {CUBLASLT_EPILOGUE_GELU_AUX_BIAS, true, true, ACT_GELU, false},
};

/* ------------------------------------------------------------ handle */

cublasStatus_t cublasLtCreate(cublasLtHandle_t *lightHandle) {
  if (!lightHandle) return CUBLAS_STATUS_INVALID_VALUE;
  *lightHandle = calloc(1, sizeof **lightHandle);
  return *lightHandle ? CUBLAS_STATUS_SUCCESS : CUBLAS_STATUS_ALLOC_FAILED;
}

cublasStatus_t cublasLtDestroy(cublasLtHandle_t lightHandle) {
  if (!lightHandle) return CUBLAS_STATUS_NOT_INITIALIZED;
  free(lightHandle);
  return CUBLAS_STATUS_SUCCESS;
}

/* ------------------------------------------------------------ descriptors */

/* An attribute's value copied into its field; INVALID_VALUE when buf is NULL
 * or its size is not the field's (the size the header gives the attribute). */
static cublasStatus_t set(void *field, size_t field_size, const void *buf, size_t size) {
  if (!buf || size != field_size) return CUBLAS_STATUS_INVALID_VALUE;
  memcpy(field, buf, size);
  return CUBLAS_STATUS_SUCCESS;
}
#define SET(field) set(&(field), sizeof(field), buf, sizeInBytes)

cublasStatus_t cublasLtMatrixLayoutCreate(cublasLtMatrixLayout_t *matLayout, cudaDataType type, uint64_t rows,
                                          uint64_t cols, int64_t ld) {
  if (!matLayout) return CUBLAS_STATUS_INVALID_VALUE;
  lt_layout *l = malloc(sizeof *l);
  if (!l) return CUBLAS_STATUS_ALLOC_FAILED;
  *l = (lt_layout){
      .type = (uint32_t)type, .order = CUBLASLT_ORDER_COL, .rows = rows, .cols = cols, .ld = ld, .batch_count = 1};
  *matLayout = (cublasLtMatrixLayout_t)l;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutDestroy(cublasLtMatrixLayout_t matLayout) {
  free(matLayout);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatrixLayoutSetAttribute(cublasLtMatrixLayout_t matLayout, cublasLtMatrixLayoutAttribute_t attr,
                                                const void *buf, size_t sizeInBytes) {
  lt_layout *l = (lt_layout *)matLayout;
  if (!l) return CUBLAS_STATUS_INVALID_VALUE;
  switch (attr) {
  case CUBLASLT_MATRIX_LAYOUT_TYPE: return SET(l->type);
  case CUBLASLT_MATRIX_LAYOUT_ORDER: return SET(l->order);
  case CUBLASLT_MATRIX_LAYOUT_ROWS: return SET(l->rows);
  case CUBLASLT_MATRIX_LAYOUT_COLS: return SET(l->cols);
  case CUBLASLT_MATRIX_LAYOUT_LD: return SET(l->ld);
  case CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT: return SET(l->batch_count);
  case CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET: return SET(l->batch_stride);
  default: return CUBLAS_STATUS_NOT_SUPPORTED;
  }
}

cublasStatus_t cublasLtMatmulDescCreate(cublasLtMatmulDesc_t *matmulDesc, cublasComputeType_t computeType,
                                        cudaDataType_t scaleType) {
  if (!matmulDesc) return CUBLAS_STATUS_INVALID_VALUE;
  lt_desc *d = malloc(sizeof *d);
  if (!d) return CUBLAS_STATUS_ALLOC_FAILED;
  *d = (lt_desc){.compute_type = computeType,
                 .scale_type = scaleType,
                 .transa = CUBLAS_OP_N,
                 .transb = CUBLAS_OP_N,
                 .transc = CUBLAS_OP_N,
                 .epilogue = CUBLASLT_EPILOGUE_DEFAULT,
                 .bias_type = -1,
                 .aux_type = -1};
  *matmulDesc = (cublasLtMatmulDesc_t)d;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescDestroy(cublasLtMatmulDesc_t matmulDesc) {
  free(matmulDesc);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulDescSetAttribute(cublasLtMatmulDesc_t matmulDesc, cublasLtMatmulDescAttributes_t attr,
                                              const void *buf, size_t sizeInBytes) {
  lt_desc *d = (lt_desc *)matmulDesc;
  if (!d) return CUBLAS_STATUS_INVALID_VALUE;
  switch (attr) {
  case CUBLASLT_MATMUL_DESC_COMPUTE_TYPE: return SET(d->compute_type);
  case CUBLASLT_MATMUL_DESC_SCALE_TYPE: return SET(d->scale_type);
  case CUBLASLT_MATMUL_DESC_TRANSA: return SET(d->transa);
  case CUBLASLT_MATMUL_DESC_TRANSB: return SET(d->transb);
  case CUBLASLT_MATMUL_DESC_TRANSC: return SET(d->transc);
  case CUBLASLT_MATMUL_DESC_EPILOGUE: return SET(d->epilogue);
  case CUBLASLT_MATMUL_DESC_BIAS_POINTER: return SET(d->bias);
  case CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE: return SET(d->bias_stride);
  case CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE: return SET(d->bias_type);
  case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER: return SET(d->aux);
  case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD: return SET(d->aux_ld);
  case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE: return SET(d->aux_stride);
  case CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_DATA_TYPE: return SET(d->aux_type);
  default: return CUBLAS_STATUS_NOT_SUPPORTED;
  }
}

cublasStatus_t cublasLtMatmulPreferenceCreate(cublasLtMatmulPreference_t *pref) {
  if (!pref) return CUBLAS_STATUS_INVALID_VALUE;
  lt_pref *p = malloc(sizeof *p);
  if (!p) return CUBLAS_STATUS_ALLOC_FAILED;
  *p = (lt_pref){.search_mode = CUBLASLT_SEARCH_BEST_FIT,
                 .reduction_mask = CUBLASLT_REDUCTION_SCHEME_MASK,
                 .impl_mask = UINT64_MAX,
                 .align_a = 256,
                 .align_b = 256,
                 .align_c = 256,
                 .align_d = 256};
  *pref = (cublasLtMatmulPreference_t)p;
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceDestroy(cublasLtMatmulPreference_t pref) {
  free(pref);
  return CUBLAS_STATUS_SUCCESS;
}

cublasStatus_t cublasLtMatmulPreferenceSetAttribute(cublasLtMatmulPreference_t pref,
                                                    cublasLtMatmulPreferenceAttributes_t attr, const void *buf,
                                                    size_t sizeInBytes) {
  lt_pref *p = (lt_pref *)pref;
  if (!p) return CUBLAS_STATUS_INVALID_VALUE;
  switch (attr) {
  case CUBLASLT_MATMUL_PREF_SEARCH_MODE: return SET(p->search_mode);
  case CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES: return SET(p->max_workspace);
  case CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK: return SET(p->reduction_mask);
  case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES: return SET(p->align_a);
  case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES: return SET(p->align_b);
  case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES: return SET(p->align_c);
  case CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES: return SET(p->align_d);
  case CUBLASLT_MATMUL_PREF_MAX_WAVES_COUNT: return SET(p->max_waves);
  case CUBLASLT_MATMUL_PREF_IMPL_MASK: return SET(p->impl_mask);
  default: return CUBLAS_STATUS_NOT_SUPPORTED;
  }
}
#undef SET

/* ------------------------------------------------------------ matmul */

/* A matmul as it runs here: the product and what its epilogue needs. */
typedef struct {
  emu_gemm g;
  const lt_desc *d;
  const epilogue_info *e;
  cudaDataType type; /* D's, the bias's and aux's */
} lt_plan;

static bool type_ok(uint32_t a, uint32_t d) {
  return (a == CUDA_R_32F && d == CUDA_R_32F) || (a == CUDA_R_16BF && (d == CUDA_R_16BF || d == CUDA_R_32F));
}

/* Checks a matmul's descriptor and layouts and fills p but for the pointers
 * and scalars: SUCCESS, INVALID_VALUE (an inconsistent call) or
 * NOT_SUPPORTED (what is not done here). */
static cublasStatus_t plan_make(lt_plan *p, cublasLtMatmulDesc_t matmulDesc, cublasLtMatrixLayout_t adesc,
                                cublasLtMatrixLayout_t bdesc, cublasLtMatrixLayout_t cdesc,
                                cublasLtMatrixLayout_t ddesc) {
  const lt_desc *d = (const lt_desc *)matmulDesc;
  const lt_layout *A = (const lt_layout *)adesc, *B = (const lt_layout *)bdesc, *C = (const lt_layout *)cdesc,
                  *D = (const lt_layout *)ddesc;
  if (!d || !A || !B || !C || !D) return CUBLAS_STATUS_INVALID_VALUE;
  memset(p, 0, sizeof *p);
  p->d = d;
  for (size_t i = 0; i < sizeof EPILOGUES / sizeof EPILOGUES[0]; i++)
    if (EPILOGUES[i].epilogue == d->epilogue) p->e = &EPILOGUES[i];
  if (!p->e || (d->compute_type != CUBLAS_COMPUTE_32F && d->compute_type != CUBLAS_COMPUTE_32F_PEDANTIC) ||
      d->scale_type != CUDA_R_32F || d->transc != CUBLAS_OP_N)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  emu_gemm *g = &p->g;
  if (!emu_blas_trans(d->transa, &g->trans_a) || !emu_blas_trans(d->transb, &g->trans_b))
    return CUBLAS_STATUS_INVALID_VALUE;
  const lt_layout *all[] = {A, B, C, D};
  for (int i = 0; i < 4; i++) {
    const lt_layout *l = all[i];
    if (l->order != CUBLASLT_ORDER_COL || l->rows > INT_MAX || l->cols > INT_MAX || l->ld > INT_MAX)
      return CUBLAS_STATUS_NOT_SUPPORTED;
    if (l->ld < emu_blas_max1((int64_t)l->rows) || l->batch_count < 1 || l->batch_count != D->batch_count)
      return CUBLAS_STATUS_INVALID_VALUE;
  }
  if (A->type != B->type || C->type != D->type || !type_ok(A->type, D->type)) return CUBLAS_STATUS_NOT_SUPPORTED;
  g->m = (int64_t)D->rows, g->n = (int64_t)D->cols, g->k = (int64_t)(g->trans_a ? A->rows : A->cols);
  if ((int64_t)(g->trans_a ? A->cols : A->rows) != g->m || (int64_t)(g->trans_b ? B->cols : B->rows) != g->k ||
      (int64_t)(g->trans_b ? B->rows : B->cols) != g->n || C->rows != D->rows || C->cols != D->cols)
    return CUBLAS_STATUS_INVALID_VALUE;
  p->type = (cudaDataType)D->type;
  if ((p->e->bias || p->e->bgrad_a) && d->bias_type != -1 && d->bias_type != (int32_t)D->type)
    return CUBLAS_STATUS_NOT_SUPPORTED;
  if (p->e->aux) {
    if (d->aux_type != -1 && d->aux_type != (int32_t)D->type) return CUBLAS_STATUS_NOT_SUPPORTED;
    /* GELU's aux: ld at least D's rows; ld and batch stride multiples of 8 */
    if (d->aux_ld < g->m || d->aux_ld % 8 || d->aux_stride % 8) return CUBLAS_STATUS_INVALID_VALUE;
  }
  g->count = D->batch_count;
  g->a = (emu_mat){NULL, (cudaDataType)A->type, A->ld, A->batch_stride};
  g->b = (emu_mat){NULL, (cudaDataType)B->type, B->ld, B->batch_stride};
  g->c = (emu_mat){NULL, (cudaDataType)C->type, C->ld, C->batch_stride};
  g->ldd = D->ld, g->stride_d = D->batch_stride;
  return CUBLAS_STATUS_SUCCESS;
}

static float activation(act a, float x) {
  switch (a) {
  case ACT_NONE: break;
  case ACT_RELU: return x > 0 ? x : 0;
  case ACT_GELU: {
    double v = x;
    return (float)(0.5 * v * (1 + tanh(0.7978845608028654 * (v + 0.044715 * v * v * v))));
  }
  }
  return x;
}

/* The epilogue of a plan (ctx) on batch z's result. */
static void epilogue(const void *ctx, int64_t z, float *acc, int64_t m, int64_t n) {
  const lt_plan *p = ctx;
  int64_t es = (int64_t)emu_blas_size(p->type);
  if (p->e->bias) {
    const char *bias = (const char *)p->d->bias + z * p->d->bias_stride * es;
    for (int64_t j = 0; j < n; j++)
      for (int64_t i = 0; i < m; i++) acc[j * m + i] += emu_blas_get(bias, p->type, i);
  }
  if (p->e->aux) emu_blas_store((char *)p->d->aux + z * p->d->aux_stride * es, p->type, p->d->aux_ld, acc, m, n);
  if (p->e->act != ACT_NONE)
    for (int64_t i = 0; i < m * n; i++) acc[i] = activation(p->e->act, acc[i]);
}

cublasStatus_t cublasLtMatmulAlgoGetHeuristic(cublasLtHandle_t lightHandle, cublasLtMatmulDesc_t operationDesc,
                                              cublasLtMatrixLayout_t Adesc, cublasLtMatrixLayout_t Bdesc,
                                              cublasLtMatrixLayout_t Cdesc, cublasLtMatrixLayout_t Ddesc,
                                              cublasLtMatmulPreference_t preference, int requestedAlgoCount,
                                              cublasLtMatmulHeuristicResult_t heuristicResultsArray[],
                                              int *returnAlgoCount) {
  if (!lightHandle) return CUBLAS_STATUS_NOT_INITIALIZED;
  if (!preference || requestedAlgoCount <= 0 || !heuristicResultsArray || !returnAlgoCount)
    return CUBLAS_STATUS_INVALID_VALUE;
  *returnAlgoCount = 0;
  lt_plan p;
  cublasStatus_t st = plan_make(&p, operationDesc, Adesc, Bdesc, Cdesc, Ddesc);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  cublasLtMatmulHeuristicResult_t *r = &heuristicResultsArray[0];
  memset(r, 0, sizeof *r); /* the algorithm: all zeros; workspaceSize 0 */
  r->state = CUBLAS_STATUS_SUCCESS;
  r->wavesCount = 1.0f;
  *returnAlgoCount = 1;
  return CUBLAS_STATUS_SUCCESS;
}

/* Runs a plan: the product with its epilogue, then BGRADA's sums of op(A)
 * over k (of A as it is, before alpha), one per row of D. */
static cublasStatus_t run(const lt_plan *p) {
  cublasStatus_t st = emu_blas_gemm(&p->g, epilogue, p);
  if (st != CUBLAS_STATUS_SUCCESS || !p->e->bgrad_a) return st;
  const emu_gemm *g = &p->g;
  int64_t es = (int64_t)emu_blas_size(p->type), as = (int64_t)emu_blas_size(g->a.type);
  for (int64_t z = 0; z < g->count; z++) {
    const char *a = (const char *)g->a.p + z * g->a.stride * as;
    float *sums = malloc(sizeof *sums * (size_t)emu_blas_max1(g->m));
    if (!sums) return CUBLAS_STATUS_ALLOC_FAILED;
    for (int64_t i = 0; i < g->m; i++) {
      double s = 0;
      for (int64_t kk = 0; kk < g->k; kk++)
        s += emu_blas_get(a, g->a.type, g->trans_a ? kk + i * g->a.ld : i + kk * g->a.ld);
      sums[i] = (float)s;
    }
    emu_blas_store((char *)p->d->bias + z * p->d->bias_stride * es, p->type, emu_blas_max1(g->m), sums, g->m, 1);
    free(sums);
  }
  return CUBLAS_STATUS_SUCCESS;
}

/* A matmul recorded in a capture: its plan, and the descriptor the plan
 * points at, copied. */
typedef struct {
  lt_plan p;
  lt_desc d;
} lt_recorded;

static void replay(void *data) {
  lt_recorded *r = data;
  if (run(&r->p) != CUBLAS_STATUS_SUCCESS)
    fprintf(stderr, "moec emu: a cuBLASLt matmul in a graph failed at its replay: out of host memory\n");
}

cublasStatus_t cublasLtMatmul(cublasLtHandle_t lightHandle, cublasLtMatmulDesc_t computeDesc, const void *alpha,
                              const void *A, cublasLtMatrixLayout_t Adesc, const void *B, cublasLtMatrixLayout_t Bdesc,
                              const void *beta, const void *C, cublasLtMatrixLayout_t Cdesc, void *D,
                              cublasLtMatrixLayout_t Ddesc, const cublasLtMatmulAlgo_t *algo, void *workspace,
                              size_t workspaceSizeInBytes, cudaStream_t stream) {
  (void)algo, (void)workspace, (void)workspaceSizeInBytes;
  if (!lightHandle) return CUBLAS_STATUS_NOT_INITIALIZED;
  lt_plan p;
  cublasStatus_t st = plan_make(&p, computeDesc, Adesc, Bdesc, Cdesc, Ddesc);
  if (st != CUBLAS_STATUS_SUCCESS) return st;
  if (!alpha || !beta || !D) return CUBLAS_STATUS_INVALID_VALUE;
  emu_gemm *g = &p.g;
  g->alpha = *(const float *)alpha, g->beta = *(const float *)beta;
  bool product = g->k > 0 && g->alpha != 0;
  if ((product && (!A || !B)) || (g->beta != 0 && !C) || ((p.e->bias || p.e->bgrad_a) && !p.d->bias) ||
      (p.e->aux && !p.d->aux) || (p.e->bgrad_a && !A))
    return CUBLAS_STATUS_INVALID_VALUE;
  /* in place (C = D): one layout */
  if (C == D && (g->c.ld != g->ldd || g->c.stride != g->stride_d)) return CUBLAS_STATUS_INVALID_VALUE;
  g->a.p = A, g->b.p = B, g->c.p = C, g->d = D;
  if (!emu_blas_capturing(stream)) return run(&p);
  lt_recorded *copy = malloc(sizeof *copy);
  if (!copy) return CUBLAS_STATUS_ALLOC_FAILED;
  copy->p = p, copy->d = *p.d;
  copy->p.d = &copy->d;
  return emu_blas_record(stream, replay, copy, "a cuBLASLt matmul");
}
