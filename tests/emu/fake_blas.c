/* fake_blas.c — the host GEMM of the BLAS stand-ins (see fake_blas.h). */
#include "fake_blas.h"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_ops_typed.h" /* moert_f32_to_bf16, moert_bf16_to_f32 */
#include "emu_capture.h"

bool emu_blas_trans(int32_t op, bool *trans) {
  switch (op) {
  case CUBLAS_OP_N: *trans = false; return true;
  case CUBLAS_OP_T:
  case CUBLAS_OP_C: *trans = true; return true;
  default: return false;
  }
}

size_t emu_blas_size(cudaDataType t) { return t == CUDA_R_16BF ? 2 : 4; }

float emu_blas_get(const void *p, cudaDataType t, int64_t i) {
  return t == CUDA_R_16BF ? moert_bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

void emu_blas_store(void *dst, cudaDataType t, int64_t ld, const float *src, int64_t rows, int64_t cols) {
  for (int64_t j = 0; j < cols; j++) {
    const float *s = src + j * rows;
    if (t == CUDA_R_16BF) {
      uint16_t *d = (uint16_t *)dst + j * ld;
      for (int64_t i = 0; i < rows; i++) d[i] = moert_f32_to_bf16(s[i]);
    } else {
      memcpy((float *)dst + j * ld, s, (size_t)rows * sizeof(float));
    }
  }
}

/* rows x cols of src (type t, leading dimension ld) as packed fp32 (ld rows). */
static void load(float *dst, const void *src, cudaDataType t, int64_t ld, int64_t rows, int64_t cols) {
  for (int64_t j = 0; j < cols; j++)
    for (int64_t i = 0; i < rows; i++) dst[j * rows + i] = emu_blas_get(src, t, j * ld + i);
}

static const void *batch(const emu_mat *x, int64_t z) {
  return (const char *)x->p + z * x->stride * (int64_t)emu_blas_size(x->type);
}

/* Batch z of an operand stored rows x cols, as fp32 for sgemm: fp32 where it
 * is, bf16 widened into tmp; *ld is the leading dimension of what it returns. */
static const float *operand(const emu_mat *x, int64_t z, int64_t rows, int64_t cols, float *tmp, int64_t *ld) {
  if (x->type == CUDA_R_32F) {
    *ld = x->ld;
    return batch(x, z);
  }
  load(tmp, batch(x, z), x->type, x->ld, rows, cols);
  *ld = rows;
  return tmp;
}

cublasStatus_t emu_blas_gemm(const emu_gemm *g, emu_epilogue *epi, const void *ctx) {
  int64_t m = g->m, n = g->n, k = g->k;
  if (m == 0 || n == 0 || g->count == 0) return CUBLAS_STATUS_SUCCESS;
  bool product = k > 0 && g->alpha != 0;
  /* stored shapes: op(A) is m x k, op(B) k x n */
  int64_t ar = g->trans_a ? k : m, ac = g->trans_a ? m : k;
  int64_t br = g->trans_b ? n : k, bc = g->trans_b ? k : n;
  bool wide_a = product && g->a.type != CUDA_R_32F, wide_b = product && g->b.type != CUDA_R_32F;
  float *acc = malloc((size_t)(m * n) * sizeof(float));
  float *ta = wide_a ? malloc((size_t)(ar * ac) * sizeof(float)) : NULL;
  float *tb = wide_b ? malloc((size_t)(br * bc) * sizeof(float)) : NULL;
  if (!acc || (wide_a && !ta) || (wide_b && !tb)) {
    free(acc), free(ta), free(tb);
    return CUBLAS_STATUS_ALLOC_FAILED;
  }
  for (int64_t z = 0; z < g->count; z++) {
    if (g->beta != 0)
      load(acc, batch(&g->c, z), g->c.type, g->c.ld, m, n);
    else
      memset(acc, 0, (size_t)(m * n) * sizeof(float)); /* C may hold NaN: not read */
    if (product) {
      int64_t lda, ldb;
      const float *a = operand(&g->a, z, ar, ac, ta, &lda), *b = operand(&g->b, z, br, bc, tb, &ldb);
      cblas_sgemm(CblasColMajor, g->trans_a ? CblasTrans : CblasNoTrans, g->trans_b ? CblasTrans : CblasNoTrans,
                  (blasint)m, (blasint)n, (blasint)k, g->alpha, a, (blasint)lda, b, (blasint)ldb, g->beta, acc,
                  (blasint)m);
    } else if (g->beta != 0 && g->beta != 1) {
      for (int64_t i = 0; i < m * n; i++) acc[i] *= g->beta;
    }
    if (epi) epi(ctx, z, acc, m, n);
    emu_blas_store((char *)g->d + z * g->stride_d * (int64_t)emu_blas_size(g->c.type), g->c.type, g->ldd, acc, m, n);
  }
  free(acc), free(ta), free(tb);
  return CUBLAS_STATUS_SUCCESS;
}

bool emu_blas_capturing(cudaStream_t stream) {
  const emu_cuda_fns *cu = emu_cuda();
  return cu && emu_cuda_defers(cu, stream);
}

cublasStatus_t emu_blas_record(cudaStream_t stream, void (*fn)(void *), void *data, const char *what) {
  const emu_cuda_fns *cu = emu_cuda();
  CUresult r = cu ? cu->launch_owned(stream, fn, data, free) : CUDA_ERROR_NOT_INITIALIZED;
  if (r == CUDA_SUCCESS) return CUBLAS_STATUS_SUCCESS;
  fprintf(stderr, "moec emu: %s on a capturing stream: the driver refused its node: %s\n", what,
          cu ? emu_cuda_error(cu, r) : "no driver");
  free(data);
  return CUBLAS_STATUS_EXECUTION_FAILED;
}
